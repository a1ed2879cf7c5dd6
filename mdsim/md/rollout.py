"""The one MD rollout loop, its steppers and recorders.

Layering (JAX-MD/TorchSim style): a *stepper* advances a batched
:class:`~mdsim.md.state.MDState` by a block of k steps and returns the per-step fields,
``stepper.run(state, k, generator) -> (state, Block)``.  The backends (config ``md_backend``,
names in :data:`BACKENDS`) are implementations of that one interface:

* :class:`EagerStepper` — the integrator's step functions as they are;
* :class:`mdsim.md.compiled.FastStepper` — ``compile`` (``torch.compile`` of one step) and
  ``cuda_graph`` (K steps captured in a CUDA graph).

:func:`rollout` is the loop: it asks the stepper for blocks, hands each block to a
*recorder* (``recorder.record_block(t0, block, state)``) and calls ``on_block(t, state)``
between blocks at every ``check_every`` steps and at the end (stability checks, early stop,
output, progress), so the steps inside a block never synchronise with the host.
:class:`Recorder` (preallocated fields at a fixed stride, used by
:class:`~mdsim.md.runner.Simulator`) and :class:`EpochRecorder` (the frames, energies,
temperatures and VACF velocities of a StABlE epoch, used by :func:`simulate`) are the two
recorders.  :func:`simulate` is the epoch simulation of StABlE training and evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mdsim.md.integrators import GeneratorLike
from mdsim.md.state import MDState, kinetic_energy, kinetic_temperature

#: the MD backends (config ``md_backend``, ``simulator.py --md-backend``): the one registry.
#: ``auto`` resolves to one of the others (:func:`resolve_auto_backend`).
BACKENDS = ("auto", "eager", "compile", "cuda_graph")

#: ``auto`` compiles on a CPU only when the run plans at least this much work (steps × replicas ×
#: atoms).  Compiling the 6-block aspirin SchNet step takes 25-60 s and then saves ~50 µs per
#: atom-step at 8-64 replicas (BENCHMARKS.md, second round), so there it pays from ~6e5
#: atom-steps; the threshold is kept well above that because smaller models save less per step
#: (not measured), and long runs are the ones that matter.  Runs between the two are up to ~2x
#: slower eager: set ``md_backend: compile`` for them (the study's pilots do).
AUTO_COMPILE_MIN_ATOM_STEPS = 20_000_000
_AUTO_LOGGED: set = set()


def resolve_auto_backend(state: MDState, force_fn=None, planned_steps: Optional[int] = None) -> Tuple[str, str]:
    """The backend ``md_backend: auto`` runs, and why (one line): periodic systems and plain
    potentials → eager; molecules with a model on CUDA → cuda_graph; on a CPU → compile when
    ``planned_steps`` × replicas × atoms (None: unknown, taken as long) ≥
    :data:`AUTO_COMPILE_MIN_ATOM_STEPS`, else eager (compilation would not pay).  Compiled CPU
    steps run on one intra-op thread (:class:`mdsim.md.compiled.FastStepper` ``cpu_threads``:
    faster than several, BENCHMARKS.md); more cores are used by sharding replicas over
    processes.  A compile failure falls back to eager later, with a warning."""
    dev = state.positions.device.type
    if state.cell is not None:
        return "eager", "periodic system (host-side neighbour lists)"
    if getattr(force_fn, "model", None) is None:
        return "eager", "no learned model to compile"
    if dev == "cuda":
        return "cuda_graph", "CUDA device, molecule"
    work = None if planned_steps is None else planned_steps * state.n_replicas * state.n_atoms
    if work is not None and work < AUTO_COMPILE_MIN_ATOM_STEPS:
        return "eager", (f"{work:.3g} planned atom-steps < {AUTO_COMPILE_MIN_ATOM_STEPS:.3g}: "
                         "compiling would not pay")
    why = f"{dev}, molecule, {'unknown' if work is None else f'{work:.3g}'} planned atom-steps"
    if dev == "cpu" and torch.get_num_threads() > 1:
        why += (f"; compiled steps run on 1 of this process's {torch.get_num_threads()} threads (faster; "
                "for more cores run one process per core: torchrun with OMP_NUM_THREADS=1)")
    return "compile", why


def _log_once(msg: str) -> None:
    if msg not in _AUTO_LOGGED:
        _AUTO_LOGGED.add(msg)
        import sys
        print(msg, file=sys.stderr, flush=True)

#: default steps per block of a rollout (bounds the per-step outputs held at once)
MAX_BLOCK_STEPS = 200

RECORDABLE = ("positions", "velocities", "forces", "energy", "accelerations")


@dataclass
class Block:
    """Per-step outputs of ``stepper.run``: ``positions``/``velocities``/``forces`` (K, R, N, 3)
    and ``energy`` (K, R) — stacked tensors (cuda_graph), or lists of K tensors (eager,
    compile)."""

    positions: Union[Tensor, List[Tensor]]
    velocities: Union[Tensor, List[Tensor]]
    forces: Union[Tensor, List[Tensor]]
    energy: Union[Tensor, List[Tensor]]

    def __len__(self) -> int:
        return len(self.positions)

    def append(self, state: MDState) -> None:
        """Add the post-step fields of ``state`` (list blocks)."""
        self.positions.append(state.positions)
        self.velocities.append(state.velocities)
        self.forces.append(state.forces)
        self.energy.append(state.energy)

    @property
    def stacked(self) -> bool:
        """True when the fields are (K, ...) tensors (entries are views of one block)."""
        return torch.is_tensor(self.positions)


def dof_of(integrator, n_atoms: int) -> int:
    """Degrees of freedom of ``integrator``'s dynamics (3N for objects without ``dof``)."""
    dof = getattr(integrator, "dof", None)
    return int(dof(n_atoms)) if callable(dof) else 3 * n_atoms


