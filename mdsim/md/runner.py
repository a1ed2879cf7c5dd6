"""The public :class:`Simulator`: batched multi-replica MD of one :class:`System`.

Layering (JAX-MD/TorchSim style): a :class:`~mdsim.md.forces.ForceField` (energy) and an
:class:`~mdsim.md.integrators.Integrator` (dynamics) make a stepper (backend ``eager``,
``compile`` or ``cuda_graph``, :func:`mdsim.md.rollout.make_stepper`) that the one rollout
loop, :func:`mdsim.md.rollout.rollout`, advances in blocks, storing requested fields into a
:class:`~mdsim.md.rollout.Recorder` on the device.  Host work (stability checks, thermo lines,
trajectory dumps, progress bar, early stop) happens only between blocks, every
``check_every`` steps, so the steps in between never synchronise with the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from mdsim.md.forces import ForceField, as_force_field
from mdsim.md.init import initial_state, replace_replicas, reset_replicas
from mdsim.md.integrators import GeneratorLike, Integrator, make_integrator
from mdsim.md.rollout import MAX_BLOCK_STEPS, RECORDABLE, Recorder, make_stepper, rollout  # noqa: F401
from mdsim.md.stability import StabilityTracker, stability_values
from mdsim.md.state import MDState
from mdsim.md.system import System


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
    ``md_backend``: auto | eager | compile | cuda_graph (:data:`mdsim.md.rollout.BACKENDS`;
    auto: :func:`mdsim.md.rollout.resolve_auto_backend`).
    ``neighbor_skin``: Verlet-list skin (Å) when a model is passed (see
    :class:`~mdsim.md.forces.ModelForceField`; None: all-pairs graph).
    ``radial_table_spacing``: grid (Å) of the tabulated radial functions of models that support
    them (SchNet's filters; :class:`~mdsim.md.forces.ModelForceField`; None: the network).
    ``dof_convention``: physical (default) | original — degrees of freedom of the initial
    velocities, the Nosé–Hoover target and the reported temperature (docs/differences.md).
    """

    def __init__(self, force_field, system: System, integrator: str = "NoseHoover", timestep_fs: float = 0.5,
                 temperature_K: float = 500.0, integrator_config: Optional[dict] = None, n_dump: int = 100,
                 out_dir=None, dump_replicas: Optional[Sequence[int]] = None, write_trajectory: bool = True,
                 seed: Optional[int] = None, generator: GeneratorLike = None, device="cpu",
                 dtype: torch.dtype = torch.float32, value_fn: Optional[Callable] = None,
                 md_backend: str = "auto", dof_convention: str = "physical",
                 neighbor_skin: Optional[float] = 0.3, radial_table_spacing: Optional[float] = 0.005):
        if not (isinstance(n_dump, int) and n_dump >= 1):
            raise ValueError(f"n_dump: expected a positive integer number of steps, got {n_dump!r}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.system = system.to(device=self.device, dtype=dtype)
        self.force_field: ForceField = as_force_field(force_field, self.system.atomic_numbers, neighbor_skin,
                                                      radial_table_spacing)
        self.integrator: Integrator = make_integrator(integrator, timestep_fs, temperature_K, integrator_config,
                                                      dof_convention=dof_convention)
        from mdsim.md.rollout import BACKENDS
        if md_backend not in BACKENDS:
            raise ValueError(f"md_backend: expected one of {BACKENDS}, got {md_backend!r}")
        self.md_backend = md_backend
        self.dof_convention = dof_convention
        self.dof = self.integrator.dof(self.system.n_atoms)
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
                             device=self.device, velocities=velocities, dof_convention=self.dof_convention)

    def reset_replicas(self, state: MDState, mask: Tensor, frames, reset_probability: float = 0.0,
                       rescale: bool = True, cells=None):
        """Restart replicas ``mask`` from random ``frames`` (see :func:`mdsim.md.init.reset_replicas`)."""
        g = self.generator if isinstance(self.generator, torch.Generator) else None
        return reset_replicas(state, mask, frames, self.force_field, self.temperature_K or 0.0, generator=g,
                              reset_probability=reset_probability, rescale=rescale, cells=cells,
                              dof_convention=self.dof_convention)

    replace_replicas = staticmethod(replace_replicas)

    def check_stability(self, positions: Tensor, cell: Optional[Tensor] = None, energy: Optional[Tensor] = None):
        """``(unstable, value)`` for positions (..., N, 3) by the system's criterion."""
        return stability_values(positions, self.system, cell=cell, energy=energy, value_fn=self.value_fn)

    def check_frames(self, recorder_or_frames, stride: int = 1, tracker: Optional[StabilityTracker] = None,
                     steps: Optional[Tensor] = None, energies: Optional[Tensor] = None):
        """Vectorised check of recorded positions (T,R,N,3) (or a Recorder, every ``stride``-th
        frame; its recorded energies are checked too, so a non-finite energy marks its own
        frame unstable).  ``energies`` (T,R): energies of given frames.  Updates ``tracker``
        if given.  Returns ``(unstable (T,R), value (T,R))``."""
        if isinstance(recorder_or_frames, Recorder):
            pos = recorder_or_frames.frames("positions", stride)
            if energies is None and "energy" in recorder_or_frames.buffers:
                energies = recorder_or_frames.frames("energy", stride)
            steps = recorder_or_frames.steps[::stride] if steps is None else steps
        else:
            pos = recorder_or_frames[::stride]
            energies = None if energies is None else energies[::stride]
        unstable, value = self.check_stability(pos, energy=energies)
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
    def stepper(self, state: MDState, block_steps: int = MAX_BLOCK_STEPS, planned_steps: Optional[int] = None):
        """The stepper of ``md_backend`` for ``state`` (cached for compiled backends;
        ``planned_steps`` informs ``auto``)."""
        return make_stepper(self.integrator, self.force_field, state, self.md_backend, block_steps=block_steps,
                            planned_steps=planned_steps)

    def run(self, state: MDState, n_steps: int, record: Union[bool, Recorder] = False,
            record_every: Optional[int] = None, record_start: int = 0,
            record_fields: Sequence[str] = ("positions", "velocities"), check_every: Optional[int] = None,
            progress: bool = True, tracker: Optional[StabilityTracker] = None,
            write: bool = True, stop_fraction: Optional[float] = None,
            stop_every: Optional[int] = None) -> RunResult:
        """Integrate ``n_steps`` steps with :func:`mdsim.md.rollout.rollout`.

        ``record``: False; True → a :class:`Recorder` storing ``record_fields`` every
        ``record_every`` steps (default ``n_dump``) after ``record_start`` steps; or a Recorder.
        ``check_every`` (default ``n_dump``): stride of stability checks and output, also done
        at step 0 and at the last step.  ``tracker``: continue an existing
        :class:`StabilityTracker` (default: a new one).  ``write``: write files if ``out_dir``.
        ``stop_fraction``: stop early once this fraction of the replicas is unstable, looked
        at every ``stop_every`` steps (default ``check_every``; a multiple of it) — the rule
        of evaluation (``max_frac_unstable_threshold`` after each epoch).
        Steps are counted on ``self.global_step`` (continues across calls)."""
        if not (isinstance(n_steps, int) and n_steps >= 0):
            raise ValueError(f"n_steps: expected a non-negative integer, got {n_steps!r}")
        check_every = check_every or self.n_dump
        stop_every = stop_every or check_every
        if stop_fraction is not None and stop_every % check_every:
            raise ValueError(f"stop_every ({stop_every}) must be a multiple of check_every ({check_every})")
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

        def on_check(k: int, st: MDState) -> bool:
            gstep = start + k
            unstable, value = self.check_stability(st.positions, cell=st.cell, energy=st.energy)
            tracker.update(unstable, gstep, value)
            ekin = st.kinetic_energy()
            log["steps"].append(gstep)
            log["values"].append(value.detach().cpu())
            log["unstable"].append(unstable.detach().cpu())
            log["epot"].append(st.energy.detach().cpu())
            log["ekin"].append(ekin.detach().cpu())
            log["temperature"].append(st.temperature(self.dof).detach().cpu())
            if thermo is not None or traj is not None:
                from mdsim.md.io import state_to_host
                host = state_to_host(st)
                stable_now = tracker.stable.cpu().numpy()
                t_fs = gstep * self.timestep_fs
                if thermo is not None and not (k == 0 and start > 0):
                    thermo.write(t_fs, host, self.dof, stable=stable_now)
                if traj is not None and not (k == 0 and start > 0):
                    traj.write(t_fs, gstep, host, stable=stable_now)
            if bar is not None:
                bar.update(k - last[0])
                bar.set_postfix(unstable=int((~tracker.stable).sum()))
            last[0] = k
            return (stop_fraction is not None and k > 0 and k % stop_every == 0
                    and float((~tracker.stable).float().mean()) >= stop_fraction)

        stepper = self.stepper(state, min(check_every, MAX_BLOCK_STEPS), planned_steps=n_steps)
        with torch.no_grad():
            state, done = rollout(state, stepper, n_steps, self.generator, recorder, check_every, on_check)
        if bar is not None:
            bar.close()
        self.global_step = start + done
        from dataclasses import replace as _replace
        state = _replace(state, stable=tracker.stable.to(state.positions.device))
        cat = lambda xs: torch.stack(xs) if xs else torch.empty(0)  # noqa: E731
        return RunResult(
            state=state, recorder=recorder, tracker=tracker, stable=tracker.stable.clone(),
            first_unstable_step=tracker.first_unstable_step.clone(),
            stability_time_ps=tracker.stability_time_ps(self.global_step, self.timestep_fs),
            check_steps=torch.tensor(log["steps"], dtype=torch.long), check_values=cat(log["values"]),
            check_unstable=cat(log["unstable"]), epot=cat(log["epot"]), ekin=cat(log["ekin"]),
            temperature=cat(log["temperature"]), extra={"steps_done": done})
