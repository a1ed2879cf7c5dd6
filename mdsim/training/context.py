"""What StABlE training and evaluation share: the run context built from a config (data,
system, model, force field, integrator, references), this rank's shard of the replicas, the
initial MD state of a shard and the integrator/generator pair of a sharded rollout."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mdsim.config import StableConfig, to_dict
from mdsim.md.forces import ModelForceField
from mdsim.md.init import initial_state
from mdsim.md.integrators import make_integrator
from mdsim.md.state import MDState
from mdsim.models.checkpoint import load_model, save_checkpoint
from mdsim.units import KB

from . import distributed, setup
from .io import resolve_device
from .targets import ObservableSet, References

#: test frames used for the energy/force errors (logged during training, reported by evaluation)
EF_TEST_FRAMES = 1000


def quiet(*args, **kwargs) -> None:
    """A ``log`` function that prints nothing (ranks other than 0)."""


@dataclass
class RunContext:
    """Everything fixed for a run (built once by :func:`prepare`)."""
    cfg: StableConfig
    device: torch.device
    dtype: torch.dtype
    folder: Path
    train: object
    test: object
    system: object
    oset: ObservableSet
    refs: References
    model: torch.nn.Module
    ckpt: dict
    ckpt_path: Path
    force_field: ModelForceField
    integrator: object
    kT: float


def load_references(cfg: StableConfig, oset: ObservableSet, train, log=print) -> References:
    size = setup.reference_size(cfg)
    try:
        ref = setup.split(cfg, "train", size)
    except Exception:
        log(f"reference split {size}/train missing; using {cfg.size}/train for reference observables")
        ref = train
    contiguous = None
    for which in ("val", "train"):  # the original uses contiguous val; train when val is too short
        try:
            c = setup.split(cfg, which, size, contiguous=True)
        except Exception:
            continue
        if len(c) > cfg.vacf_window + 1:
            contiguous = c
            break
    if contiguous is None:
        log("no contiguous split long enough for a reference VACF "
            "(download_stable_paper_data.py --contiguous); VACF metrics are skipped")
    return oset.references(ref, cfg.temperature, contiguous, cfg.data_temperature)


def prepare(cfg: StableConfig, checkpoint: Optional[Path] = None, log=print,
            device: Optional[torch.device] = None) -> RunContext:
    device = setup_device = device if device is not None else resolve_device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    folder = setup.run_folder(cfg)
    train = setup.split(cfg, "train")
    test = setup.split(cfg, "test")
    system = setup.build_system(cfg, train, dtype=dtype).to(device)
    ckpt_path = Path(checkpoint) if checkpoint else setup.pretrained_checkpoint(cfg)
    model, ckpt = load_model(ckpt_path, device=setup_device)
    setup.check_compatible(cfg, train, ckpt, ckpt_path)
    model = model.to(dtype)
    vstride = setup.vacf_stride(train.frame_spacing_fs, cfg.timestep)
    oset = ObservableSet(cfg, system, vacf_stride=vstride)
    refs = load_references(cfg, oset, train, log)
    ff = ModelForceField(model, system.atomic_numbers, dtype=dtype, neighbor_skin=cfg.neighbor_skin,
                         radial_table_spacing=cfg.radial_table_spacing)
    integ = make_integrator(cfg.integrator, cfg.timestep, cfg.temperature,
                            {"ttime": cfg.integrator_config.ttime, "gamma": cfg.integrator_config.gamma},
                            dof_convention=cfg.dof_convention)
    return RunContext(cfg, device, dtype, folder, train, test, system, oset, refs, model, ckpt, ckpt_path,
                      ff, integ, KB * cfg.temperature)


def save_model(ctx: RunContext, path: Path, epoch: int, extra: Optional[dict] = None) -> None:
    pre_cfg = ctx.ckpt.get("config") or {}
    save_checkpoint(path, ctx.model, {"epoch": epoch, "step": epoch, "config": pre_cfg,
                                      "stable_config": to_dict(ctx.cfg), **(extra or {})})


@dataclass
class Shard:
    """This rank's replicas [lo, hi) of ``total`` (all of them in a single process)."""
    lo: int
    hi: int
    total: int

    @classmethod
    def of(cls, comm: distributed.Comm, n: int) -> "Shard":
        return cls(*comm.shard(n), n)

    def local(self, s: MDState) -> MDState:
        return distributed.local_state(s, self.lo, self.hi)


def initial_shard(ctx: RunContext, frames, n: int, gen, shard: Shard, mode: str) -> MDState:
    """Initial state of this rank's replicas: frames, noise and velocities are drawn for all
    ``n`` replicas exactly as a single process would, forces only for the shard."""
    cfg = ctx.cfg
    if shard.lo == 0 and shard.hi == n:
        return initial_state(ctx.system, frames, ctx.force_field, n, cfg.temperature, generator=gen,
                             mode=mode, ic_stddev=cfg.ic_stddev, dtype=ctx.dtype, device=ctx.device,
                             dof_convention=cfg.dof_convention)

    def no_forces(pos, cell):
        return torch.zeros(pos.shape[0], dtype=pos.dtype, device=pos.device), torch.zeros_like(pos)

    full = initial_state(ctx.system, frames, no_forces, n, cfg.temperature, generator=gen, mode=mode,
                         ic_stddev=cfg.ic_stddev, dtype=ctx.dtype, device=ctx.device,
                         dof_convention=cfg.dof_convention)
    st = shard.local(full).clone()
    st.energy, st.forces = ctx.force_field(st.positions, st.cell)
    return st


def md_integrator(ctx: RunContext, comm: distributed.Comm, shard: Shard, gen: torch.Generator):
    """(integrator, generator) for this rank's rollouts: a sharded stochastic integrator draws
    the noise of all replicas from the shared generator and keeps its rows
    (:class:`distributed.GlobalNoiseIntegrator`, :class:`distributed.ShardedGenerator`)."""
    if comm.distributed and ctx.integrator.stochastic:
        return (distributed.GlobalNoiseIntegrator(ctx.integrator, shard.lo, shard.hi, shard.total),
                distributed.ShardedGenerator(gen))
    return ctx.integrator, gen
