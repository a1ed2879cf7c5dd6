"""Multi-process training with ``torch.distributed`` (see docs/distributed.md).

Launched by ``torchrun --nproc_per_node=N pretraining.py|stable_training.py ...`` (the
environment then holds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), :func:`setup`
initialises the default process group — NCCL for CUDA tensors (plus gloo for the few CPU-side
collectives), gloo on the CPU — and returns a :class:`Comm`.  Without torchrun it returns a
single-process :class:`Comm` whose collectives are identities, so the training code has one
path and a plain ``python stable_training.py`` run never touches ``torch.distributed``.

Also here: contiguous sharding of replicas/frames over ranks, gathering of sharded MD states,
a parameter-consistency check and :class:`GlobalNoiseIntegrator`, which makes a rank's
stochastic integrator draw the noise of all replicas from the shared generator and keep its
shard (so a sharded run reproduces a single-process run).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_OWNED = {"group": False}  # whether this module initialised the default process group


def launched_by_torchrun() -> bool:
    """True when the torchrun/``torch.distributed.run`` environment variables are set."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def shard_range(n: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous slice [lo, hi) of ``n`` items owned by ``rank``: the first n % W ranks get
    one item more than the others."""
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class Comm:
    """The collectives the training code needs; identities when ``world_size`` is 1 and no
    process group exists."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False  # a process group is in use

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ sharding
    def shard(self, n: int) -> Tuple[int, int]:
        return shard_range(n, self.rank, self.world_size)

    def shard_sizes(self, n: int) -> List[int]:
        return [b - a for a, b in (shard_range(n, r, self.world_size) for r in range(self.world_size))]

    # --------------------------------------------------------------- collectives
    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """All-reduce ``t`` in place (sum, max or min) and return it."""
        if not self.distributed:
            return t
        import torch.distributed as dist
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(t, op=ops[op])
        return t

    def all_reduce_tensors(self, tensors: List[Tensor]) -> List[Tensor]:
        """Sum a list of tensors over ranks (one flat buffer, one collective); the list itself
        without a process group."""
        if not self.distributed or not tensors:
            return tensors
        flat = self.all_reduce(torch.cat([t.reshape(-1) for t in tensors]))
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        return out

    def sum_floats(self, *values: float) -> List[float]:
        """Sum Python floats over ranks (float64, one collective)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._coll_device())
        return self.all_reduce(t).tolist()

    def broadcast_float(self, value: float, src: int = 0) -> float:
        """``value`` of rank ``src`` on every rank."""
        if not self.distributed:
            return float(value)
        import torch.distributed as dist
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._coll_device())
        dist.broadcast(t, src)
        return float(t.item())

    def all_gather_cat(self, t: Tensor, sizes: Optional[Sequence[int]] = None) -> Tensor:
        """Concatenate every rank's ``t`` along dim 0, in rank order.  ``sizes`` (rows per rank)
        allows different row counts (padding is added and removed here); None = equal shapes."""
        if not self.distributed:
            return t
        import torch.distributed as dist
        orig_dtype = t.dtype
        x = t.to(torch.uint8) if orig_dtype == torch.bool else t
        x = x.contiguous()
        if sizes is None:
            sizes = [x.shape[0]] * self.world_size
        sizes = [int(s) for s in sizes]
        if x.shape[0] != sizes[self.rank]:
            raise ValueError(f"all_gather_cat: rank {self.rank} has {x.shape[0]} rows, sizes say {sizes[self.rank]}")
        m = max(sizes)
        if x.shape[0] < m:
            x = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x)
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        return out.to(torch.bool) if orig_dtype == torch.bool else out

    def gather_cat(self, t: Tensor, sizes: Sequence[int], dst: int = 0) -> Optional[Tensor]:
        """Like :meth:`all_gather_cat` but only rank ``dst`` receives the result (None
        elsewhere); for large arrays (trajectories) that only the writing rank needs."""
        if not self.distributed:
            return t
        import torch.distributed as dist
        orig_dtype = t.dtype
        x = (t.to(torch.uint8) if orig_dtype == torch.bool else t).contiguous()
        sizes = [int(s) for s in sizes]
        m = max(sizes)
        if x.shape[0] < m:
            x = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.rank == dst else None
        dist.gather(x, parts, dst=dst)
        if self.rank != dst:
            return None
        out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
        return out.to(torch.bool) if orig_dtype == torch.bool else out

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    def _coll_device(self) -> torch.device:
        return self.device

    # -------------------------------------------------------------- consistency
    def check_same(self, model: torch.nn.Module, what: str = "parameters") -> None:
        """Raise if the model's parameters differ between ranks (two float64 checksums,
        compared exactly: every rank must have taken bit-identical steps)."""
        if not self.distributed:
            return
        c = parameter_checksum(model).to(self._coll_device())
        lo = self.all_reduce(c.clone(), "min")
        hi = self.all_reduce(c.clone(), "max")
        if not torch.equal(lo, hi):
            raise RuntimeError(f"{what} differ between ranks (checksums min {lo.tolist()} max {hi.tolist()}); "
                               "the ranks' updates diverged")


def parameter_checksum(model: torch.nn.Module) -> Tensor:
    """(2,) float64: sum and position-weighted sum of all parameters."""
    s, w = [], []
    for i, p in enumerate(model.parameters()):
        d = p.detach().to(torch.float64).reshape(-1)
        s.append(d.sum())
        w.append((d * torch.linspace(1.0, 2.0, d.numel(), dtype=torch.float64, device=d.device)).sum() * (i + 1))
    if not s:
        return torch.zeros(2, dtype=torch.float64)
    return torch.stack([torch.stack(s).sum(), torch.stack(w).sum()])


def resolve_device(name: str, local_rank: int = 0, under_torchrun: bool = False) -> torch.device:
    """The config's ``device`` for this process: under torchrun a CUDA device (``auto`` with a
    GPU, ``cuda`` or ``cuda:N``) becomes ``cuda:LOCAL_RANK``."""
    from .io import resolve_device as plain
    dev = plain(name)
    if under_torchrun and dev.type == "cuda":
        if name not in ("auto", "cuda") and dev.index not in (None, local_rank):
            warnings.warn(f"device {name!r} under torchrun: using cuda:{local_rank} (LOCAL_RANK)")
        dev = torch.device("cuda", local_rank)
    return dev


def setup(device_name: str = "auto") -> Comm:
    """A :class:`Comm` for this process; initialises the process group under torchrun."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", 0))
        dev = resolve_device(device_name, local, True)
        return Comm(dist.get_rank(), dist.get_world_size(), local, dev, True)
    if not launched_by_torchrun():
        from .io import resolve_device as plain
        return Comm(device=plain(device_name))
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
    local = int(os.environ["LOCAL_RANK"])
    dev = resolve_device(device_name, local, True)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl", device_id=dev)
    else:
        dist.init_process_group(backend="gloo")
    _OWNED["group"] = True
    return Comm(dist.get_rank(), dist.get_world_size(), local, dev, True)


