"""Fast rollouts: capture-safe MD steps under ``torch.compile`` and CUDA graphs.

The MD step of fixed-size molecules (no cell) has static shapes: the neighbour list is the
static all-pairs list (:func:`mdsim.models.base.static_all_pairs`), the model's readout sums
into R structures of known size, the thermostat works on (R,) tensors.  What remains to make
the whole step one graph:

* forces without ``torch.autograd.grad`` (a graph break under ``torch.compile``):
  :func:`functional_force_fn` takes them with ``torch.func.grad_and_value`` with respect to
  the positions, which dynamo traces;
* random numbers outside the graph: Langevin noise is drawn by
  :meth:`mdsim.md.integrators.Integrator.draw_noise` with the caller's generator (exactly the
  draws the eager step makes, in the same order) and passed into the step;
* no host synchronisation (no ``.item()``, no data-dependent shapes) anywhere in the step.

:func:`make_tensor_step` turns an integrator and a force function into a pure function of
tensors, ``(positions, velocities, forces, energy, zeta, step, masses, noise) -> (positions,
velocities, forces, energy, zeta, step)``, which ``torch.compile(..., fullgraph=True)``
compiles without graph breaks for the package's SchNet.  :class:`FastStepper` implements the
stepper interface of :mod:`mdsim.md.rollout` (``run(state, k, generator) -> (state, Block)``)
for the backends (config ``md_backend``, registry :data:`mdsim.md.rollout.BACKENDS`):

* ``eager``: the integrator as it is (reference; :class:`mdsim.md.rollout.EagerStepper`);
* ``compile``: ``torch.compile`` of one step, called once per step (noise drawn before each
  call);
* ``cuda_graph``: a block of K steps captured once into a ``torch.cuda.CUDAGraph`` (after
  warm-up on a side stream), replayed with the state copied into static buffers; the block
  also writes every step's positions, velocities, forces and energies into static (K, ...) buffers, so
  recording at any stride stays outside the graph.  Recaptured when the model's parameters are
  re-allocated (in-place optimiser updates are seen by the replays).

Fallbacks (one warning each): ``cuda_graph`` on a CPU state → ``compile``; periodic systems
(host-side vesin neighbour lists) → ``eager``; a ``compile`` that fails to compile → ``eager``.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mdsim.md.forces import ForceField, ModelForceField, equal_size_kwargs
from mdsim.md.integrators import GeneratorLike, Integrator, randn_like_replicas
from mdsim.md.rollout import BACKENDS, Block, EagerStepper  # noqa: F401  (BACKENDS: the registry)
from mdsim.md.state import MDState

#: state fields advanced by a step (the others — masses, cell, stable, replica — are constant)
STEP_FIELDS = ("positions", "velocities", "forces", "energy", "zeta", "step")


# ----------------------------------------------------------------------------- forces
class FunctionalForceField(ForceField):
    """Energies and forces of R equal-size replicas by ``torch.func.grad_and_value``.

    Same results as :class:`~mdsim.md.forces.ModelForceField` (energy in the model's output
    dtype, forces in the positions' dtype, both detached), but traceable by dynamo and free of
    host synchronisation, for molecules only (``cell`` must be None).  Built by
    :func:`functional_force_fn`."""

    def __init__(self, model, atomic_numbers: Tensor, n_replicas: int, dtype: Optional[torch.dtype] = None,
                 device=None):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module  # forces need no gradient synchronisation
        self.model = model
        z = torch.as_tensor(atomic_numbers, dtype=torch.long).reshape(-1)
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        if device is None:
            device = p.device if p is not None else z.device
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if dtype is None and p is not None:
            dtype = p.dtype
        self.dtype = dtype
        self.n_replicas = int(n_replicas)
        self.n_atoms = int(z.shape[0])
        self.atomic_numbers = z.to(self.device)
        R, N = self.n_replicas, self.n_atoms
        self._z = self.atomic_numbers.repeat(R)
        self._batch = torch.arange(R, device=self.device).repeat_interleave(N)
        self._model_kw = equal_size_kwargs(model)
        if self._model_kw:  # the static pair list must exist before dynamo traces the model
            from mdsim.models.base import static_all_pairs
            static_all_pairs(N, R, self.device, pin=True)

        def energy_fn(pos: Tensor):
            e = self.model(pos, self._z, self._batch, R, None, **self._model_kw)
            return e.sum(), e

        self._grad_and_value = torch.func.grad_and_value(energy_fn, has_aux=True)

    def compute(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if cell is not None:
            raise ValueError("FunctionalForceField is for molecules (static all-pairs graphs); "
                             "periodic systems use ModelForceField")
        R, N, _ = positions.shape
        if (R, N) != (self.n_replicas, self.n_atoms):
            raise ValueError(f"positions have shape ({R}, {N}, 3); this force field was built for "
                             f"{self.n_replicas} replicas of {self.n_atoms} atoms")
        pos = positions.detach().reshape(R * N, 3)
        if self.dtype is not None:
            pos = pos.to(self.dtype)
        g, (_, energy) = self._grad_and_value(pos)
        forces = (-g).reshape(R, N, 3).to(positions.dtype)
        return energy.reshape(R).detach(), forces.detach()

    def parameter_signature(self) -> Tuple:
        """Storage addresses of the model's parameters and buffers (changes when they are
        re-allocated, e.g. by ``model.to(...)``; in-place updates keep it)."""
        return tuple(t.data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers()))


def functional_force_fn(model, atomic_numbers: Tensor, n_replicas: int, dtype: Optional[torch.dtype] = None,
                        device=None) -> FunctionalForceField:
    """A capture-safe force function ``(positions (R,N,3), cell=None) -> (energy (R,), forces
    (R,N,3))`` for ``n_replicas`` replicas of the molecule ``atomic_numbers`` (N,), forces by
    ``torch.func.grad_and_value`` w.r.t. the positions.  ``model`` has the package interface
    (see :mod:`mdsim.models.base`); ``dtype``/``device`` default to the model's."""
    return FunctionalForceField(model, atomic_numbers, n_replicas, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- steps
def make_tensor_step(integrator: Integrator, force_fn) -> Callable:
    """A pure function of tensors for one step of ``integrator`` with ``force_fn``::

        step(positions, velocities, forces, energy, zeta, step, masses, noise=None)
            -> (positions, velocities, forces, energy, zeta, step)

    ``noise``: the pre-drawn standard normal (R,N,3) of stochastic integrators
    (:meth:`Integrator.draw_noise`), None otherwise.  Molecules only (no cell).  This is what
    ``torch.compile`` compiles and what a CUDA graph captures."""
    fn, dt, params = integrator.fn, integrator.dt, dict(integrator.params)
    stochastic = integrator.stochastic

    def tensor_step(positions, velocities, forces, energy, zeta, step, masses, noise=None):
        state = MDState(positions=positions, velocities=velocities, forces=forces, energy=energy, masses=masses,
                        zeta=zeta, step=step, stable=step, replica=step)
        # (stable/replica are placeholders: steps never read them, and passing tensors avoids
        # creating them in the graph; the caller keeps the real ones)
        if stochastic:
            new = fn(state, force_fn, dt, noise=noise, **params)
        else:
            new = fn(state, force_fn, dt, **params)
        return new.positions, new.velocities, new.forces, new.energy, new.zeta, new.step

    return tensor_step


def _fields(state: MDState) -> Tuple[Tensor, ...]:
    return tuple(getattr(state, f) for f in STEP_FIELDS)


def _with_fields(state: MDState, values: Sequence[Tensor]) -> MDState:
    from dataclasses import replace
    return replace(state, **dict(zip(STEP_FIELDS, values)))


def resolve_backend(backend: str, state: MDState, force_fn=None) -> Tuple[str, Optional[str]]:
    """The backend that will actually run and, if it differs, why (one line)."""
    if backend not in BACKENDS:
        raise ValueError(f"md_backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "eager":
        return "eager", None
    if state.cell is not None:
        return "eager", (f"md_backend {backend}: periodic systems use host-side neighbour lists "
                         "(vesin); running eager")
    if backend == "cuda_graph" and state.positions.device.type != "cuda":
        return "compile", (f"md_backend cuda_graph needs a CUDA device (state is on "
                           f"{state.positions.device}); using compile")
    return backend, None


class FastStepper:
    """Runs blocks of MD steps with one backend (see the module docstring).

    ``integrator``, ``force_fn`` as for eager steps (a :class:`ModelForceField` is replaced by
    a :class:`FunctionalForceField` for the compiled/captured paths).  ``state``: a template
    (replica count, atoms, device, dtype, cell).  ``compile_backend``/``compile_mode``/
    ``fullgraph``: passed to ``torch.compile`` (``inductor`` by default; ``aot_eager`` compiles
    fast and is what the tests use).  ``block_steps``: steps per CUDA graph (K).
    ``warmup_steps``: eager steps on a side stream before a capture.  ``emulate_graph``
    (testing): run the ``cuda_graph`` block logic — static buffers, K-step blocks, pre-drawn
    noise, recapture on re-allocated parameters — on any device, with "replay" executing the
    block eagerly instead of a captured graph.

    ``cpu_threads``: intra-op threads while compiled steps run on a CPU (default 1; restored
    after each ``run``; None: leave the process's setting).  Inductor's generated CPU kernels
    and the small matrix products of a molecule's step use several threads poorly: on 2 cores,
    64 aspirin replicas took 145 ms per compiled step with 2 threads and 76 ms with one
    (BENCHMARKS.md).  To use more cores, shard replicas over processes (torchrun).

    ``run(state, n_steps, generator) -> (state, Block)``; ``step(state, generator) -> state``.
    ``backend`` is the backend in use after fallbacks."""

    def __init__(self, integrator: Integrator, force_fn, state: MDState, backend: str = "compile",
                 compile_backend: str = "inductor", compile_mode: Optional[str] = None,
                 fullgraph: bool = False, block_steps: int = 100, warmup_steps: int = 2,
                 emulate_graph: bool = False, cpu_threads: Optional[int] = 1):
        self.integrator = integrator
        self.cpu_threads = None if cpu_threads is None else max(1, int(cpu_threads))
        self.requested = backend
        self.emulate_graph = bool(emulate_graph)
        if self.emulate_graph and backend == "cuda_graph" and state.cell is None:
            self.backend, reason = "cuda_graph", None
        else:
            self.backend, reason = resolve_backend(backend, state, force_fn)
        if reason:
            warnings.warn(reason, RuntimeWarning, stacklevel=2)
        self.eager_force_fn = force_fn
        self.n_replicas, self.n_atoms = state.n_replicas, state.n_atoms
        self.device = state.positions.device
        self.block_steps = max(1, int(block_steps))
        self.warmup_steps = int(warmup_steps)
        self.compile_options = dict(backend=compile_backend, mode=compile_mode, fullgraph=fullgraph,
                                    dynamic=False)
        self.force_fn = force_fn
        # the eager force field's Verlet list (if any) serves the compiled step too: the stepper
        # activates it around every compiled call and decides rebuilds on the host (_step_nl)
        self.neighbors = getattr(force_fn, "neighbors", None)
        if self.backend == "cuda_graph":
            self.neighbors = None  # graphs of K steps keep the static all-pairs graph
        if self.backend != "eager" and isinstance(force_fn, ModelForceField):
            self.force_fn = functional_force_fn(force_fn.model, force_fn.atomic_numbers, self.n_replicas,
                                                dtype=force_fn.dtype, device=self.device)
        self._tensor_step = make_tensor_step(integrator, self.force_fn)
        self._compiled = None
        self._compile_checked = False
        self._graphs: Dict[int, "_CapturedBlock"] = {}
        self.captures = 0  # CUDA graphs captured so far (diagnostics)
        self.redone_steps = 0  # compiled steps redone after a Verlet-list violation (diagnostics)

    # -- helpers ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _threads(self):
        """Intra-op threads ``cpu_threads`` while compiled steps run on a CPU (then restored)."""
        if self.backend != "compile" or self.device.type != "cpu" or self.cpu_threads is None:
            yield
            return
        prev = torch.get_num_threads()
        if prev == self.cpu_threads:
            yield
            return
        torch.set_num_threads(self.cpu_threads)
        try:
            yield
        finally:
            torch.set_num_threads(prev)

    def _check(self, state: MDState) -> None:
        if (state.n_replicas, state.n_atoms) != (self.n_replicas, self.n_atoms):
            raise ValueError(f"state has {state.n_replicas} replicas of {state.n_atoms} atoms; this stepper "
                             f"was built for {self.n_replicas} of {self.n_atoms}")

    def _step_nl(self, state: MDState, noise: Optional[Tensor]) -> MDState:
        """One compiled step with the Verlet list kept exact: rebuilt on the host before the
        step when an atom is within a margin of ``skin/2`` of its build position; after the
        step the displacement at the new positions (where the new forces were evaluated) is
        checked, and a violated step is redone from its start with a list rebuilt there (same
        noise, so the result is what an exact list gives)."""
        nl = self.neighbors
        if nl is None:
            return self._compiled_step(state, noise)
        nl.update(state.positions, state.cell, margin=0.2 * nl.skin)
        with self.force_fn.model.using_neighbors(nl):
            new = self._compiled_step(state, noise)
        if nl.needs_rebuild(new.positions, new.cell):
            nl.build(state.positions, state.cell)
            self.redone_steps += 1
            with self.force_fn.model.using_neighbors(nl):
                new = self._compiled_step(state, noise)
        return new

    def _compiled_step(self, state: MDState, noise: Optional[Tensor]) -> MDState:
        if self.backend == "eager":  # compilation failed earlier
            return self.integrator.step(state, self.eager_force_fn, None, noise=noise)
        args = _fields(state) + (state.masses, noise)
        if not self._compile_checked:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self._tensor_step, **self.compile_options)
                out = self._compiled(*args)
            except Exception as exc:  # compiler missing/failing: run eager from now on
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
                warnings.warn(f"md_backend {self.requested}: torch.compile failed ({type(exc).__name__}: {msg}); "
                              "running eager", RuntimeWarning, stacklevel=3)
                self.backend = "eager"
                return self.integrator.step(state, self.eager_force_fn, None, noise=noise)
            self._compile_checked = True
        else:
            out = self._compiled(*args)
        return _with_fields(state, out)

    # -- public -----------------------------------------------------------------------
    def step(self, state: MDState, generator: GeneratorLike = None) -> MDState:
        """One step (no per-step outputs)."""
        return self.run(state, 1, generator)[0]

    def run(self, state: MDState, n_steps: int, generator: GeneratorLike = None) -> Tuple[MDState, Block]:
        """``n_steps`` steps from ``state``; returns the final state and the per-step
        positions/velocities/energies (:class:`Block`).  Runs under ``torch.no_grad``."""
        self._check(state)
        n_steps = int(n_steps)
        # the force field's radial tables (parameters are fixed during a run): built or refreshed
        # here, on the host, before any compiled call or capture reads them
        tables = self.eager_force_fn.tables() if isinstance(self.eager_force_fn, ModelForceField) \
            else contextlib.nullcontext()
        with torch.no_grad(), tables, self._threads():
            if self.backend == "cuda_graph":
                return self._run_graph(state, n_steps, generator)
            if self.backend == "eager":  # resolved or compile failed earlier
                return EagerStepper(self.integrator, self.eager_force_fn).run(state, n_steps, generator)
            blk = Block([], [], [], [])
            done = 0
            while done < n_steps:
                k = min(self.block_steps, n_steps - done)
                # the block's noise drawn up front (one host-to-device copy), then indexed per step
                noise = self._draw_block_noise(state, k, generator)
                for j in range(k):
                    state = self._step_nl(state, None if noise is None else noise[j])
                    blk.append(state)
                done += k
            return state, blk

    # -- CUDA graphs ---------------------------------------------------------------
    def _draw_block_noise(self, state: MDState, k: int, generator: GeneratorLike) -> Optional[Tensor]:
        """(k, R, N, 3): the k draws the eager steps would make, in order, moved to the device
        in one copy (a single generator draws on its own device, as the eager step does)."""
        if not self.integrator.stochastic:
            return None
        v = state.velocities
        if isinstance(generator, torch.Generator) and generator.device != v.device:
            tmpl = torch.empty(v.shape, dtype=v.dtype, device=generator.device)
            return torch.stack([randn_like_replicas(tmpl, generator) for _ in range(k)]).to(v.device)
        return torch.stack([self.integrator.draw_noise(state, generator) for _ in range(k)])

    def _run_graph(self, state: MDState, n_steps: int, generator: GeneratorLike) -> Tuple[MDState, Block]:
        P, V, F, E = [], [], [], []
        done = 0
        while done < n_steps:
            k = min(self.block_steps, n_steps - done)
            block = self._graphs.get(k)
            sig = self.force_fn.parameter_signature() if hasattr(self.force_fn, "parameter_signature") else None
            if block is None or block.signature != sig:
                self._graphs.pop(k, None)  # free the old graph (and its memory pool) first
                block = _CapturedBlock(self._tensor_step, k, state, self.integrator.stochastic,
                                       self.warmup_steps, sig, emulate=self.emulate_graph)
                self.captures += 1
                self._graphs[k] = block
            noise = self._draw_block_noise(state, k, generator)
            state, (p, v, f, e) = block.replay(state, noise)
            P.append(p)
            V.append(v)
            F.append(f)
            E.append(e)
            done += k
        if not P:
            empty = state.positions.new_empty((0,) + tuple(state.positions.shape))
            return state, Block(empty, empty.clone(), empty.clone(), state.energy.new_empty((0, self.n_replicas)))
        if len(P) == 1:
            return state, Block(P[0], V[0], F[0], E[0])
        return state, Block(torch.cat(P), torch.cat(V), torch.cat(F), torch.cat(E))


class _CapturedBlock:
    """K steps captured in one CUDA graph over static input/output buffers."""

    def __init__(self, tensor_step, k: int, template: MDState, stochastic: bool, warmup_steps: int,
                 signature, emulate: bool = False):
        self.k, self.signature, self.stochastic, self.emulate = k, signature, stochastic, emulate
        self.tensor_step = tensor_step
        self.inputs = [t.detach().clone() for t in _fields(template)]
        self.masses = template.masses.detach().clone()
        self.noise = (torch.zeros((k,) + tuple(template.velocities.shape), dtype=template.velocities.dtype,
                                  device=template.velocities.device) if stochastic else None)
        self.out_pos = torch.empty((k,) + tuple(template.positions.shape), dtype=template.positions.dtype,
                                   device=template.positions.device)
        self.out_vel = torch.empty_like(self.out_pos)
        self.out_forces = torch.empty_like(self.out_pos)
        self.out_energy = torch.empty((k,) + tuple(template.energy.shape), dtype=template.energy.dtype,
                                      device=template.energy.device)
        if emulate:
            self.graph = None
            return
        # warm-up (library handles, autograd engine, allocator) on a side stream, on copies
        side = torch.cuda.Stream(device=template.positions.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            vals = [t.clone() for t in self.inputs]
            for _ in range(max(1, warmup_steps)):
                vals = tensor_step(*vals, self.masses, torch.zeros_like(self.out_vel[0]) if stochastic else None)
        torch.cuda.current_stream().wait_stream(side)
        # a private memory pool per graph: every tensor made inside the block is a temporary (the
        # outputs go to the static buffers above), so nothing in the pool outlives a replay
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self._body()

    def _body(self) -> None:
        vals = tuple(self.inputs)
        for j in range(self.k):
            vals = self.tensor_step(*vals, self.masses, self.noise[j] if self.stochastic else None)
            self.out_pos[j].copy_(vals[0])
            self.out_vel[j].copy_(vals[1])
            self.out_forces[j].copy_(vals[2])
            self.out_energy[j].copy_(vals[3])
        for buf, v in zip(self.inputs, vals):  # the graph advances its own state in place
            buf.copy_(v)

    def replay(self, state: MDState, noise: Optional[Tensor]):
        for buf, v in zip(self.inputs, _fields(state)):
            buf.copy_(v)
        self.masses.copy_(state.masses)
        if self.stochastic:
            self.noise.copy_(noise)
        if self.emulate:
            self._body()
        else:
            self.graph.replay()
        new = _with_fields(state, [t.clone() for t in self.inputs])
        return new, (self.out_pos.clone(), self.out_vel.clone(), self.out_forces.clone(), self.out_energy.clone())


# ----------------------------------------------------------------------------- cache
_STEPPERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_stepper(integrator: Integrator, force_fn, state: MDState, backend: str, **options) -> FastStepper:
    """A :class:`FastStepper`, cached per force function (weakly) and per integrator settings,
    replica count, atoms, dtype, device and options, so that repeated rollouts (StABlE epochs)
    reuse compiled code and captured graphs."""
    key = (integrator.name, integrator.dt, tuple(sorted(integrator.params.items())), backend,
           state.n_replicas, state.n_atoms, state.positions.dtype, str(state.positions.device),
           state.cell is None, tuple(sorted(options.items())), getattr(integrator, "rows_key", None))
    try:
        per_ff = _STEPPERS.setdefault(force_fn, {})
    except TypeError:  # not weak-referenceable: no cache
        return FastStepper(integrator, force_fn, state, backend, **options)
    stepper = per_ff.get(key)
    if stepper is None:
        stepper = FastStepper(integrator, force_fn, state, backend, **options)
        per_ff[key] = stepper
    return stepper