# ----------------------------------------------------------------------------- steppers
class EagerStepper:
    """The eager backend: ``k`` calls of ``integrator.step(state, force_fn, generator)`` (the
    integrator draws its own noise).  ``block_steps``: preferred block size."""

    backend = "eager"

    def __init__(self, integrator, force_fn, block_steps: int = MAX_BLOCK_STEPS):
        self.integrator, self.force_fn = integrator, force_fn
        self.block_steps = max(1, int(block_steps))

    def run(self, state: MDState, n_steps: int, generator: GeneratorLike = None) -> Tuple[MDState, Block]:
        blk = Block([], [], [], [])
        for _ in range(int(n_steps)):
            state = self.integrator.step(state, self.force_fn, generator)
            blk.append(state)
        return state, blk

    def step(self, state: MDState, generator: GeneratorLike = None) -> MDState:
        return self.run(state, 1, generator)[0]


def make_stepper(integrator, force_fn, state: MDState, backend: str = "eager",
                 block_steps: int = MAX_BLOCK_STEPS, compile_backend: str = "inductor",
                 planned_steps: Optional[int] = None, **options):
    """A stepper for ``backend`` (one of :data:`BACKENDS`).  ``compile``/``cuda_graph`` give a
    cached :class:`mdsim.md.compiled.FastStepper` (see :func:`mdsim.md.compiled.get_stepper`),
    or an :class:`EagerStepper` where they fall back to eager (periodic systems; a warning is
    given once).  ``options``: further FastStepper options (``compile_mode``, ``fullgraph``,
    ``warmup_steps``, ``emulate_graph``)."""
    if backend not in BACKENDS:
        raise ValueError(f"md_backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend, why = resolve_auto_backend(state, force_fn, planned_steps)
        _log_once(f"md_backend auto → {backend} ({why})")
    if backend != "eager":
        from mdsim.md.compiled import get_stepper
        stepper = get_stepper(integrator, force_fn, state, backend, compile_backend=compile_backend,
                              block_steps=block_steps, **options)
        if stepper.backend != "eager":
            return stepper
    return EagerStepper(integrator, force_fn, block_steps)


# ----------------------------------------------------------------------------- the loop
def rollout(state: MDState, stepper, n_steps: int, generator: GeneratorLike = None, recorder=None,
            check_every: Optional[int] = None, on_block: Optional[Callable[[int, MDState], Optional[bool]]] = None,
            block_steps: Optional[int] = None, progress: bool = False, desc: str = "MD") -> Tuple[MDState, int]:
    """Advance ``state`` ``n_steps`` steps with ``stepper`` — the package's one MD loop.

    Blocks of at most ``block_steps`` (default ``stepper.block_steps``) steps end at every
    multiple of ``check_every`` (default: no checks but the last) and at ``n_steps``; after
    each block ``recorder.record_block(t0, block, state)`` stores what it wants (t0: steps
    before the block, block entry j is step t0 + j + 1).  ``on_block(t, state)`` runs at
    t = 0, at every multiple of ``check_every`` and at the last step; returning True stops the
    rollout there (early stop).  Returns ``(state, steps done)``."""
    if not (isinstance(n_steps, int) and n_steps >= 0):
        raise ValueError(f"n_steps: expected a non-negative integer, got {n_steps!r}")
    kmax = max(1, int(block_steps or getattr(stepper, "block_steps", MAX_BLOCK_STEPS)))
    every = int(check_every) if check_every else n_steps
    t = 0
    if on_block is not None and on_block(0, state):
        return state, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_steps, desc=desc, leave=False)
    try:
        while t < n_steps:
            next_check = (t // every + 1) * every if every else n_steps
            k = min(kmax, next_check - t, n_steps - t)
            state, blk = stepper.run(state, k, generator)
            if recorder is not None:
                recorder.record_block(t, blk, state)
            t += k
            if bar is not None:
                bar.update(k)
            if on_block is not None and (t % every == 0 or t == n_steps) and on_block(t, state):
                break
    finally:
        if bar is not None:
            bar.close()
    return state, t


# ----------------------------------------------------------------------------- recorders
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

    def _store(self, s: int, values: Dict[str, Tensor], masses: Tensor) -> None:
        for name in self.fields:
            if name == "accelerations":
                f = values["forces"]
                v = f / masses.to(f)[None, :, None]
            else:
                v = values[name]
            v = v.detach()
            buf = self.buffers.get(name)
            if buf is None:
                buf = torch.empty((self.n_frames,) + tuple(v.shape), dtype=self.dtype or v.dtype,
                                  device=self.device or v.device)
                self.buffers[name] = buf
            buf[s].copy_(v)

    def record(self, k: int, state: MDState) -> None:
        """Store the fields of ``state`` as rollout step k (if k is recorded)."""
        s = self.slot(k)
        if s is not None:
            self._store(s, {f: getattr(state, f) for f in ("positions", "velocities", "forces", "energy")},
                        state.masses)

    def record_block(self, t0: int, blk: Block, state: MDState) -> None:
        for j in range(len(blk)):
            s = self.slot(t0 + j + 1)
            if s is not None:
                self._store(s, {"positions": blk.positions[j], "velocities": blk.velocities[j],
                                "forces": blk.forces[j], "energy": blk.energy[j]}, state.masses)

    def frames(self, name: str, stride: int = 1) -> Tensor:
        if name not in self.buffers:
            raise KeyError(f"field {name!r} was not recorded (recorded: {sorted(self.buffers)})")
        return self.buffers[name][::stride]

    def __getitem__(self, name: str) -> Tensor:
        return self.frames(name)


@dataclass
class EpochRecord:
    frames: Tensor  # (F, R, N, 3) positions every n_dump steps after eq_steps
    frame_steps: Tensor  # (F,) step (1-based, within the epoch) of each frame
    energies: Tensor  # (F, R) potential energy of each frame
    velocities: Optional[Tensor]  # (T, R, N, 3) every vstride steps after eq_steps (VACF)
    temperatures: Tensor  # (F, R) kinetic temperature at each frame


class EpochRecorder:
    """What a StABlE epoch keeps: frames (positions, energies, kinetic temperatures over
    ``dof`` degrees of freedom) at steps t > ``eq_steps`` with t % ``n_dump`` == 0, and
    velocities every ``vstride`` steps after ``eq_steps`` (if ``record_velocities``)."""

    def __init__(self, n_dump: int, eq_steps: int, vstride: int, record_velocities: bool, masses: Tensor,
                 dof: int):
        self.n_dump, self.eq_steps, self.vstride = int(n_dump), int(eq_steps), int(vstride)
        self.record_velocities, self.masses, self.dof = record_velocities, masses, dof
        self.frames, self.steps, self.energies, self.temps, self.vels = [], [], [], [], []

    def record_block(self, t0: int, blk: Block, state: MDState) -> None:
        keep = (lambda x: x.clone()) if blk.stacked else (lambda x: x)  # views of one block: copy
        for j in range(len(blk)):
            t = t0 + j + 1
            if t <= self.eq_steps:
                continue
            v = blk.velocities[j]
            if self.record_velocities and (t - self.eq_steps) % self.vstride == 0:
                self.vels.append(keep(v))
            if t % self.n_dump == 0:
                self.frames.append(keep(blk.positions[j]))
                self.steps.append(t)
                self.energies.append(keep(blk.energy[j]))
                self.temps.append(kinetic_temperature(kinetic_energy(v, self.masses), self.dof))

    def result(self, state: MDState, steps: int) -> EpochRecord:
        if not self.frames:  # always keep the last frame
            self.frames, self.steps, self.energies = [state.positions], [steps], [state.energy]
            self.temps = [state.temperature(self.dof)]
        return EpochRecord(frames=torch.stack(self.frames), frame_steps=torch.tensor(self.steps),
                           energies=torch.stack(self.energies),
                           velocities=torch.stack(self.vels) if self.vels else None,
                           temperatures=torch.stack(self.temps))


def simulate(integrator, force_fn, state: MDState, steps: int, n_dump: int, eq_steps: int = 0,
             vstride: int = 1, generator=None, record_velocities: bool = True,
             progress: bool = False, desc: str = "MD", backend: str = "eager",
             compile_backend: str = "inductor", block_steps: Optional[int] = None,
             stepper_options: Optional[dict] = None, planned_steps: Optional[int] = None) -> tuple:
    """One epoch: advance all replicas ``steps`` steps.  Returns (final state,
    :class:`EpochRecord`).

    ``backend`` (config ``md_backend``, one of :data:`BACKENDS`): ``eager`` runs the step
    functions as they are; ``compile`` runs a ``torch.compile``d step (``compile_backend``,
    inductor by default); ``cuda_graph`` replays CUDA graphs of ``block_steps`` steps (default
    ``n_dump``, at most 200) on CUDA and falls back to ``compile`` elsewhere (see
    :mod:`mdsim.md.compiled`; periodic systems always run eager).  All backends draw the same
    Langevin noise from ``generator`` in the same order, so results agree with eager to float
    rounding.  ``stepper_options``: further :class:`mdsim.md.compiled.FastStepper` options.
    Recording, stability and resets stay on the host side, between blocks."""
    k = block_steps if block_steps is not None else min(max(int(n_dump), 1), MAX_BLOCK_STEPS)
    stepper = make_stepper(integrator, force_fn, state, backend, block_steps=k, compile_backend=compile_backend,
                           planned_steps=planned_steps,
                           **(stepper_options or {}))
    rec = EpochRecorder(n_dump, eq_steps, vstride, record_velocities, state.masses,
                        dof_of(integrator, state.n_atoms))
    state, _ = rollout(state, stepper, steps, generator, rec, progress=progress, desc=desc)
    return state, rec.result(state, steps)
