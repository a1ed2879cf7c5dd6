"""The parameter update of a StABlE learning epoch: the Boltzmann-estimator gradient of the
observable loss plus the QM energy/force gradient, combined, clipped and applied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from mdsim.estimator import BoltzmannEstimator, LocalBoltzmannEstimator, squared_error_loss
from mdsim.data.format import SplitData
from mdsim.models import batch_from_frames
from mdsim.training.pretrain import EnergyForceLoss
from mdsim.training.targets import TrainingObservable


@dataclass
class EFLossSettings:
    """Pretraining loss settings (taken from the pretrained checkpoint's config)."""
    energy_coefficient: float = 0.05
    force_coefficient: float = 0.95
    loss_energy: str = "mse"
    loss_force: str = "mse"

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "EFLossSettings":
        optim = (ckpt.get("config") or {}).get("optim") or {}
        kw = {k: optim[k] for k in ("energy_coefficient", "force_coefficient", "loss_energy", "loss_force")
              if k in optim}
        return cls(**kw)


def energy_fn_for(model, atomic_numbers: Tensor, cell: Optional[Tensor], dtype):
    """U_θ(x) for positions (M, N, 3) → (M,) eV (with graph to the parameters)."""
    def fn(x: Tensor) -> Tensor:
        inp = batch_from_frames(x.to(dtype), atomic_numbers, cell, device=x.device, dtype=dtype)
        return model(**inp)
    return fn


def observable_gradient(model, target: TrainingObservable, samples: Tensor, atomic_numbers: Tensor,
                        cell: Optional[Tensor], kT: float, minibatch_size: int, scale_by_kT: bool,
                        dtype=torch.float32, shuffle_generator=None, comm=None,
                        observables: Optional[Tensor] = None):
    """Boltzmann-estimator gradient for samples (S, N, 3).  Returns (grads, loss).

    ``observables``: ``target.samples`` of these samples (S, K) when already computed (the
    epoch's monitoring observables), else computed here.  ``shuffle_generator``: the samples
    are permuted first (the minibatch order).  With a distributed ``comm`` the samples are this
    rank's share (already in the single-process order); the mean observable and the gradients
    are all-reduced, so every rank returns the gradient of all samples
    (:class:`mdsim.estimator.BoltzmannEstimator` with ``comm``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    sharded = comm is not None and comm.distributed
    O = None
    if samples.shape[0] or not sharded:
        if observables is not None:
            O = observables
        else:
            with torch.no_grad():
                O = target.samples(samples.to(torch.float64))
    if shuffle_generator is not None:
        perm = torch.randperm(samples.shape[0], generator=shuffle_generator)
        samples, O = samples[perm.to(samples.device)], O[perm.to(O.device)]
    est = BoltzmannEstimator(energy_fn_for(model, atomic_numbers, cell, dtype), minibatch_size, kT, scale_by_kT,
                             comm=comm if sharded else None)
    grads, stats = est.gradient(params, samples, O, target.loss)
    return grads, stats["loss"]


def energy_force_subset(n_frames: int, k: Optional[int], generator: torch.Generator) -> Optional[Tensor]:
    """Sorted indices of a random subset of ``k`` of ``n_frames`` training frames (without
    replacement), or None (all frames; nothing drawn) when ``k`` is None or ≥ ``n_frames``.  Every
    rank holds the same generator state, so every rank draws the same subset."""
    if k is None or k >= n_frames:
        return None
    return torch.randperm(n_frames, generator=generator)[:k].sort().values


def energy_force_gradient(model, data: SplitData, settings: EFLossSettings, minibatch_size: int,
                          device, dtype=torch.float32, max_frames: Optional[int] = None, comm=None,
                          frames: Optional[Tensor] = None):
    """Mean over unshuffled minibatches of ∇θ of the pretraining loss on ``data``.

    ``frames``: indices of the frames to use (e.g. :func:`energy_force_subset`), in minibatches
    of ``minibatch_size`` in that order; None = the first ``max_frames`` (all by default).  With
    a distributed ``comm`` the minibatches are dealt out to the ranks (batch b to rank b mod W)
    and the sums all-reduced: every rank returns the mean over all minibatches."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = EnergyForceLoss(settings)
    if frames is None:
        n = len(data) if max_frames is None else min(len(data), max_frames)
    else:
        frames = torch.as_tensor(frames, dtype=torch.long).cpu().numpy()
        n = len(frames)
    z = torch.as_tensor(data.z, device=device)
    total = [torch.zeros_like(p) for p in params]
    nb, lsum = 0, 0.0
    distributed = comm is not None and comm.distributed
    for b, s in enumerate(range(0, n, minibatch_size)):
        if distributed and b % comm.world_size != comm.rank:
            nb += 1
            continue
        sl = slice(s, min(n, s + minibatch_size))
        if frames is not None:
            sl = frames[sl]
        R = torch.as_tensor(data.R[sl], dtype=dtype, device=device)
        E = torch.as_tensor(data.E[sl], dtype=torch.float64, device=device)
        F = torch.as_tensor(data.F[sl], dtype=dtype, device=device)
        cell = None if data.cell is None else torch.as_tensor(data.cell[sl], dtype=dtype, device=device)
        loss, _, _ = loss_fn(model, R, z, E, F, cell)
        gs = torch.autograd.grad(loss, params, allow_unused=True)
        for t, g in zip(total, gs):
            if g is not None:
                t.add_(g)
        lsum += float(loss.detach())
        nb += 1
    if distributed:
        total = comm.all_reduce_tensors(total)
        (lsum,) = comm.sum_floats(lsum)
    return [t / max(nb, 1) for t in total], lsum / max(nb, 1)


def flat(grads: List[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def apply_update(model, optimizer, g_obs: Optional[List[Tensor]], g_ef: Optional[List[Tensor]],
                 obs_weight: float, ef_weight: float, clip: Optional[float]) -> Dict[str, float]:
    """Set ``p.grad = obs_weight·g_obs + ef_weight·g_ef``, clip, step.  Returns diagnostics
    (gradient norm before clipping, cosine similarity and median ratio of the two parts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    info: Dict[str, float] = {}
    parts = []
    if g_obs is not None:
        parts.append([obs_weight * g for g in g_obs])
    if g_ef is not None:
        parts.append([ef_weight * g for g in g_ef])
    if len(parts) == 2:
        a, b = flat(parts[0]), flat(parts[1])
        info["cosine"] = float(torch.nn.functional.cosine_similarity(a, b, dim=0, eps=1e-30))
        nz = b.abs() > 0
        info["ratio"] = float((a[nz] / b[nz]).abs().median()) if nz.any() else float("nan")
    for i, p in enumerate(params):
        p.grad = sum(part[i] for part in parts) if parts else torch.zeros_like(p)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
    info["grad_norm"] = float(norm)
    optimizer.step()
    return info


def local_observable_gradient(model, samples: Tensor, system, n_local_neighborhoods: int,
                              n_closest_molecules: int, kT: float, minibatch_size: int, scale_by_kT: bool,
                              dtype=torch.float32, generator=None):
    """Localized Boltzmann estimator (the original's water variant).

    Samples are (frame, neighbourhood) pairs: ``n_local_neighborhoods`` centre molecules per
    frame (distinct, random) with their ``n_closest_molecules`` nearest molecules; a sample's
    energy is the sum of the model's per-atom energies over the neighbourhood's atoms, its
    observable the centre molecule's bond lengths from its first atom (O–H for water), matched to
    the mean reference bond length.  Returns (grads, loss)."""
    from mdsim.observables import local_bond_lengths, local_neighborhoods

    params = [p for p in model.parameters() if p.requires_grad]
    cell = system.cell if system.pbc else None
    n_mol = int(system.molecule_index.max()) + 1
    L = min(int(n_local_neighborhoods), n_mol)
    x64 = samples.to(torch.float64)
    c64 = None if cell is None else cell.to(torch.float64)
    nb, _ = local_neighborhoods(x64, system.molecule_index, system.atomic_numbers, L, n_closest_molecules,
                                cell=c64, generator=generator)
    with torch.no_grad():
        O = local_bond_lengths(x64, nb, c64)  # (S, L, 2)
    loss = squared_error_loss(system.ref_bond_lengths.to(torch.float64).mean())
    z = system.atomic_numbers

    def atom_energy_fn(x: Tensor) -> Tensor:
        inp = batch_from_frames(x.to(dtype), z, cell, device=x.device, dtype=dtype)
        return model.atomic_energies(**inp).reshape(x.shape[0], -1)

    est = LocalBoltzmannEstimator(atom_energy_fn, minibatch_size, kT, scale_by_kT)
    grads, stats = est.gradient(params, samples, nb, O, loss)
    return grads, stats["loss"]