def cleanup() -> None:
    """Destroy the process group if :func:`setup` created it (entry points call this)."""
    import torch.distributed as dist
    if _OWNED["group"] and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED["group"] = False


def wrap_ddp(model: torch.nn.Module, comm: Comm) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when distributed, else ``model`` itself.  Buffers are
    not re-broadcast each forward (they never change during training and caches may differ in
    shape between ranks)."""
    if not comm.distributed:
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    ids = [comm.device.index] if comm.device.type == "cuda" else None
    kw = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
          else {"broadcast_buffers": False})
    # benign: a (1, K) parameter whose gradient comes back with degenerate strides
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(model, device_ids=ids, **kw)


# ------------------------------------------------------------------------ MD states
_PER_REPLICA = ("positions", "velocities", "forces", "energy", "cell", "zeta", "step", "stable", "replica")


def gather_state(comm: Comm, state, sizes: Sequence[int]):
    """The global MDState from every rank's shard (``sizes`` replicas per rank); every rank
    gets it.  Identity without a process group."""
    if not comm.distributed:
        return state
    from mdsim.md.state import MDState
    kw = {"masses": state.masses}
    for k in _PER_REPLICA:
        v = getattr(state, k)
        kw[k] = None if v is None else comm.all_gather_cat(v, sizes)
    return MDState(**kw)


def local_state(state, lo: int, hi: int):
    """Replicas [lo, hi) of a global state (views)."""
    if lo == 0 and hi == state.n_replicas:
        return state
    return state.select(slice(lo, hi))


# ----------------------------------------------------------------- integrator noise
class _GlobalRandn(TorchFunctionMode):
    """Replaces ``torch.randn(shape, generator=G)`` with shape[0] == the local replica count
    by the rows ``rows`` (a slice or an index tensor, ``count`` of them) of a draw for all replicas."""

    def __init__(self, generator: torch.Generator, rows, count: int, total: int):
        super().__init__()
        self.generator, self.rows, self.count, self.total = generator, rows, count, total

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.randn and kwargs.get("generator") is self.generator:
            shape = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            shape = tuple(int(s) for s in shape)
            if not shape or shape[0] != self.count:
                raise RuntimeError(f"sharded noise: expected a draw for {self.count} replicas, "
                                   f"got shape {shape}")
            return func((self.total,) + shape[1:], **kwargs)[self.rows]
        return func(*args, **kwargs)


class ShardedGenerator:
    """The run's shared ``torch.Generator`` as handed to the MD rollouts of a shard.

    Rollouts pass their generator on to ``integrator.step``/``integrator.draw_noise``, where
    :class:`GlobalNoiseIntegrator` unwraps it and draws for all replicas.  The handle is not a
    ``torch.Generator`` on purpose: no rollout code can draw shard-sized noise from it
    directly (which would give every rank the same noise for different replicas); such an
    attempt fails loudly instead."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator


