"""The StABlE training loop (spec §6) with atomic, bit-exact resume.

Each epoch simulates all replicas for ``steps`` steps, checks stability on the frames stored
every ``n_dump`` steps and, in a learning epoch, updates the parameters with the
Boltzmann-estimator gradient of the observable loss plus the QM energy/force gradient.

Phases: in the *simulation phase* replicas continue from where they stopped; unstable ones
restart from their state at the start of the epoch (with fresh Maxwell–Boltzmann velocities,
so a deterministic thermostat does not replay the same failure), and ``reset_probability`` of
the stable ones jump to a random earlier start state.  A replica that went unstable stays
counted as unstable until the next learning phase (in the original, restarting from the same
state with the same velocities made instability absorbing; here the count is explicit).  Once
the fraction of such replicas reaches ``max_frac_unstable_threshold`` a *learning phase*
(cycle) begins: every learning epoch
restarts all replicas from the start states of the epoch that triggered it, simulates with the
current parameters and takes one optimizer step; ReduceLROnPlateau (×0.2, patience 10) on the
unstable fraction lowers the learning rate, and the cycle ends when it falls to
lr/5^max_times_reduce_lr or the unstable fraction drops to ``min_frac_unstable_threshold``.

Everything needed to continue (parameters, optimizer, scheduler, MD states, RNG state, phase)
is written atomically to ``resume.pt`` after every epoch: rerunning the same command after a
crash or ``kill -9`` continues and ends with the same parameters as an uninterrupted run.

Under ``torchrun --nproc_per_node=N`` the replicas are split into N contiguous shards, one per
rank; every rank draws the random numbers of all replicas from the same generators and keeps
its shard, the stability flags are all-gathered, the estimator's mean observable and the
gradients are all-reduced, and every rank takes the same optimizer step, so the run reproduces
the single-process run up to float summation order (docs/distributed.md).  Only rank 0 writes.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mdsim.config import StableConfig, to_dict
from mdsim.md.forces import ModelForceField
from mdsim.md.init import initial_state, maxwell_boltzmann_velocities
from mdsim.md.integrators import make_integrator
from mdsim.md.rollout import simulate
from mdsim.md.stability import stability_values
from mdsim.md.state import MDState
from mdsim.models.checkpoint import load_model, save_checkpoint
from mdsim.units import KB

from . import distributed, setup
from .io import resolve_device, write_yaml
from .learning import (EFLossSettings, apply_update, energy_force_gradient, local_observable_gradient,
                       observable_gradient, sharded_observable_gradient)
from .pretrain import evaluate
from .targets import ObservableSet, References, squared_error, training_observable

#: earlier start states kept for random resets (the original keeps all; memory grows with epochs)
MAX_SAVED_STARTS = 50
#: test frames used for the energy/force errors logged during training
EF_TEST_FRAMES = 1000


def _state_dict(s: MDState) -> dict:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.__dict__.items()}


def _state_from(d: dict, device) -> MDState:
    return MDState(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()})


def _where(mask: torch.Tensor, a: MDState, b: MDState) -> MDState:
    """Per replica: ``a`` where mask else ``b``."""
    kw = {}
    for k, va in a.__dict__.items():
        vb = getattr(b, k)
        if k == "masses" or va is None:
            kw[k] = va
            continue
        m = mask.reshape((-1,) + (1,) * (va.dim() - 1))
        kw[k] = torch.where(m, va, vb)
    return MDState(**kw)


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
    ff = ModelForceField(model, system.atomic_numbers, dtype=dtype)
    integ = make_integrator(cfg.integrator, cfg.timestep, cfg.temperature,
                            {"ttime": cfg.integrator_config.ttime, "gamma": cfg.integrator_config.gamma})
    return RunContext(cfg, device, dtype, folder, train, test, system, oset, refs, model, ckpt, ckpt_path,
                      ff, integ, KB * cfg.temperature)


def epoch_observables(ctx: RunContext, rec, comm: Optional[distributed.Comm] = None) -> Dict[str, float]:
    """Monitoring losses of one epoch (mean over replicas and frames vs references).  With a
    distributed ``comm`` the sums over this rank's replicas are all-reduced first."""
    comm = comm or distributed.Comm()
    pos = rec.frames.to(torch.float64)
    F, R = pos.shape[:2]
    flat = pos.reshape(F * R, *pos.shape[2:])
    finite = torch.isfinite(flat).all(dim=(1, 2))
    M, A = ctx.refs.rdf_smeared.numel(), ctx.refs.adf.numel()
    sums = torch.zeros(M + A + 1, dtype=torch.float64, device=pos.device)
    if finite.any():
        good = flat[finite]
        sums[:M] = ctx.oset.rdf_smeared(good).sum(0)
        sums[M:M + A] = ctx.oset.adf(good).sum(0)
        sums[-1] = good.shape[0]
    comm.all_reduce(sums)
    out = {}
    if sums[-1] > 0:
        out["Observable Loss"] = squared_error(sums[:M] / sums[-1], ctx.refs.rdf_smeared)
        out["ADF Loss"] = squared_error(sums[M:M + A] / sums[-1], ctx.refs.adf)
    if ctx.refs.vacf is not None and rec.velocities is not None and rec.velocities.shape[0] >= ctx.cfg.vacf_window:
        v = rec.velocities[::1].to(torch.float64)
        vac = ctx.oset.vacf(v)
        ok = torch.isfinite(vac).all(dim=-1)
        W = ctx.refs.vacf.numel()
        vs = torch.zeros(W + 1, dtype=torch.float64, device=vac.device)
        if ok.any():
            vs[:W] = vac[ok].sum(0)
            vs[-1] = int(ok.sum())
        comm.all_reduce(vs)
        if vs[-1] > 0:
            out["VACF Loss"] = squared_error(vs[:W] / vs[-1], ctx.refs.vacf)
    return out


