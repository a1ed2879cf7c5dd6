"""One epoch of batched MD with recording at fixed strides (device-side, no per-step host sync)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mdsim.md.state import MDState


@dataclass
class EpochRecord:
    frames: Tensor  # (F, R, N, 3) positions every n_dump steps after eq_steps
    frame_steps: Tensor  # (F,) step (1-based, within the epoch) of each frame
    energies: Tensor  # (F, R) potential energy of each frame
    velocities: Optional[Tensor]  # (T, R, N, 3) every vstride steps after eq_steps (VACF)
    temperatures: Tensor  # (F, R) kinetic temperature at each frame


def simulate(integrator, force_fn, state: MDState, steps: int, n_dump: int, eq_steps: int = 0,
             vstride: int = 1, generator=None, record_velocities: bool = True,
             progress: bool = False, desc: str = "MD", backend: str = "eager") -> tuple:
    """Advance all replicas ``steps`` steps.  Returns (final state, :class:`EpochRecord`).

    ``backend`` (config ``md_backend``): ``eager`` runs the step functions as they are."""
    if backend != "eager":
        raise NotImplementedError(f"md_backend {backend!r} is not available yet; use eager")
    frames, fsteps, energies, temps, vels = [], [], [], [], []
    for t in tqdm(range(1, steps + 1), disable=not progress, desc=desc, leave=False):
        state = integrator.step(state, force_fn, generator)
        if t <= eq_steps:
            continue
        if record_velocities and (t - eq_steps) % vstride == 0:
            vels.append(state.velocities)
        if t % n_dump == 0:
            frames.append(state.positions)
            fsteps.append(t)
            energies.append(state.energy)
            temps.append(state.temperature())
    if not frames:  # always keep the last frame
        frames, fsteps, energies, temps = [state.positions], [steps], [state.energy], [state.temperature()]
    rec = EpochRecord(
        frames=torch.stack(frames), frame_steps=torch.tensor(fsteps), energies=torch.stack(energies),
        velocities=torch.stack(vels) if vels else None, temperatures=torch.stack(temps))
    return state, rec
