"""The original's per-sample-Jacobian form of the Boltzmann estimator (spec §5), kept to test and
benchmark the one-pass estimator of :mod:`mdsim.estimator.core` against.

Per minibatch of M samples it forms G_i = ∂U_θ(x_i)/∂θ by vmap over VJPs and
J = Ḡ ōᵀ − (1/M) Σ_i G_i O_iᵀ, then g_b = J·∂L/∂ō_b with the minibatch mean ō_b; the result is
mean_b g_b (1/kT dropped unless ``scale_by_kT``).  Memory O(M·P).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from mdsim.observables.water import neighborhood_energies

from .core import LossGrad, as_local_observables, as_sample_matrix, expand_neighborhoods, resolve_loss_grad


# ------------------------------------------------------------- per-sample Jacobian (original)

class _Closure(torch.nn.Module):
    """Registers ``module`` so torch.func.functional_call can swap its parameters while ``fn``
    (which closes over ``module``) runs."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_fn", fn)  # plain attribute even if fn is itself a Module

    def forward(self, *x):
        return self._fn(*x)


class _preserve_parameters:
    """Re-install every (sub)module's original Parameter objects afterwards.  functional_call can
    leave fresh Parameter objects behind for weights shared between submodules (e.g. PyG SchNet's
    ``mlp`` and ``conv.nn``), which would silently detach optimisers holding the old ones."""

    def __init__(self, module: torch.nn.Module):
        self.saved = [(m, dict(m._parameters), dict(m._buffers))
                      for _, m in module.named_modules(remove_duplicate=False)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for m, params, bufs in self.saved:
            m._parameters.update(params)
            m._buffers.update(bufs)
        return False


def _per_sample_grads(fn: Callable, module: torch.nn.Module, inputs: tuple, chunk_size: Optional[int]):
    """Per-sample ∂ fn(*[x[i:i+1] for x in inputs]).sum() / ∂θ for every sample i, by vmap over
    VJPs (all ``inputs`` have the samples along dim 0). Returns a list of (M, *p.shape) tensors
    aligned with the module's trainable parameters."""
    from torch.func import functional_call, grad, vmap

    wrap = _Closure(module, fn)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {"module." + n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def single(p, *xi):
        return functional_call(wrap, p, tuple(x.unsqueeze(0) for x in xi)).sum()

    with _preserve_parameters(module):
        g = vmap(grad(single), in_dims=(None,) + (0,) * len(inputs), chunk_size=chunk_size)(
            params, *(x.detach() for x in inputs))
    return [g["module." + n] for n in names]


def _jacobian_block(G: List[torch.Tensor], obs: torch.Tensor, g_obs: torch.Tensor,
                    materialize_J: bool = False) -> List[torch.Tensor]:
    """The original's per-minibatch formula: J = Ḡ ōᵀ − (1/M) Σ_i G_i O_iᵀ, g = J · ∂L/∂ō.

    By default the contraction is done as Ḡ (ō·∂L) − (1/M) Σ_i G_i (O_i·∂L) (same value, no P×K
    matrix); ``materialize_J`` forms J explicitly like the original."""
    out = []
    o_bar = obs.mean(0)
    for Gp in G:
        Gf = Gp.reshape(Gp.shape[0], -1).to(obs.dtype)  # (M, P)
        if materialize_J:
            J = torch.outer(Gf.mean(0), o_bar) - Gf.T @ obs / obs.shape[0]  # (P, K)
            g = J @ g_obs
        else:
            g = Gf.mean(0) * (o_bar @ g_obs) - Gf.T @ (obs @ g_obs) / obs.shape[0]
        out.append(g.reshape(Gp.shape[1:]))
    return out


def _reference(G_fn, n_samples: int, observables: torch.Tensor, loss_grad: LossGrad, kT, scale_by_kT,
               minibatch_size, module, materialize_J=False) -> List[torch.Tensor]:
    obs = as_sample_matrix(observables)
    blocks = ([(0, n_samples)] if minibatch_size is None else
              [(s, min(s + minibatch_size, n_samples)) for s in range(0, n_samples, minibatch_size)])
    total = None
    for a, b in blocks:
        o = obs[a:b]
        g_obs, _ = resolve_loss_grad(loss_grad, o.mean(0))
        gb = _jacobian_block(G_fn(a, b), o, g_obs, materialize_J)
        total = gb if total is None else [t + x for t, x in zip(total, gb)]
    out = [t / len(blocks) for t in total]
    if scale_by_kT:
        out = [t / kT for t in out]
    params = [p for p in module.parameters() if p.requires_grad]
    return [t.to(p.dtype) for t, p in zip(out, params)]


def reference_jacobian_gradient(energy_fn: Callable[[torch.Tensor], torch.Tensor], module: torch.nn.Module,
                                positions: torch.Tensor, observables: torch.Tensor, loss_grad: LossGrad,
                                kT: Optional[float] = None, scale_by_kT: bool = False,
                                minibatch_size: Optional[int] = None,
                                chunk_size: Optional[int] = None,
                                materialize_J: bool = False) -> List[torch.Tensor]:
    """The original's per-sample-Jacobian estimator (torch.func vmap of per-sample gradients).

    ``energy_fn`` as for :class:`BoltzmannEstimator`, closing over ``module`` (whose trainable
    parameters, in ``module.parameters()`` order, are differentiated).  Samples are split into
    consecutive blocks of ``minibatch_size`` (None: one block = the exact full-batch covariance,
    memory O(N·P)); each block gives g_b = (Ḡ ōᵀ − (1/M) Σ G_i O_iᵀ) · ∂L/∂ō_b with ∂L/∂ō_b from the
    block mean if ``loss_grad`` is callable; the result is mean_b g_b, divided by kT if
    ``scale_by_kT`` (the original: no).  ``chunk_size`` bounds vmap's batch; ``materialize_J``
    forms the (P, K) matrix J per block as the original does (same result, more memory)."""
    def G_fn(a, b):
        return _per_sample_grads(energy_fn, module, (positions[a:b],), chunk_size)
    return _reference(G_fn, positions.shape[0], observables, loss_grad, kT, scale_by_kT, minibatch_size, module,
                      materialize_J)


def reference_local_jacobian_gradient(atom_energy_fn: Callable[[torch.Tensor], torch.Tensor],
                                      module: torch.nn.Module, positions: torch.Tensor,
                                      neighborhoods: torch.Tensor, observables: torch.Tensor,
                                      loss_grad: LossGrad, kT: Optional[float] = None,
                                      scale_by_kT: bool = False, minibatch_size: Optional[int] = None,
                                      chunk_size: Optional[int] = None) -> List[torch.Tensor]:
    """Per-sample-Jacobian form of the local estimator; samples are the (frame, neighbourhood)
    pairs in row-major order (frame-major), blocks of ``minibatch_size`` samples."""
    F = positions.shape[0]
    nb = expand_neighborhoods(neighborhoods, F, positions.device)
    L = nb.shape[1]
    obs = as_local_observables(observables).reshape(F * L, -1)
    frame_of = torch.arange(F, device=positions.device).repeat_interleave(L)
    nb_flat = nb.reshape(F * L, nb.shape[-1])

    def fn(x, idx):  # one sample = (frame positions, its neighbourhood's atom indices)
        return neighborhood_energies(atom_energy_fn(x), idx[:, None, :])[:, 0]

    def G_fn(a, b):
        return _per_sample_grads(fn, module, (positions[frame_of[a:b]], nb_flat[a:b]), chunk_size)

    return _reference(G_fn, F * L, obs, loss_grad, kT, scale_by_kT, minibatch_size, module)
