"""The composed rollout loop and the public :class:`Simulator`.

Layering (JAX-MD/TorchSim style): a :class:`~mdsim.md.forces.ForceField` (energy) and an
:class:`~mdsim.md.integrators.Integrator` (dynamics) are composed by :func:`rollout`, which
steps a batched :class:`~mdsim.md.state.MDState` and stores requested fields into a
:class:`Recorder` on the device.  Host work (stability checks, thermo lines, trajectory dumps,
progress bar) happens only in the ``on_check`` callback every ``check_every`` steps, so the
steps in between never synchronise with the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from mdsim.md.forces import ForceField, as_force_field
from mdsim.md.init import initial_state, replace_replicas, reset_replicas
from mdsim.md.integrators import GeneratorLike, Integrator, make_integrator
from mdsim.md.stability import StabilityTracker, stability_values
from mdsim.md.state import MDState
from mdsim.md.system import System

RECORDABLE = ("positions", "velocities", "forces", "energy", "accelerations")


class Recorder:
    """Preallocated on-device storage of post-step fields.

    Step k = 1..n_steps of a rollout (k counted from the rollout's start) is stored when
    ``k > start`` and ``(k − start) % every == 0``; ``every=1, start=eq_steps`` stores every
    post-step state after equilibration (what the VACF needs), and ``frames(name, stride)`` gives
    every ``stride``-th stored frame (e.g. ``stride=n_dump`` for the estimator).  Fields:
    positions, velocities, forces, accelerations (F/m), energy.  Buffers are (T, R, N, 3) or
    (T, R); ``steps`` (T,) holds the rollout step of each slot."""

    def __init__(self, n_steps: int, every: int = 1, start: int = 0,
                 fields: Sequence[str] = ("positions", "velocities"), device=None, dtype=None):
        if every < 1:
            raise ValueError(f"record_every: expected >= 1, got {every}")
        if start < 0:
            raise ValueError(f"record_start (eq_steps): expected >= 0, got {start}")
        bad = [f for f in fields if f not in RECORDABLE]
        if bad:
            raise ValueError(f"record fields: {bad} not in {RECORDABLE}")
        self.n_steps, self.every, self.start = int(n_steps), int(every), int(start)
        self.fields = tuple(fields)
        self.n_frames = max(0, (self.n_steps - self.start) // self.every)
        self.steps = torch.arange(1, self.n_frames + 1) * self.every + self.start
        self.device, self.dtype = device, dtype
        self.buffers: Dict[str, Tensor] = {}

    def slot(self, k: int) -> Optional[int]:
        """Buffer slot of rollout step k, or None if not recorded (host arithmetic only)."""
        if k <= self.start or (k - self.start) % self.every:
            return None
        s = (k - self.start) // self.every - 1
        return s if s < self.n_frames else None

    def _value(self, name: str, state: MDState) -> Tensor:
        if name == "accelerations":
            return state.forces / state.masses.to(state.forces)[None, :, None]
        return getattr(state, name)

    def record(self, k: int, state: MDState) -> None:
        s = self.slot(k)
        if s is None:
            return
        for name in self.fields:
            v = self._value(name, state).detach()
            buf = self.buffers.get(name)
            if buf is None:
                buf = torch.empty((self.n_frames,) + tuple(v.shape), dtype=self.dtype or v.dtype,
                                  device=self.device or v.device)
                self.buffers[name] = buf
            buf[s].copy_(v)

    def frames(self, name: str, stride: int = 1) -> Tensor:
        if name not in self.buffers:
            raise KeyError(f"field {name!r} was not recorded (recorded: {sorted(self.buffers)})")
        return self.buffers[name][::stride]

    def __getitem__(self, name: str) -> Tensor:
        return self.frames(name)


def rollout(state: MDState, step_fn: Callable[[MDState], MDState], n_steps: int,
            recorder: Optional[Recorder] = None, check_every: Optional[int] = None,
            on_check: Optional[Callable[[int, MDState], None]] = None) -> MDState:
    """Apply ``step_fn`` ``n_steps`` times.  ``recorder.record(k, state)`` after every step k;
    ``on_check(k, state)`` at k = 0 and every ``check_every`` steps (and at the last step)."""
    with torch.no_grad():
        if on_check is not None:
            on_check(0, state)
        for k in range(1, n_steps + 1):
            state = step_fn(state)
            if recorder is not None:
                recorder.record(k, state)
            if on_check is not None and check_every and (k % check_every == 0 or k == n_steps):
                on_check(k, state)
    return state


@dataclass
class RunResult:
    """What :meth:`Simulator.run` returns.

    ``recorder``: recorded frames (or None); ``stable``/``first_unstable_step`` (R,): per-replica
    stability (step on the simulator's global step counter, −1 if never unstable);
    ``stability_time_ps`` (R,); ``check_steps`` (C,) global steps of the checks and
    ``check_values``/``check_unstable``/``epot``/``ekin``/``temperature`` (C, R) on the host."""

    state: MDState
    recorder: Optional[Recorder]
    tracker: StabilityTracker
    stable: Tensor
    first_unstable_step: Tensor
    stability_time_ps: Tensor
    check_steps: Tensor
    check_values: Tensor
    check_unstable: Tensor
    epot: Tensor
    ekin: Tensor
    temperature: Tensor
    extra: dict = field(default_factory=dict)

    def frames(self, name: str, stride: int = 1) -> Tensor:
        if self.recorder is None:
            raise KeyError("nothing was recorded (run with record=True)")
        return self.recorder.frames(name, stride)


class Simulator:
    """Batched multi-replica MD of one :class:`System`.

    ``force_field``: a :class:`ForceField`, a model (``torch.nn.Module`` with the package model
    interface) or a potential callable.  ``integrator``: VelocityVerlet | Langevin (BAOAB) |
    LangevinOriginal | NoseHoover; ``integrator_config``: ``gamma`` (ps⁻¹), ``ttime`` (steps).
    ``n_dump``: stride (steps) of host work — stability checks, thermo lines, trajectory frames.
    ``out_dir``: if set, ``thermo.csv`` and ``replica_<r>.extxyz`` files are written there
    (``dump_replicas``: replica ids to write, default all; ``write_trajectory=False`` for thermo
    only).  ``seed``/``generator``: random stream for velocities, frames and Langevin noise.
    ``value_fn``: custom monitored value for stability criteria like ``rdf``.
    """

    def __init__(self, force_field, system: System, integrator: str = "NoseHoover", timestep_fs: float = 0.5,
                 temperature_K: float = 500.0, integrator_config: Optional[dict] = None, n_dump: int = 100,
                 out_dir=None, dump_replicas: Optional[Sequence[int]] = None, write_trajectory: bool = True,
                 seed: Optional[int] = None, generator: GeneratorLike = None, device="cpu",
                 dtype: torch.dtype = torch.float32, value_fn: Optional[Callable] = None):
        if not (isinstance(n_dump, int) and n_dump >= 1):
            raise ValueError(f"n_dump: expected a positive integer number of steps, got {n_dump!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.system = system.to(device=self.device, dtype=dtype)
        self.force_field: ForceField = as_force_field(force_field, self.system.atomic_numbers)
        self.integrator: Integrator = make_integrator(integrator, timestep_fs, temperature_K, integrator_config)
        self.timestep_fs = float(timestep_fs)
        self.temperature_K = None if temperature_K is None else float(temperature_K)
        self.n_dump = n_dump
        self.value_fn = value_fn
        if generator is None:
            generator = torch.Generator(device=self.device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(int(seed))
        self.generator = generator
        self.global_step = 0
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.dump_replicas = dump_replicas
        self.write_trajectory = write_trajectory
        self._thermo = None
        self._traj = None
        self._files_started = False

    # -- building blocks ---------------------------------------------------------------
    def compute(self, positions: Tensor, cell: Optional[Tensor] = None):
        return self.force_field(positions, cell)

    def step(self, state: MDState) -> MDState:
        return self.integrator.step(state, self.force_field, generator=self.generator)

    def initial_state(self, frames, n_replicas: int, mode: str = "first", rescale: bool = True,
                      ic_stddev: float = 0.0, cells=None, velocities: Optional[Tensor] = None) -> MDState:
        """R replicas from dataset ``frames`` (F,N,3) Å: ``mode='first'`` (eval) or ``'random'``
        (train, without replacement); Maxwell–Boltzmann velocities at ``temperature_K``."""
        T = self.temperature_K if self.temperature_K is not None else 0.0
        g = self.generator if isinstance(self.generator, torch.Generator) else None
        return initial_state(self.system, frames, self.force_field, n_replicas, T, generator=g, mode=mode,
                             rescale=rescale, ic_stddev=ic_stddev, cells=cells, dtype=self.dtype,
                             device=self.device, velocities=velocities)

    def reset_replicas(self, state: MDState, mask: Tensor, frames, reset_probability: float = 0.0,
                       rescale: bool = True, cells=None):
        """Restart replicas ``mask`` from random ``frames`` (see :func:`mdsim.md.init.reset_replicas`)."""
        g = self.generator if isinstance(self.generator, torch.Generator) else None
        return reset_replicas(state, mask, frames, self.force_field, self.temperature_K or 0.0, generator=g,
                              reset_probability=reset_probability, rescale=rescale, cells=cells)

    replace_replicas = staticmethod(replace_replicas)

    def check_stability(self, positions: Tensor, cell: Optional[Tensor] = None, energy: Optional[Tensor] = None):
        """``(unstable, value)`` for positions (..., N, 3) by the system's criterion."""
        return stability_values(positions, self.system, cell=cell, energy=energy, value_fn=self.value_fn)

    def check_frames(self, recorder_or_frames, stride: int = 1, tracker: Optional[StabilityTracker] = None,
                     steps: Optional[Tensor] = None):
        """Vectorised check of recorded positions (T,R,N,3) (or a Recorder, every ``stride``-th
        frame).  Updates ``tracker`` if given.  Returns ``(unstable (T,R), value (T,R))``."""
        if isinstance(recorder_or_frames, Recorder):
            pos = recorder_or_frames.frames("positions", stride)
            steps = recorder_or_frames.steps[::stride] if steps is None else steps
        else:
            pos = recorder_or_frames[::stride]
        unstable, value = self.check_stability(pos)
        if tracker is not None:
            if steps is None:
                raise ValueError("check_frames: steps are needed to update a tracker")
            tracker.update_frames(unstable, steps, value)
        return unstable, value

    # -- output --------------------------------------------------------------------------
    def _writers(self, n_replicas):
        if self.out_dir is None:
            return None, None
        from mdsim.md.io import ThermoWriter, TrajectoryWriter
        if self._thermo is None:
            # first opening truncates old files; after close() later runs append
            append = self._files_started
            self._thermo = ThermoWriter(self.out_dir / "thermo.csv", append=append)
            if self.write_trajectory:
                self._traj = TrajectoryWriter(self.out_dir, self.system.atomic_numbers, self.system.masses,
                                              replicas=self.dump_replicas, pbc=self.system.pbc, append=append)
            self._files_started = True
        return self._thermo, self._traj

    def close(self) -> None:
        """Close output files (a later ``run`` appends to them)."""
        if self._thermo is not None:
            self._thermo.close()
        if self._traj is not None:
            self._traj.close()
        self._thermo, self._traj = None, None

    # -- the loop -------------------------------------------------------------------------
    def run(self, state: MDState, n_steps: int, record: Union[bool, Recorder] = False,
            record_every: Optional[int] = None, record_start: int = 0,
            record_fields: Sequence[str] = ("positions", "velocities"), check_every: Optional[int] = None,
            progress: bool = True, tracker: Optional[StabilityTracker] = None,
            write: bool = True) -> RunResult:
        """Integrate ``n_steps`` steps.

        ``record``: False; True → a :class:`Recorder` storing ``record_fields`` every
        ``record_every`` steps (default ``n_dump``) after ``record_start`` steps; or a Recorder.
        ``check_every`` (default ``n_dump``): stride of stability checks and output, also done
        at step 0 and at the last step.  ``tracker``: continue an existing
        :class:`StabilityTracker` (default: a new one).  ``write``: write files if ``out_dir``.
        Steps are counted on ``self.global_step`` (continues across calls)."""
        if not (isinstance(n_steps, int) and n_steps >= 0):
            raise ValueError(f"n_steps: expected a non-negative integer, got {n_steps!r}")
        check_every = check_every or self.n_dump
        if isinstance(record, Recorder):
            recorder = record
        elif record:
            recorder = Recorder(n_steps, every=record_every or self.n_dump, start=record_start,
                                fields=record_fields)
        else:
            recorder = None
        R = state.n_replicas
        if tracker is None:
            tracker = StabilityTracker(R, self.system.stability_criterion, device=state.positions.device,
                                       dtype=state.positions.dtype)
        thermo, traj = self._writers(R) if write else (None, None)
        start = self.global_step
        log = {"steps": [], "values": [], "unstable": [], "epot": [], "ekin": [], "temperature": []}
        bar = None
        if progress and n_steps >= 10 * check_every:
            try:
                from tqdm.auto import tqdm
                bar = tqdm(total=n_steps, desc="MD", unit="step", leave=False)
            except ImportError:  # pragma: no cover
                bar = None
        last = [0]
        n_atoms = state.n_atoms

        def on_check(k: int, st: MDState) -> None:
            gstep = start + k
            unstable, value = self.check_stability(st.positions, cell=st.cell, energy=st.energy)
            tracker.update(unstable, gstep, value)
            ekin = st.kinetic_energy()
            log["steps"].append(gstep)
            log["values"].append(value.detach().cpu())
            log["unstable"].append(unstable.detach().cpu())
            log["epot"].append(st.energy.detach().cpu())
            log["ekin"].append(ekin.detach().cpu())
            log["temperature"].append(st.temperature().detach().cpu())
            if thermo is not None or traj is not None:
                from mdsim.md.io import state_to_host
                host = state_to_host(st)
                stable_now = tracker.stable.cpu().numpy()
                t_fs = gstep * self.timestep_fs
                if thermo is not None and not (k == 0 and start > 0):
                    thermo.write(t_fs, host, n_atoms, stable=stable_now)
                if traj is not None and not (k == 0 and start > 0):
                    traj.write(t_fs, gstep, host, stable=stable_now)
            if bar is not None:
                bar.update(k - last[0])
                bar.set_postfix(unstable=int((~tracker.stable).sum()))
            last[0] = k

        state = rollout(state, self.step, n_steps, recorder, check_every, on_check)
        if bar is not None:
            bar.close()
        self.global_step = start + n_steps
        from dataclasses import replace as _replace
        state = _replace(state, stable=tracker.stable.to(state.positions.device))
        cat = lambda xs: torch.stack(xs) if xs else torch.empty(0)  # noqa: E731
        return RunResult(
            state=state, recorder=recorder, tracker=tracker, stable=tracker.stable.clone(),
            first_unstable_step=tracker.first_unstable_step.clone(),
            stability_time_ps=tracker.stability_time_ps(self.global_step, self.timestep_fs),
            check_steps=torch.tensor(log["steps"], dtype=torch.long), check_values=cat(log["values"]),
            check_unstable=cat(log["unstable"]), epot=cat(log["epot"]), ekin=cat(log["ekin"]),
            temperature=cat(log["temperature"]))
