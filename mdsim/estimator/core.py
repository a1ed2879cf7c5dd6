"""The one weighting/chunking core of the Boltzmann estimator (spec §5, one backward pass).

For samples x_i ~ exp(−U_θ(x)/kT) and a loss L(⟨O⟩) of ensemble averages,

    ∂L/∂θ = −(1/kT) Σ_k (∂L/∂⟨O_k⟩) Cov(O_k, ∂U/∂θ).

With s_i = Σ_k (∂L/∂⟨O_k⟩) O_k(x_i) this is the gradient of the scalar surrogate

    S(θ) = Σ_i w_i U_θ(x_i),   w_i = −(s_i − s̄) / (N kT)   (w detached),

because Σ_i (s_i − s̄) = 0 makes the Ḡ term of the covariance vanish.  One backward pass of S
gives the estimator without ever forming the per-sample Jacobian ∂U(x_i)/∂θ (memory O(P), not
O(N·P)).  ``scale_by_kT=False`` (config key ``boltzmann_scale_by_kT``) drops the 1/kT factor as
the original does, which makes the gradient kT times *smaller* (kT ≈ 0.043 eV at 500 K).

Three variants share :func:`estimator_weights` and :func:`weighted_energy_gradient`:

* :class:`BoltzmannEstimator`: samples = structures, U = total energy;
* :class:`LocalBoltzmannEstimator`: samples = (frame, neighbourhood) pairs, U = sum of per-atom
  energies over the neighbourhood (the original's water variant);
* ``BoltzmannEstimator(..., comm=...)``: samples spread over ranks; the mean observable and the
  gradients are all-reduced (``comm`` needs ``all_reduce(t, op)``, ``all_reduce_tensors(list)``
  and ``device``, e.g. :class:`mdsim.training.distributed.Comm`).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from mdsim.observables.water import neighborhood_energies

LossGrad = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


# ------------------------------------------------------------------------------- losses

def squared_error_loss(target: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """L(⟨O⟩) = Σ_k (⟨O_k⟩ − O*_k)², the original's loss (gradient 2(⟨O⟩ − O*)).  A scalar
    ``target`` is compared with every component."""
    def loss(mean_obs: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(target, dtype=mean_obs.dtype, device=mean_obs.device)
        if t.numel() != 1:
            t = t.reshape(mean_obs.shape)
        return ((mean_obs - t) ** 2).sum()
    return loss


def mean_squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean_k (a_k − b_k)²: the logged observable losses (spec §5, "Logged losses")."""
    return float(((a - b.to(a)) ** 2).mean())


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


# ------------------------------------------------------------------------------ weights

def as_sample_matrix(observables: torch.Tensor) -> torch.Tensor:
    """Detached (N, K) view of per-sample observables given as (N, K) or (N,)."""
    o = observables.detach()
    return o[:, None] if o.dim() == 1 else o


def as_local_observables(observables: torch.Tensor) -> torch.Tensor:
    """Detached (F, L, K) view of local observables given as (F, L, K) or (F, L)."""
    o = observables.detach()
    return o[..., None] if o.dim() == 2 else o


def estimator_weights(observables: torch.Tensor, loss_grad: torch.Tensor, kT: float,
                      scale_by_kT: bool = True, mean_observable: Optional[torch.Tensor] = None,
                      n_total: Optional[float] = None) -> torch.Tensor:
    """Detached per-sample weights w_i = −(s_i − s̄)/(N·kT), s_i = O_i · ∂L/∂⟨O⟩.

    observables (N, K) (or (N,) for K = 1), loss_grad (K,) → (N,).  By default s̄ and N are
    those of these samples; when they are part of a larger set (other ranks), pass the set's
    ``mean_observable`` (s̄ = ⟨O⟩·∂L/∂⟨O⟩) and size ``n_total``.  Without ``scale_by_kT`` the 1/kT
    factor is dropped (original scaling)."""
    o = as_sample_matrix(observables)
    g = torch.as_tensor(loss_grad, dtype=o.dtype, device=o.device).detach().reshape(-1)
    s = o @ g
    if mean_observable is None:
        w = -(s - s.mean()) / s.shape[0]
    else:
        w = -(s - mean_observable.to(o) @ g) / (s.shape[0] if n_total is None else n_total)
    if scale_by_kT:
        w = w / kT
    return w


def weighted_energy_gradient(params: Sequence[torch.Tensor], chunk_energy: Callable[[int, int], torch.Tensor],
                             weights: torch.Tensor, minibatch_size: int,
                             accumulate_into_grad: bool = False) -> List[torch.Tensor]:
    """∇θ Σ_i w_i U_θ(x_i), evaluated in chunks of ``minibatch_size`` rows of ``weights``.

    ``chunk_energy(a, b)`` returns the energies (with graph) of sample rows [a, b), shaped like
    ``weights[a:b]``.  Each chunk's weighted sum is back-propagated on its own, so memory is that
    of one chunk.  With ``accumulate_into_grad`` the chunks add into ``p.grad`` and the result is
    the ``.grad`` tensors (including what was there before)."""
    params = list(params)
    grads: List[Optional[torch.Tensor]] = [None] * len(params)
    n = weights.shape[0]
    for a in range(0, n, minibatch_size):
        b = min(a + minibatch_size, n)
        e = chunk_energy(a, b)
        surrogate = (weights[a:b].to(e) * e).sum()
        if accumulate_into_grad:
            surrogate.backward()
            continue
        for i, g in enumerate(torch.autograd.grad(surrogate, params, allow_unused=True)):
            if g is not None:
                grads[i] = g.detach() if grads[i] is None else grads[i] + g.detach()
    if accumulate_into_grad:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