def _unwrap(generator):
    return generator.generator if isinstance(generator, ShardedGenerator) else generator


class GlobalNoiseIntegrator:
    """Wraps an integrator so a rank simulating replicas [lo, hi) of ``total`` draws the random
    numbers of a single-process run with all replicas and keeps its rows (the generator is
    seeded alike and advances alike on every rank).  Rollouts should get the generator as a
    :class:`ShardedGenerator` (see there).

    With integrators that take pre-drawn noise (``draw_noise``/``step(noise=...)``) the draw
    for all replicas is made in :meth:`draw_noise`; otherwise ``torch.randn`` calls on the
    generator inside a step are intercepted (a TorchFunctionMode, lifted while forces are
    computed)."""

    def __init__(self, inner, lo: int, hi: int, total: int, rows: Optional[Sequence[int]] = None):
        """Replicas [lo, hi) of ``total``; or, given ``rows`` (global replica indices, increasing),
        those replicas only (an evaluation that stopped simulating its unstable replicas)."""
        self.inner, self.lo, self.hi, self.total = inner, lo, hi, total
        if rows is None:
            self.rows, self.count = slice(lo, hi), hi - lo
            self.rows_key = ("range", lo, hi, total)
        else:
            self.rows = torch.as_tensor(list(rows), dtype=torch.long)
            self.count = int(self.rows.numel())
            if self.count and not (0 <= int(self.rows.min()) and int(self.rows.max()) < total):
                raise ValueError(f"rows: replica indices must lie in [0, {total})")
            #: steppers are cached per integrator settings: the rows are part of them
            self.rows_key = ("rows", total) + tuple(int(r) for r in self.rows)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _predrawn(self) -> bool:
        return hasattr(self.inner, "draw_noise")

    def draw_noise(self, state, generator=None):
        if not getattr(self.inner, "stochastic", False):
            return None
        generator = _unwrap(generator)
        if not isinstance(generator, torch.Generator):
            raise RuntimeError("sharded replicas need one torch.Generator shared by all ranks")
        from mdsim.md.integrators import randn_like_replicas
        v = state.velocities
        full = torch.empty((self.total,) + tuple(v.shape[1:]), dtype=v.dtype, device=v.device)
        return randn_like_replicas(full, generator)[self.rows.to(v.device) if torch.is_tensor(self.rows) else self.rows]

    def step(self, state, force_fn, generator=None, noise=None):
        generator = _unwrap(generator)
        if noise is not None:
            return self.inner.step(state, force_fn, generator, noise=noise)
        if not (getattr(self.inner, "stochastic", False) and isinstance(generator, torch.Generator)):
            return self.inner.step(state, force_fn, generator)
        if self._predrawn():
            return self.inner.step(state, force_fn, generator, noise=self.draw_noise(state, generator))
        mode = _GlobalRandn(generator, self.rows, self.count, self.total)

        def forces(x, cell):
            mode.__exit__(None, None, None)  # model evaluation without the per-op hook
            try:
                return force_fn(x, cell)
            finally:
                mode.__enter__()

        with mode:
            return self.inner.step(state, forces, generator)
