"""Boltzmann estimator: gradients of losses on ensemble averages (spec §5, with one backward pass).

For samples x_i ~ exp(−U_θ(x)/kT) and a loss L(⟨O⟩) of ensemble averages,

    ∂L/∂θ = −(1/kT) Σ_k (∂L/∂⟨O_k⟩) Cov(O_k, ∂U/∂θ).

With s_i = Σ_k (∂L/∂⟨O_k⟩) O_k(x_i) this is the gradient of the scalar surrogate

    S(θ) = Σ_i w_i U_θ(x_i),   w_i = −(s_i − s̄) / (N kT)   (w detached),

because Σ_i (s_i − s̄) = 0 makes the Ḡ term of the covariance vanish.  One backward pass of S
gives the estimator without ever forming the per-sample Jacobian ∂U(x_i)/∂θ (memory O(P), not
O(N·P)).  The original implementation forms that Jacobian per minibatch, drops 1/kT, and averages
minibatch estimates that use minibatch means; :func:`reference_jacobian_gradient` reproduces it
(for tests and benchmarks).  ``scale_by_kT=False`` (config key ``boltzmann_scale_by_kT``)
reproduces the original's scaling (1/kT dropped).

Local (water) variant: samples are (frame, neighbourhood) pairs, a sample's energy is the sum of
per-atom energies over the neighbourhood's atoms and its observable a local quantity; the same
surrogate applies over all pairs (:func:`local_boltzmann_surrogate`, :class:`LocalBoltzmannEstimator`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from mdsim.observables.water import neighborhood_energies

LossGrad = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]

__all__ = [
    "estimator_weights", "boltzmann_surrogate", "local_boltzmann_surrogate", "resolve_loss_grad",
    "squared_error_loss", "BoltzmannEstimator", "LocalBoltzmannEstimator",
    "reference_jacobian_gradient", "reference_local_jacobian_gradient",
]


# ------------------------------------------------------------------------------------ core

def estimator_weights(observables: torch.Tensor, loss_grad: torch.Tensor, kT: float,
                      scale_by_kT: bool = True) -> torch.Tensor:
    """Detached per-sample weights w_i = −(s_i − s̄)/(N·kT), s_i = O_i · ∂L/∂⟨O⟩.

    observables (N, K) (or (N,) for K = 1), loss_grad (K,) → (N,).  Without ``scale_by_kT`` the
    1/kT factor is dropped (original scaling)."""
    o = observables.detach()
    if o.dim() == 1:
        o = o[:, None]
    g = torch.as_tensor(loss_grad, dtype=o.dtype, device=o.device).detach().reshape(-1)
    s = o @ g
    w = -(s - s.mean()) / s.shape[0]
    if scale_by_kT:
        w = w / kT
    return w


def boltzmann_surrogate(energies: torch.Tensor, observables: torch.Tensor, loss_grad: torch.Tensor,
                        kT: float, scale_by_kT: bool = True) -> torch.Tensor:
    """Scalar whose gradient w.r.t. the energy model's parameters is the Boltzmann estimator
    −(1/kT) Σ_k (∂L/∂⟨O_k⟩) Cov(O_k, ∂U/∂θ).

    energies (N,) with graph, observables (N, K) (detached here), loss_grad (K,) = ∂L/∂⟨O⟩."""
    w = estimator_weights(observables, loss_grad, kT, scale_by_kT).to(energies.dtype)
    return (w * energies.reshape(-1)).sum()


def local_boltzmann_surrogate(atom_energies: torch.Tensor, neighborhoods: torch.Tensor,
                              observables: torch.Tensor, loss_grad: torch.Tensor, kT: float,
                              scale_by_kT: bool = True) -> torch.Tensor:
    """Surrogate over (frame, neighbourhood) samples.

    atom_energies (F, N) with graph, neighborhoods (F, L, S) or (L, S) atom indices,
    observables (F, L, K) local observables; the sample energy is Σ_{a ∈ neighbourhood} e_a."""
    e_loc = neighborhood_energies(atom_energies, neighborhoods)  # (F, L)
    K = observables.shape[-1]
    return boltzmann_surrogate(e_loc.reshape(-1), observables.reshape(-1, K), loss_grad, kT, scale_by_kT)


def resolve_loss_grad(loss_grad: LossGrad, mean_observable: torch.Tensor) -> Tuple[torch.Tensor, Optional[float]]:
    """∂L/∂⟨O⟩ from a tensor (returned as is) or a callable of the mean observable.

    A callable may return a scalar loss (differentiated here by autograd) or the gradient (K,)
    itself.  Returns (gradient (K,), loss or None)."""
    if not callable(loss_grad):
        return torch.as_tensor(loss_grad, dtype=mean_observable.dtype,
                               device=mean_observable.device).detach().reshape(-1), None
    m = mean_observable.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = loss_grad(m)
        if out.dim() == 0:
            (g,) = torch.autograd.grad(out, m)
            return g.detach().reshape(-1), float(out.detach())
    return out.detach().reshape(-1), None


def squared_error_loss(target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """L(⟨O⟩) = Σ_k (⟨O_k⟩ − O*_k)², the original's loss (gradient 2(⟨O⟩ − O*))."""
    def loss(mean_obs: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(target, dtype=mean_obs.dtype, device=mean_obs.device).reshape(mean_obs.shape)
        return ((mean_obs - t) ** 2).sum()
    return loss


def _accumulate(params: Sequence[torch.Tensor], surrogate: torch.Tensor, grads: List[Optional[torch.Tensor]],
                into_grad: bool):
    if into_grad:
        surrogate.backward()
        return
    gs = torch.autograd.grad(surrogate, list(params), allow_unused=True)
    for n, g in enumerate(gs):
        if g is None:
            continue
        grads[n] = g.detach() if grads[n] is None else grads[n] + g.detach()


def _finish(params, grads, into_grad):
    if into_grad:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# ------------------------------------------------------------------------------ estimators

class BoltzmannEstimator:
    """Minibatched Boltzmann estimator with exact full-batch centring.

    ``energy_fn(positions [M, N, 3]) -> energies [M]`` evaluates U_θ (closing over the model,
    atomic numbers, cell, …).  :meth:`gradient` first computes the mean observable over ALL
    samples (and ∂L/∂⟨O⟩ from it), then evaluates energies chunk by chunk, back-propagating each
    chunk's weighted sum, so the result equals one big batch while memory is that of one chunk."""

    def __init__(self, energy_fn: Callable[[torch.Tensor], torch.Tensor], minibatch_size: int, kT: float,
                 scale_by_kT: bool = True):
        self.energy_fn = energy_fn
        self.minibatch_size = int(minibatch_size)
        self.kT = float(kT)
        self.scale_by_kT = bool(scale_by_kT)

    def gradient(self, params: Sequence[torch.Tensor], positions: torch.Tensor, observables: torch.Tensor,
                 loss_grad: LossGrad, accumulate_into_grad: bool = False) -> Tuple[List[torch.Tensor], Dict]:
        """Estimator gradient for samples ``positions`` (S, N, 3) with ``observables`` (S, K).

        ``loss_grad``: ∂L/∂⟨O⟩ (K,) or a callable of the mean observable (see
        :func:`resolve_loss_grad`).  Returns (list of gradients aligned with ``params``, stats
        dict with ``loss``, ``mean_observable``, ``loss_grad``, ``n_samples``).  With
        ``accumulate_into_grad`` the chunks' backward passes add into ``p.grad`` instead (the
        returned list is then the resulting ``.grad`` tensors, including what was there before)."""
        params = list(params)
        obs = observables.detach()
        if obs.dim() == 1:
            obs = obs[:, None]
        mean_obs = obs.mean(0)
        g_obs, loss = resolve_loss_grad(loss_grad, mean_obs)
        w = estimator_weights(obs, g_obs, self.kT, self.scale_by_kT)
        grads: List[Optional[torch.Tensor]] = [None] * len(params)
        S = positions.shape[0]
        for s in range(0, S, self.minibatch_size):
            x = positions[s:s + self.minibatch_size].detach()
            e = self.energy_fn(x).reshape(-1)
            _accumulate(params, (w[s:s + x.shape[0]].to(e.dtype) * e).sum(), grads, accumulate_into_grad)
        stats = {"loss": loss, "mean_observable": mean_obs, "loss_grad": g_obs, "n_samples": S}
        return _finish(params, grads, accumulate_into_grad), stats


class LocalBoltzmannEstimator:
    """Local (neighbourhood) variant: samples are (frame, neighbourhood) pairs.

    ``atom_energy_fn(positions [M, N, 3]) -> per-atom energies [M, N]``.  Minibatches are over
    frames; each frame's per-atom energies are computed once and shared by its neighbourhoods."""

    def __init__(self, atom_energy_fn: Callable[[torch.Tensor], torch.Tensor], minibatch_size: int, kT: float,
                 scale_by_kT: bool = True):
        self.atom_energy_fn = atom_energy_fn
        self.minibatch_size = int(minibatch_size)
        self.kT = float(kT)
        self.scale_by_kT = bool(scale_by_kT)

    def gradient(self, params: Sequence[torch.Tensor], positions: torch.Tensor, neighborhoods: torch.Tensor,
                 observables: torch.Tensor, loss_grad: LossGrad,
                 accumulate_into_grad: bool = False) -> Tuple[List[torch.Tensor], Dict]:
        """positions (F, N, 3), neighborhoods (F, L, S) or (L, S), observables (F, L, K)."""
        params = list(params)
        F = positions.shape[0]
        obs = observables.detach()
        if obs.dim() == 2:
            obs = obs[..., None]
        L, K = obs.shape[1], obs.shape[2]
        nb = torch.as_tensor(neighborhoods, dtype=torch.long, device=positions.device)
        if nb.dim() == 2:
            nb = nb[None].expand(F, -1, -1)
        mean_obs = obs.reshape(-1, K).mean(0)
        g_obs, loss = resolve_loss_grad(loss_grad, mean_obs)
        w = estimator_weights(obs.reshape(-1, K), g_obs, self.kT, self.scale_by_kT).reshape(F, L)
        grads: List[Optional[torch.Tensor]] = [None] * len(params)
        for s in range(0, F, self.minibatch_size):
            x = positions[s:s + self.minibatch_size].detach()
            e_loc = neighborhood_energies(self.atom_energy_fn(x), nb[s:s + x.shape[0]])
            _accumulate(params, (w[s:s + x.shape[0]].to(e_loc.dtype) * e_loc).sum(), grads, accumulate_into_grad)
        stats = {"loss": loss, "mean_observable": mean_obs, "loss_grad": g_obs, "n_samples": F * L}
        return _finish(params, grads, accumulate_into_grad), stats


# ------------------------------------------------------------- per-sample Jacobian (original)

class _Closure(torch.nn.Module):
    """Registers ``module`` so torch.func.functional_call can swap its parameters while ``fn``
    (which closes over ``module``) runs."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_fn", fn)  # plain attribute even if fn is itself a Module

    def forward(self, x):
        return self._fn(x)


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


def _per_sample_grads(fn: Callable, module: torch.nn.Module, x: torch.Tensor, chunk_size: Optional[int]):
    """Per-sample ∂ fn(x_i[None]).sum() / ∂θ for every x_i, by vmap over VJPs. Returns a list of
    (M, *p.shape) tensors aligned with the module's trainable parameters."""
    from torch.func import functional_call, grad, vmap

    wrap = _Closure(module, fn)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {"module." + n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

    def single(p, xi):
        return functional_call(wrap, p, (xi.unsqueeze(0),)).sum()

    with _preserve_parameters(module):
        g = vmap(grad(single), in_dims=(None, 0), chunk_size=chunk_size)(params, x.detach())
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
    obs = observables.detach()
    if obs.dim() == 1:
        obs = obs[:, None]
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
        return _per_sample_grads(energy_fn, module, positions[a:b], chunk_size)
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
    nb = torch.as_tensor(neighborhoods, dtype=torch.long, device=positions.device)
    if nb.dim() == 2:
        nb = nb[None].expand(F, -1, -1)
    L = nb.shape[1]
    obs = observables.detach()
    if obs.dim() == 2:
        obs = obs[..., None]
    obs = obs.reshape(F * L, -1)
    frame_of = torch.arange(F, device=positions.device).repeat_interleave(L)
    nb_flat = nb.reshape(F * L, nb.shape[-1])

    def G_fn(a, b):
        # one sample = (frame positions, its neighbourhood); pack the index set as extra "atoms"
        x = positions[frame_of[a:b]]
        idx = nb_flat[a:b]

        def fn(packed):
            xi, ii = packed
            return neighborhood_energies(atom_energy_fn(xi), ii[:, None, :])[:, 0]

        from torch.func import functional_call, grad, vmap
        wrap = _Closure(module, fn)
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = {"module." + n: p.detach() for n, p in module.named_parameters() if p.requires_grad}

        def single(p, xi, ii):
            return functional_call(wrap, p, ((xi.unsqueeze(0), ii.unsqueeze(0)),)).sum()

        with _preserve_parameters(module):
            g = vmap(grad(single), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x.detach(), idx)
        return [g["module." + n] for n in names]

    return _reference(G_fn, F * L, obs, loss_grad, kT, scale_by_kT, minibatch_size, module)