def _new_optimizer(cfg: StableConfig, model, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if cfg.optimizer == "SGD" else torch.optim.Adam(params, lr=lr))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.2, patience=10)
    return opt, sched


def _fresh_velocities(ctx: RunContext, n: int, gen) -> torch.Tensor:
    return maxwell_boltzmann_velocities(ctx.system.masses, n, ctx.cfg.temperature, gen,
                                        dtype=ctx.dtype, device=ctx.device)


@dataclass
class Shard:
    """This rank's replicas [lo, hi) of ``total`` (all of them in a single process)."""
    lo: int
    hi: int
    total: int

    def local(self, s: MDState) -> MDState:
        return distributed.local_state(s, self.lo, self.hi)


def _restart(ctx: RunContext, target: MDState, mask: torch.Tensor, source: MDState, gen,
             shard: Optional[Shard] = None) -> MDState:
    """Replicas ``mask`` (all replicas, global indices) of ``target`` restart from ``source``
    positions with fresh velocities.  ``target`` and ``source`` hold this rank's shard; the
    velocities are drawn for all replicas (so the generator advances alike on every rank)."""
    shard = shard or Shard(0, target.n_replicas, target.n_replicas)
    if not bool(mask.any()):
        return target
    fresh = source.clone()
    fresh.velocities = _fresh_velocities(ctx, shard.total, gen)[shard.lo:shard.hi]
    fresh.zeta = torch.zeros_like(fresh.zeta)
    fresh.energy, fresh.forces = ctx.force_field(fresh.positions, fresh.cell)
    return _where(mask[shard.lo:shard.hi], fresh, target)


