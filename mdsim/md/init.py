"""Initial conditions: Maxwell–Boltzmann velocities and starting frames for R replicas."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from mdsim.md.integrators import GeneratorLike, degrees_of_freedom, randn_like_replicas
from mdsim.md.state import MDState, kinetic_energy
from mdsim.units import KB


def maxwell_boltzmann_velocities(masses: Tensor, n_replicas: int, temperature: float,
                                 generator: GeneratorLike = None, rescale: bool = True,
                                 zero_momentum: bool = True, dtype=None, device=None,
                                 dof_convention: str = "physical") -> Tensor:
    """Velocities (R,N,3) in Å/ASE-time drawn from the Maxwell–Boltzmann law of each mass
    (p ~ N(0, m k_BT) per component).

    ``zero_momentum``: subtract the centre-of-mass velocity Σmv/Σm from every atom (net
    momentum 0; each atom's velocity then has variance (1 − m/M)k_BT/m per component, the
    exact Maxwell–Boltzmann law under the constraint).  ``rescale``: scale each replica so its
    kinetic energy is exactly (g/2)k_BT with g the degrees of freedom the velocities have
    (3N − 3 with zero momentum, else 3N; ``dof_convention="original"``: 3N always, as the
    original, which puts the energy of 3N degrees of freedom into 3N − 3).  Without rescaling
    the kinetic energy fluctuates canonically.  T = 0 gives zero velocities."""
    masses = torch.as_tensor(masses)
    dtype = dtype or masses.dtype
    device = device or masses.device
    m = masses.to(device=device, dtype=dtype)[None, :, None]
    N = m.shape[1]
    if temperature < 0:
        raise ValueError(f"temperature: expected >= 0 K, got {temperature}")
    xi = randn_like_replicas(torch.empty(n_replicas, N, 3, dtype=dtype, device=device), generator)
    v = xi * torch.sqrt(KB * temperature / m)
    if zero_momentum:
        v = v - (m * v).sum(dim=1, keepdim=True) / m.sum()
    if rescale and temperature > 0:
        g = degrees_of_freedom(N, zero_momentum, dof_convention)
        target = 0.5 * g * KB * temperature
        v = v * torch.sqrt(target / kinetic_energy(v, m[0, :, 0]))[:, None, None]
    return v


def select_frames(n_frames: int, n_replicas: int, mode: str = "first",
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Indices of starting frames: ``first`` → 0..R−1 (evaluation), ``random`` → R distinct
    frames drawn uniformly without replacement (training)."""
    if n_replicas < 1:
        raise ValueError(f"n_replicas: expected >= 1, got {n_replicas}")
    if n_replicas > n_frames:
        raise ValueError(f"n_replicas: {n_replicas} replicas need at least as many frames, the data has {n_frames}")
    if mode == "first":
        return torch.arange(n_replicas)
    if mode == "random":
        dev = generator.device if generator is not None else "cpu"
        return torch.randperm(n_frames, generator=generator, device=dev)[:n_replicas].cpu()
    raise ValueError(f"frame selection mode: expected 'first' or 'random', got {mode!r}")


def initial_state(system, frames, force_fn, n_replicas: int, temperature: float,
                  generator: Optional[torch.Generator] = None, mode: str = "first", rescale: bool = True,
                  ic_stddev: float = 0.0, cells=None, dtype=torch.float32, device="cpu",
                  velocities: Optional[Tensor] = None, dof_convention: str = "physical") -> MDState:
    """MDState of ``n_replicas`` replicas starting from dataset ``frames`` (F,N,3) Å.

    Frames are picked by :func:`select_frames`; optional Gaussian position noise ``ic_stddev`` (Å);
    Maxwell–Boltzmann velocities (or given ``velocities`` (R,N,3) in ASE units); forces from
    ``force_fn``; ζ = 0.  ``cells`` (F,3,3) per frame, else ``system.cell`` for periodic systems.
    The same ``generator`` draws frames, noise and velocities, in that order.
    ``dof_convention``: see :func:`maxwell_boltzmann_velocities`."""
    frames_t = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if frames_t.ndim != 3 or frames_t.shape[1:] != (system.n_atoms, 3):
        raise ValueError(f"frames: expected shape (frames, {system.n_atoms}, 3), got {tuple(frames_t.shape)}")
    idx = select_frames(frames_t.shape[0], n_replicas, mode, generator)
    pos = frames_t[idx].to(device=device, dtype=dtype)
    if ic_stddev:
        pos = pos + ic_stddev * randn_like_replicas(pos, generator)
    cell = None
    if cells is not None:
        cell = torch.as_tensor(np.asarray(cells))[idx].to(device=device, dtype=dtype)
    elif system.cell is not None and system.pbc:
        cell = system.cell.to(device=device, dtype=dtype).expand(n_replicas, 3, 3).clone()
    masses = system.masses.to(device=device, dtype=dtype)
    if velocities is None:
        vel = maxwell_boltzmann_velocities(masses, n_replicas, temperature, generator, rescale=rescale,
                                           dtype=dtype, device=device, dof_convention=dof_convention)
    else:
        vel = torch.as_tensor(velocities).to(device=device, dtype=dtype)
    e, f = force_fn(pos, cell)
    return MDState(positions=pos, velocities=vel, forces=f, energy=e, masses=masses, cell=cell)


