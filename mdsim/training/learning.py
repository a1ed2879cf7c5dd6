"""The parameter update of a StABlE learning epoch: the Boltzmann-estimator gradient of the
observable loss plus the QM energy/force gradient, combined, clipped and applied."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor

from boltzmann_estimator import BoltzmannEstimator, resolve_loss_grad
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
                        dtype=torch.float32, shuffle_generator=None):
    """Boltzmann-estimator gradient for samples (S, N, 3).  Returns (grads, loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        O = target.samples(samples.to(torch.float64))
    if shuffle_generator is not None:
        perm = torch.randperm(samples.shape[0], generator=shuffle_generator)
        samples, O = samples[perm.to(samples.device)], O[perm.to(O.device)]
    est = BoltzmannEstimator(energy_fn_for(model, atomic_numbers, cell, dtype), minibatch_size, kT, scale_by_kT)
    grads, stats = est.gradient(params, samples, O, target.loss)
    return grads, stats["loss"]


def sharded_observable_gradient(model, target: TrainingObservable, samples: Tensor, atomic_numbers: Tensor,
                                cell: Optional[Tensor], kT: float, minibatch_size: int, scale_by_kT: bool,
                                comm, dtype=torch.float32):
    """Boltzmann-estimator gradient when the samples are spread over ranks (this rank holds
    ``samples`` (S_r, N, 3)); every rank returns the gradient of all samples.

    The estimator is linear in the samples once the global mean observable is known:
    all-reduce Σ O_i and the sample count → ⟨O⟩ and ∂L/∂⟨O⟩ (the same on every rank); each
    rank weights its samples by w_i = −(s_i − s̄)/(N kT), s_i = O_i·∂L/∂⟨O⟩, s̄ = ⟨O⟩·∂L/∂⟨O⟩,
    back-propagates Σ_i w_i U_θ(x_i) over its minibatches, and the gradients are all-reduce
    summed.  Returns (grads, loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    S = samples.shape[0]
    with torch.no_grad():
        O = target.samples(samples.to(torch.float64)) if S else None
    if O is not None and O.dim() == 1:
        O = O[:, None]
    # the observable's length (a rank may hold no samples)
    K = int(comm.all_reduce(torch.tensor([O.shape[1] if O is not None else 0], device=comm.device), "max").item())
    dev = comm.device
    buf = torch.zeros(K + 1, dtype=torch.float64, device=dev)
    if O is not None:
        buf[:K] = O.sum(0).to(dev)
        buf[K] = S
    comm.all_reduce(buf)
    n_total = float(buf[K])
    if n_total == 0:
        return [torch.zeros_like(p) for p in params], float("nan")
    mean_obs = buf[:K] / n_total
    g_obs, loss = resolve_loss_grad(target.loss, mean_obs)
    grads = [torch.zeros_like(p) for p in params]
    if O is not None:
        g = g_obs.to(O)
        s = O @ g
        w = -(s - mean_obs.to(O) @ g) / n_total
        if scale_by_kT:
            w = w / kT
        energy_fn = energy_fn_for(model, atomic_numbers, cell, dtype)
        for a in range(0, S, minibatch_size):
            x = samples[a:a + minibatch_size].detach()
            e = energy_fn(x).reshape(-1)
            gs = torch.autograd.grad((w[a:a + x.shape[0]].to(e) * e).sum(), params, allow_unused=True)
            for t, gi in zip(grads, gs):
                if gi is not None:
                    t.add_(gi)
    return _all_reduce_grads(comm, grads), loss


def _all_reduce_grads(comm, grads: List[Tensor]) -> List[Tensor]:
    """Sum a list of gradients over ranks (one flat buffer, one collective)."""
    if not comm.distributed or not grads:
        return grads
    flat_g = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    out, i = [], 0
    for g in grads:
        out.append(flat_g[i:i + g.numel()].view_as(g))
        i += g.numel()
    return out


def energy_force_gradient(model, data: SplitData, settings: EFLossSettings, minibatch_size: int,
                          device, dtype=torch.float32, max_frames: Optional[int] = None, comm=None):
    """Mean over unshuffled minibatches of ∇θ of the pretraining loss on ``data``.

    With a distributed ``comm`` the minibatches are dealt out to the ranks (batch b to rank
    b mod W) and the sums all-reduced: every rank returns the mean over all minibatches."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = EnergyForceLoss(settings)
    n = len(data) if max_frames is None else min(len(data), max_frames)
    z = torch.as_tensor(data.z, device=device)
    total = [torch.zeros_like(p) for p in params]
    nb, lsum = 0, 0.0
    distributed = comm is not None and comm.distributed
    for b, s in enumerate(range(0, n, minibatch_size)):
        if distributed and b % comm.world_size != comm.rank:
            nb += 1
            continue
        sl = slice(s, min(n, s + minibatch_size))
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
        total = _all_reduce_grads(comm, total)
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
    from boltzmann_estimator import LocalBoltzmannEstimator
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
    target = system.ref_bond_lengths.to(torch.float64).mean()

    def loss(mean_obs):
        return ((mean_obs - target.to(mean_obs)) ** 2).sum()

    z = system.atomic_numbers

    def atom_energy_fn(x: Tensor) -> Tensor:
        inp = batch_from_frames(x.to(dtype), z, cell, device=x.device, dtype=dtype)
        return model.atomic_energies(**inp).reshape(x.shape[0], -1)

    est = LocalBoltzmannEstimator(atom_energy_fn, minibatch_size, kT, scale_by_kT)
    grads, stats = est.gradient(params, samples, nb, O, loss)
    return grads, stats["loss"]