def _initial_shard(ctx: RunContext, frames, n: int, gen, shard: Shard, mode: str) -> MDState:
    """Initial state of this rank's replicas: frames, noise and velocities are drawn for all
    ``n`` replicas exactly as a single process would, forces only for the shard."""
    cfg = ctx.cfg
    if shard.lo == 0 and shard.hi == n:
        return initial_state(ctx.system, frames, ctx.force_field, n, cfg.temperature, generator=gen,
                             mode=mode, ic_stddev=cfg.ic_stddev, dtype=ctx.dtype, device=ctx.device)

    def no_forces(pos, cell):
        return torch.zeros(pos.shape[0], dtype=pos.dtype, device=pos.device), torch.zeros_like(pos)

    full = initial_state(ctx.system, frames, no_forces, n, cfg.temperature, generator=gen, mode=mode,
                         ic_stddev=cfg.ic_stddev, dtype=ctx.dtype, device=ctx.device)
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


def _sample_order(frames_ok: torch.Tensor, sel: torch.Tensor, shard: Shard, comm: distributed.Comm,
                  shuffle_gen) -> tuple:
    """Estimator samples of this rank, in the order a single process would use them.

    ``frames_ok`` (F, r) finite flags of this rank's selected replicas, ``sel`` (R,) the global
    replica selection.  A single process flattens (frame, selected replica) row-major, keeps
    the finite samples and shuffles them with one permutation of all of them; here the same
    global indices are computed, the same permutation is drawn (the generator advances alike
    on every rank) and this rank's samples are ordered by it.  Returns (order into this rank's
    finite samples, number of samples over all ranks)."""
    sizes = [int(sel[a:b].sum()) for a, b in (distributed.shard_range(shard.total, r, comm.world_size)
                                               for r in range(comm.world_size))]
    ok_all = comm.all_gather_cat(frames_ok.T.contiguous(), sizes).T  # (F, r_total)
    F, r_tot = ok_all.shape
    offset = int(sel[:shard.lo].sum())
    post = torch.cumsum(ok_all.reshape(-1).long(), 0) - 1  # index among the finite samples
    cols = torch.arange(offset, offset + frames_ok.shape[1], device=ok_all.device)
    ids = (torch.arange(F, device=ok_all.device)[:, None] * r_tot + cols[None, :])[frames_ok]
    gids = post[ids]
    n_total = int(ok_all.sum())
    if shuffle_gen is None:
        return torch.argsort(gids), n_total
    perm = torch.randperm(n_total, generator=shuffle_gen)
    rank_of = torch.empty_like(perm)
    rank_of[perm] = torch.arange(n_total)
    return torch.argsort(rank_of[gids.cpu()]).to(frames_ok.device), n_total


def save_model(ctx: RunContext, path: Path, epoch: int, extra: Optional[dict] = None) -> None:
    pre_cfg = ctx.ckpt.get("config") or {}
    save_checkpoint(path, ctx.model, {"epoch": epoch, "step": epoch, "config": pre_cfg,
                                      "stable_config": to_dict(ctx.cfg), **(extra or {})})


def _quiet(*args, **kwargs):
    pass