def replace_replicas(state: MDState, mask: Tensor, source: MDState,
                     keep: tuple = ("replica", "step")) -> MDState:
    """State whose replicas ``mask`` (R,) are taken from ``source`` (same shapes), the others
    from ``state``.  The fields named in ``keep`` (default: replica ids and step counters) and the
    masses stay ``state``'s for every replica."""
    from dataclasses import fields, replace

    kw = {}
    for f in fields(state):
        if f.name == "masses" or f.name in keep:
            continue
        a, b = getattr(state, f.name), getattr(source, f.name)
        if a is None or b is None:
            continue
        m = mask.to(a.device).reshape((-1,) + (1,) * (a.ndim - 1))
        kw[f.name] = torch.where(m, b.to(a), a)
    return replace(state, **kw)


def reset_replicas(state: MDState, mask: Tensor, frames, force_fn, temperature: float,
                   generator: Optional[torch.Generator] = None, reset_probability: float = 0.0,
                   rescale: bool = True, cells=None, dof_convention: str = "physical"):
    """Restart replicas ``mask`` (R,) bool from random dataset ``frames`` (F,N,3) with fresh
    Maxwell–Boltzmann velocities, ζ = 0 and ``stable`` True.

    ``reset_probability`` p: additionally restart ceil(p·#stable) randomly chosen replicas outside
    ``mask``.  Step counters and replica ids are kept.  Frames are drawn without replacement
    when there are enough, else with replacement.  ``cells`` (F,3,3) give per-frame cells for
    periodic systems (else the state's cells are kept).  ``dof_convention``: see
    :func:`maxwell_boltzmann_velocities`.  Returns ``(new_state, reset_mask)``.
    Host-side (counts the replicas to reset); call it between rollouts, not inside a step."""
    import math

    R = state.n_replicas
    dev = state.positions.device
    mask = torch.as_tensor(mask, dtype=torch.bool).to(dev).reshape(R).clone()
    gdev = generator.device if generator is not None else "cpu"
    if reset_probability:
        if not 0.0 <= reset_probability <= 1.0:
            raise ValueError(f"reset_probability: expected a fraction in [0, 1], got {reset_probability}")
        stable_idx = torch.nonzero(~mask).reshape(-1)
        n_extra = math.ceil(reset_probability * stable_idx.numel())
        if n_extra:
            pick = torch.randperm(stable_idx.numel(), generator=generator, device=gdev)[:n_extra].to(dev)
            mask[stable_idx[pick]] = True
    idx = torch.nonzero(mask).reshape(-1)
    n = idx.numel()
    if n == 0:
        return state, mask
    frames_t = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if frames_t.ndim != 3 or frames_t.shape[1:] != (state.n_atoms, 3):
        raise ValueError(f"frames: expected shape (frames, {state.n_atoms}, 3), got {tuple(frames_t.shape)}")
    F = frames_t.shape[0]
    if n <= F:
        fidx = torch.randperm(F, generator=generator, device=gdev)[:n].cpu()
    else:
        fidx = torch.randint(F, (n,), generator=generator, device=gdev).cpu()
    dtype = state.positions.dtype
    pos = state.positions.clone()
    pos[idx] = frames_t[fidx].to(device=dev, dtype=dtype)
    cell = state.cell
    if cells is not None and cell is not None:
        cell = cell.clone()
        cell[idx] = torch.as_tensor(np.asarray(cells))[fidx].to(device=dev, dtype=dtype)
    vel = state.velocities.clone()
    vel[idx] = maxwell_boltzmann_velocities(state.masses, n, temperature, generator, rescale=rescale,
                                            dtype=dtype, device=dev, dof_convention=dof_convention)
    e, f = force_fn(pos, cell)
    m3 = mask[:, None, None]
    new = MDState(positions=pos, velocities=vel,
                  forces=torch.where(m3, f, state.forces), energy=torch.where(mask, e, state.energy),
                  masses=state.masses, cell=cell,
                  zeta=torch.where(mask, torch.zeros_like(state.zeta), state.zeta),
                  step=state.step, stable=state.stable | mask, replica=state.replica)
    return new, mask
