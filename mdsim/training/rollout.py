"""One epoch of batched MD with recording at fixed strides (device-side, no per-step host sync)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mdsim.md.state import MDState
from mdsim.units import KB


@dataclass
class EpochRecord:
    frames: Tensor  # (F, R, N, 3) positions every n_dump steps after eq_steps
    frame_steps: Tensor  # (F,) step (1-based, within the epoch) of each frame
    energies: Tensor  # (F, R) potential energy of each frame
    velocities: Optional[Tensor]  # (T, R, N, 3) every vstride steps after eq_steps (VACF)
    temperatures: Tensor  # (F, R) kinetic temperature at each frame


def _temperature(velocities: Tensor, masses: Tensor) -> Tensor:
    """(R,) kinetic temperature, the same arithmetic as :meth:`MDState.temperature`."""
    ke = 0.5 * (masses[None, :, None] * velocities ** 2).sum(dim=(1, 2))
    return 2.0 * ke / (3 * velocities.shape[1] * KB)


def simulate(integrator, force_fn, state: MDState, steps: int, n_dump: int, eq_steps: int = 0,
             vstride: int = 1, generator=None, record_velocities: bool = True,
             progress: bool = False, desc: str = "MD", backend: str = "eager",
             compile_backend: str = "inductor", block_steps: Optional[int] = None,
             stepper_options: Optional[dict] = None) -> tuple:
    """Advance all replicas ``steps`` steps.  Returns (final state, :class:`EpochRecord`).

    ``backend`` (config ``md_backend``): ``eager`` runs the step functions as they are;
    ``compile`` runs a ``torch.compile``d step (``compile_backend``, inductor by default);
    ``cuda_graph`` replays CUDA graphs of ``block_steps`` steps (default ``n_dump``, at most
    200) on CUDA and falls back to ``compile`` elsewhere (see :mod:`mdsim.md.compiled`;
    periodic systems always run eager).  All backends draw the same Langevin noise from
    ``generator`` in the same order, so results agree with eager to float rounding.
    ``stepper_options``: further :class:`mdsim.md.compiled.FastStepper` options
    (``compile_mode``, ``fullgraph``, ``warmup_steps``, ``emulate_graph``).  Recording,
    stability and resets stay on the host side, between steps or blocks."""
    frames, fsteps, energies, temps, vels = [], [], [], [], []

    def record(t, positions, velocities, energy, copy=False):
        if t <= eq_steps:
            return
        keep = (lambda x: x.clone()) if copy else (lambda x: x)  # views of a reused block: copy
        if record_velocities and (t - eq_steps) % vstride == 0:
            vels.append(keep(velocities))
        if t % n_dump == 0:
            frames.append(keep(positions))
            fsteps.append(t)
            energies.append(keep(energy))
            temps.append(_temperature(velocities, state.masses))

    stepper = None
    if backend != "eager":
        from mdsim.md.compiled import get_stepper
        k = block_steps if block_steps is not None else min(max(int(n_dump), 1), 200)
        stepper = get_stepper(integrator, force_fn, state, backend, compile_backend=compile_backend,
                              block_steps=k, **(stepper_options or {}))
        if stepper.backend == "eager":
            stepper = None
    if stepper is None:
        for t in tqdm(range(1, steps + 1), disable=not progress, desc=desc, leave=False):
            state = integrator.step(state, force_fn, generator)
            record(t, state.positions, state.velocities, state.energy)
    else:
        stacked = stepper.backend == "cuda_graph"  # block outputs are (K, ...) tensors
        t = 0
        with tqdm(total=steps, disable=not progress, desc=desc, leave=False) as bar:
            while t < steps:
                k = min(stepper.block_steps, steps - t)
                state, blk = stepper.run(state, k, generator)
                for j in range(k):
                    record(t + j + 1, blk.positions[j], blk.velocities[j], blk.energy[j], copy=stacked)
                t += k
                bar.update(k)
    if not frames:  # always keep the last frame
        frames, fsteps, energies, temps = [state.positions], [steps], [state.energy], [state.temperature()]
    rec = EpochRecord(
        frames=torch.stack(frames), frame_steps=torch.tensor(fsteps), energies=torch.stack(energies),
        velocities=torch.stack(vels) if vels else None, temperatures=torch.stack(temps))
    return state, rec