def train(cfg: StableConfig, log=print) -> Path:
    """Run (or resume) StABlE training; returns the run folder.  Under torchrun the replicas
    are sharded over the ranks (module docstring)."""
    comm = distributed.setup(cfg.device)
    main = comm.is_main
    if not main:
        log = _quiet
    R = cfg.n_replicas
    if R < comm.world_size:
        raise setup.SetupError(f"n_replicas {R} is smaller than the {comm.world_size} processes; "
                               "every rank needs at least one replica")
    if cfg.local_estimator and comm.distributed:
        raise setup.SetupError("local_estimator: true runs in a single process only (launch without torchrun)")
    ctx = prepare(cfg, log=log, device=comm.device)
    if cfg.local_estimator and ctx.system.molecule_index is None:
        raise setup.SetupError("local_estimator: true needs molecule membership (molecule_index) in the data")
    folder = ctx.folder
    shard = Shard(*comm.shard(R), R)
    sizes = comm.shard_sizes(R)
    if main:
        folder.mkdir(parents=True, exist_ok=True)
        write_yaml(folder / "stable_training_config.yml", to_dict(cfg))
        if ctx.ckpt.get("config"):
            write_yaml(folder / "pretraining_config.yml", ctx.ckpt["config"])
        for k, v in ctx.refs.as_numpy().items():
            np.save(folder / f"{k}.npy", v)
    log(f"run folder: {folder}; reference RDF reweighting ESS {ctx.refs.ess:.1f} "
        f"(data {ctx.refs.data_temperature:g} K → simulation {cfg.temperature:g} K)")
    if comm.distributed:
        log(f"distributed: {comm.world_size} processes ({comm.device.type}), replicas per rank {sizes}")

    def gather(s: MDState) -> MDState:
        """Global copy of a sharded state (every rank gets it)."""
        return s.clone() if not comm.distributed else distributed.gather_state(comm, s, sizes)

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    shuffle_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    model = ctx.model
    integrator, md_gen = md_integrator(ctx, comm, shard, gen)
    always_learn = not cfg.only_learn_if_unstable_threshold_reached
    min_lr = cfg.lr / (5 ** cfg.max_times_reduce_lr)
    ef = EFLossSettings.from_checkpoint(ctx.ckpt)
    obs_weight = 1.0 if cfg.original_obs_weighting else cfg.obs_loss_weight
    target = training_observable(cfg.training_observable, ctx.oset, ctx.refs)

    # MD states: ``state`` holds this rank's replicas; ``learn_start`` and ``saved_starts`` are
    # kept for all replicas (resets pick sources by global index; resume.pt stores them whole)
    resume_path = folder / "resume.pt"
    if resume_path.exists():
        rs = torch.load(resume_path, map_location="cpu", weights_only=False)
        if rs["config"] != to_dict(cfg):
            # keys missing from an older run's config count as their defaults
            default = to_dict(StableConfig())
            old, new = {**default, **rs["config"]}, to_dict(cfg)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if set(changed) - {"n_epochs", "progress"}:
                raise setup.SetupError(f"{resume_path} belongs to a run with other settings ({changed}); "
                                       "use another exp_name or delete the folder")
        model.load_state_dict(rs["model"])
        state = shard.local(_state_from(rs["state"], ctx.device))
        learn_start = _state_from(rs["learn_start"], ctx.device) if rs["learn_start"] else None
        saved_starts = [_state_from(s, ctx.device) for s in rs["saved_starts"]]
        flagged = rs["flagged"].to(ctx.device)
        gen.set_state(rs["gen"])
        shuffle_gen.set_state(rs["shuffle_gen"])
        p = rs["phase"]
        learning, cycle, learn_epoch, epoch0 = p["learning"], p["cycle"], p["learn_epoch"], p["epoch"]
        lr_now = p["lr"]
        optimizer, scheduler = _new_optimizer(cfg, model, lr_now)
        optimizer.load_state_dict(rs["optimizer"])
        scheduler.load_state_dict(rs["scheduler"])
        log(f"resuming {folder} at epoch {epoch0}")
    else:
        state = _initial_shard(ctx, ctx.train.R, R, gen, shard, "random")
        learn_start, saved_starts = None, []
        flagged = torch.zeros(R, dtype=torch.bool, device=ctx.device)
        learning, cycle, learn_epoch, epoch0 = always_learn, 0, 0, 0
        lr_now = cfg.lr if always_learn else 0.0
        optimizer, scheduler = _new_optimizer(cfg, model, lr_now)
    comm.check_same(model)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(folder / "logs"), purge_step=epoch0 + 1)
    bar = tqdm(total=cfg.n_epochs, initial=epoch0, desc="StABlE", disable=not (cfg.progress and main))
    for epoch in range(epoch0, cfg.n_epochs):
        t0 = time.time()
        start = (shard.local(learn_start).clone() if (learning and learn_start is not None and not always_learn)
                 else state)
        end, rec = simulate(integrator, ctx.force_field, start.clone(), cfg.steps, cfg.n_dump,
                            cfg.eq_steps, ctx.oset.vacf_stride, md_gen, progress=False,
                            backend=cfg.md_backend)
        unstable_fr, values = stability_values(rec.frames, ctx.system, energy=rec.energies)
        unstable = comm.all_gather_cat(unstable_fr.any(dim=0), sizes)  # all replicas
        if not learning:
            flagged = flagged | unstable  # unstable since the last learning phase
            u = float(flagged.float().mean())
        else:
            u = float(unstable.float().mean())
        sim_time = time.time() - t0
        scalars = {"Fraction of Unstable Replicas": u, "Simulation Time": sim_time,
                   "Learning Rate": optimizer.param_groups[0]["lr"]}
        crit_name = ("Max Bond Length Deviation" if cfg.stability_criterion == "bond_length_deviation"
                     else "Min Intermolecular Distances")
        use_max = cfg.stability_criterion == "bond_length_deviation"
        vals = values[torch.isfinite(values)]
        ext = torch.tensor([(vals.max() if use_max else vals.min()).item() if vals.numel()
                            else (-math.inf if use_max else math.inf)], dtype=torch.float64, device=ctx.device)
        ext = float(comm.all_reduce(ext, "max" if use_max else "min"))
        if math.isfinite(ext):
            scalars[crit_name] = ext
        scalars.update(epoch_observables(ctx, rec, comm))
        if epoch == 0 or learning:
            m = evaluate(model, ctx.test, 100, ctx.device, ctx.dtype, max_frames=EF_TEST_FRAMES, comm=comm)
            scalars.update({"Energy MAE": m["energy_mae"], "Force MAE": m["forces_mae"],
                            "Energy RMSE": m["energy_rmse"], "Force RMSE": m["forces_rmse"]})

        if learning and cfg.obs_loss_weight != 0:
            sel = (unstable if (cfg.only_train_on_unstable_replicas and unstable.any())
                   else torch.ones_like(unstable))
            samples = rec.frames[:, sel[shard.lo:shard.hi]]
            ok = torch.isfinite(samples).all(dim=(2, 3))
            cell = ctx.system.cell if ctx.system.pbc else None
            if cfg.local_estimator:
                flat_s = samples.reshape(-1, *samples.shape[2:])
                g_obs, obs_loss = local_observable_gradient(
                    model, flat_s[ok.reshape(-1)], ctx.system, cfg.n_local_neighborhoods, cfg.n_closest_molecules,
                    ctx.kT, cfg.minibatch_size, cfg.boltzmann_scale_by_kT, ctx.dtype, shuffle_gen)
            elif comm.distributed:
                order, _ = _sample_order(ok, sel, shard, comm, shuffle_gen if cfg.shuffle else None)
                local = samples[ok][order]
                g_obs, obs_loss = sharded_observable_gradient(
                    model, target, local, ctx.system.atomic_numbers, cell, ctx.kT, cfg.minibatch_size,
                    cfg.boltzmann_scale_by_kT, comm, ctx.dtype)
            else:
                flat_s = samples.reshape(-1, *samples.shape[2:])
                g_obs, obs_loss = observable_gradient(
                    model, target, flat_s[ok.reshape(-1)], ctx.system.atomic_numbers, cell, ctx.kT,
                    cfg.minibatch_size, cfg.boltzmann_scale_by_kT, ctx.dtype,
                    shuffle_gen if cfg.shuffle else None)
            g_ef = None
            if cfg.energy_force_loss_weight:
                g_ef, ef_loss = energy_force_gradient(model, ctx.train, ef, cfg.minibatch_size, ctx.device,
                                                      ctx.dtype, comm=comm)
                scalars["Energy-Force Loss"] = ef_loss
            info = apply_update(model, optimizer, g_obs, g_ef, obs_weight, cfg.energy_force_loss_weight,
                                cfg.grad_clip_norm_threshold if cfg.gradient_clipping else None)
            comm.check_same(model)  # every rank took the same step
            scalars["Loss"] = cfg.obs_loss_weight * (obs_loss or 0.0)
            scalars["Gradient Norm"] = info["grad_norm"]
            if "cosine" in info:
                scalars["Gradient Cosine Similarity (Observable vs Energy-Force)"] = info["cosine"]
                scalars["Gradient Ratios (Observable vs Energy-Force)"] = info["ratio"]
            scheduler.step(u)
            learn_epoch += 1
            if main:
                save_model(ctx, folder / f"cycle{cycle + 1}_epoch{learn_epoch}.pt", epoch + 1)
                shutil.copyfile(folder / f"cycle{cycle + 1}_epoch{learn_epoch}.pt", folder / "ckpt.pt")
            lr_now = optimizer.param_groups[0]["lr"]
            if not always_learn and (lr_now <= min_lr * (1 + 1e-9) or u <= cfg.min_frac_unstable_threshold):
                cycle += 1
                if main:
                    save_model(ctx, folder / f"end_of_cycle{cycle}.pt", epoch + 1)
                    shutil.copyfile(folder / f"end_of_cycle{cycle}.pt", folder / "ckpt.pt")
                log(f"epoch {epoch + 1}: end of learning cycle {cycle} (lr {lr_now:.3g}, unstable {u:.2f})")
                learning, learn_epoch, learn_start = False, 0, None
                flagged = torch.zeros_like(flagged)
                optimizer, scheduler = _new_optimizer(cfg, model, 0.0)
                state = _restart(ctx, end, unstable, start, gen, shard)
            elif always_learn:
                state = _restart(ctx, end, unstable, start, gen, shard)
        else:
            if (not learning) and u >= cfg.max_frac_unstable_threshold and cfg.obs_loss_weight != 0:
                learning, learn_epoch, learn_start = True, 0, gather(start)
                optimizer, scheduler = _new_optimizer(cfg, model, cfg.lr)
                log(f"epoch {epoch + 1}: {u:.0%} of replicas unstable → learning cycle {cycle + 1}")
            else:
                nxt = _restart(ctx, end, unstable, start, gen, shard)
                stable_idx = torch.nonzero(~unstable).reshape(-1)
                n_jump = int(math.ceil(cfg.reset_probability * stable_idx.numel()))
                if n_jump and saved_starts:
                    pick = stable_idx[torch.randperm(stable_idx.numel(), generator=gen)[:n_jump].to(stable_idx.device)]
                    src = saved_starts[int(torch.randint(len(saved_starts), (1,), generator=gen))]
                    mask = torch.zeros_like(unstable)
                    mask[pick] = True
                    nxt = _restart(ctx, nxt, mask, shard.local(src), gen, shard)
                saved_starts = (saved_starts + [gather(start)])[-MAX_SAVED_STARTS:]
                state = nxt
        if writer is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
        bar.update(1)
        bar.set_postfix(unstable=f"{u:.2f}", learning=int(learning), cycle=cycle)
        state_all = gather(state) if comm.distributed else state
        if main:
            torch_save_resume(resume_path, {
                "config": to_dict(cfg), "model": model.state_dict(), "state": _state_dict(state_all),
                "learn_start": _state_dict(learn_start) if learn_start is not None else None,
                "saved_starts": [_state_dict(s) for s in saved_starts], "gen": gen.get_state(),
                "flagged": flagged.cpu(),
                "shuffle_gen": shuffle_gen.get_state(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "world_size": comm.world_size,
                "phase": {"learning": learning, "cycle": cycle, "learn_epoch": learn_epoch, "epoch": epoch + 1,
                          "lr": optimizer.param_groups[0]["lr"]}})
    bar.close()
    if writer is not None:
        writer.close()
    if main and not (folder / "ckpt.pt").exists():
        save_model(ctx, folder / "ckpt.pt", cfg.n_epochs)
    log(f"done: {folder}")
    return folder


def torch_save_resume(path: Path, obj: dict) -> None:
    from mdsim.atomic import atomic_torch_save
    atomic_torch_save(obj, path)