# ----------------------------------------------------------------------------- surrogates

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


# ------------------------------------------------------------------------------ estimators

def _stats(loss, mean_obs, g_obs, n) -> Dict:
    return {"loss": loss, "mean_observable": mean_obs, "loss_grad": g_obs, "n_samples": n}


class BoltzmannEstimator:
    """Minibatched Boltzmann estimator with exact full-batch centring.

    ``energy_fn(positions [M, N, 3]) -> energies [M]`` evaluates U_θ (closing over the model,
    atomic numbers, cell, …).  :meth:`gradient` first computes the mean observable over ALL
    samples (and ∂L/∂⟨O⟩ from it), then evaluates energies chunk by chunk, back-propagating each
    chunk's weighted sum, so the result equals one big batch while memory is that of one chunk.

    With a ``comm`` (samples spread over ranks) the mean observable is all-reduced first (a rank
    may hold no samples: pass ``observables=None``) and the gradients are summed over ranks, so
    every rank gets the gradient of all samples."""

    def __init__(self, energy_fn: Callable[[torch.Tensor], torch.Tensor], minibatch_size: int, kT: float,
                 scale_by_kT: bool = True, comm=None):
        self.energy_fn = energy_fn
        self.minibatch_size = int(minibatch_size)
        self.kT = float(kT)
        self.scale_by_kT = bool(scale_by_kT)
        self.comm = comm

    def gradient(self, params: Sequence[torch.Tensor], positions: torch.Tensor,
                 observables: Optional[torch.Tensor], loss_grad: LossGrad,
                 accumulate_into_grad: bool = False) -> Tuple[List[torch.Tensor], Dict]:
        """Estimator gradient for samples ``positions`` (S, N, 3) with ``observables`` (S, K).

        ``loss_grad``: ∂L/∂⟨O⟩ (K,) or a callable of the mean observable (see
        :func:`resolve_loss_grad`).  Returns (list of gradients aligned with ``params``, stats
        dict with ``loss``, ``mean_observable``, ``loss_grad``, ``n_samples``).  With
        ``accumulate_into_grad`` the chunks' backward passes add into ``p.grad`` instead (the
        returned list is then the resulting ``.grad`` tensors, including what was there before)."""
        if self.comm is not None:
            return self._sharded_gradient(list(params), positions, observables, loss_grad)
        obs = as_sample_matrix(observables)
        mean_obs = obs.mean(0)
        g_obs, loss = resolve_loss_grad(loss_grad, mean_obs)
        w = estimator_weights(obs, g_obs, self.kT, self.scale_by_kT)
        grads = weighted_energy_gradient(params, self._chunk_energy(positions), w, self.minibatch_size,
                                         accumulate_into_grad)
        return grads, _stats(loss, mean_obs, g_obs, positions.shape[0])

    def _chunk_energy(self, positions):
        return lambda a, b: self.energy_fn(positions[a:b].detach()).reshape(-1)

    def _sharded_gradient(self, params, positions, observables, loss_grad):
        comm, dev = self.comm, self.comm.device
        obs = None if observables is None else as_sample_matrix(observables)
        S = 0 if obs is None else obs.shape[0]
        # the observable's length (a rank may hold no samples), then Σ O_i and the sample count
        K = int(comm.all_reduce(torch.tensor([obs.shape[1] if obs is not None else 0], device=dev), "max").item())
        buf = torch.zeros(K + 1, dtype=torch.float64, device=dev)
        if obs is not None:
            buf[:K] = obs.sum(0).to(dev)
            buf[K] = S
        comm.all_reduce(buf)
        n_total = float(buf[K])
        if n_total == 0:
            return [torch.zeros_like(p) for p in params], _stats(float("nan"), None, None, 0)
        mean_obs = buf[:K] / n_total
        g_obs, loss = resolve_loss_grad(loss_grad, mean_obs)
        grads = [torch.zeros_like(p) for p in params]
        if obs is not None:
            w = estimator_weights(obs, g_obs, self.kT, self.scale_by_kT, mean_obs, n_total)
            grads = weighted_energy_gradient(params, self._chunk_energy(positions), w, self.minibatch_size)
        return comm.all_reduce_tensors(grads), _stats(loss, mean_obs, g_obs, int(n_total))


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
        F = positions.shape[0]
        obs = as_local_observables(observables)
        L, K = obs.shape[1], obs.shape[2]
        nb = expand_neighborhoods(neighborhoods, F, positions.device)
        mean_obs = obs.reshape(-1, K).mean(0)
        g_obs, loss = resolve_loss_grad(loss_grad, mean_obs)
        w = estimator_weights(obs.reshape(-1, K), g_obs, self.kT, self.scale_by_kT).reshape(F, L)

        def chunk_energy(a, b):
            return neighborhood_energies(self.atom_energy_fn(positions[a:b].detach()), nb[a:b])

        grads = weighted_energy_gradient(params, chunk_energy, w, self.minibatch_size, accumulate_into_grad)
        return grads, _stats(loss, mean_obs, g_obs, F * L)


def expand_neighborhoods(neighborhoods: torch.Tensor, n_frames: int, device) -> torch.Tensor:
    """(F, L, S) long tensor from per-frame (F, L, S) or shared (L, S) neighbourhood indices."""
    nb = torch.as_tensor(neighborhoods, dtype=torch.long, device=device)
    return nb[None].expand(n_frames, -1, -1) if nb.dim() == 2 else nb
