"""The StABlE training loop (spec §6) with atomic, bit-exact resume.

Each epoch simulates all replicas for ``steps`` steps, checks stability on the frames stored
every ``n_dump`` steps and, in a learning epoch, updates the parameters with the
Boltzmann-estimator gradient of the observable loss plus the QM energy/force gradient.

Phases (rules in :mod:`.phases`): in the *simulation phase* replicas continue from where they stopped; unstable ones
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

Everything needed to continue (parameters, optimizer, scheduler, MD states, RNG state, phase;
:class:`.resume.ResumeState`) is written atomically to ``resume.pt`` after every epoch: rerunning the same command after a
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
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

from mdsim.config import StableConfig, to_dict
from mdsim.estimator import mean_squared_error
from mdsim.md.init import maxwell_boltzmann_velocities, replace_replicas
from mdsim.md.rollout import simulate
from mdsim.md.stability import get_criterion, stability_values
from mdsim.md.state import MDState

from . import distributed, setup
from .context import EF_TEST_FRAMES, RunContext, Shard, initial_shard, md_integrator, prepare, quiet, save_model
from .io import write_yaml
from .learning import (EFLossSettings, apply_update, energy_force_gradient, energy_force_subset,
                       local_observable_gradient, observable_gradient)
from .phases import END_CYCLE, SIMULATED, START_LEARNING, Event, PhaseRules, next_phase
from .pretrain import evaluate
from .resume import ResumeState, check_resumable
from .targets import training_observable

#: earlier start states kept for random resets (the original keeps all; memory grows with epochs)
MAX_SAVED_STARTS = 50


def restart_replicas(ctx: RunContext, target: MDState, mask: torch.Tensor, source: MDState, gen,
                     shard: Optional[Shard] = None) -> MDState:
    """Replicas ``mask`` (all replicas, global indices) of ``target`` restart from ``source``
    positions with fresh velocities.  ``target`` and ``source`` hold this rank's shard; the
    velocities are drawn for all replicas (so the generator advances alike on every rank)."""
    shard = shard or Shard(0, target.n_replicas, target.n_replicas)
    if not bool(mask.any()):
        return target
    fresh = source.clone()
    fresh.velocities = maxwell_boltzmann_velocities(ctx.system.masses, shard.total, ctx.cfg.temperature, gen,
                                                  dtype=ctx.dtype, device=ctx.device,
                                                  dof_convention=ctx.cfg.dof_convention)[shard.lo:shard.hi]
    fresh.zeta = torch.zeros_like(fresh.zeta)
    fresh.energy, fresh.forces = ctx.force_field(fresh.positions, fresh.cell)
    return replace_replicas(target, mask[shard.lo:shard.hi], fresh, keep=())


@dataclass
class FrameObservables:
    """Per-frame monitoring observables of one epoch's finite frames (this rank's replicas),
    computed once for the logged losses and reused by the estimator when its training
    observable is the same function (the smeared RDF for ``rdf``, the ADF for ``adf``)."""
    finite: torch.Tensor  # (F, r) bool
    values: Dict[Callable, torch.Tensor]  # function → (finite frames, K), (frame, replica) row-major

    def rows(self, fn: Callable, keep: torch.Tensor) -> Optional[torch.Tensor]:
        """``fn``'s values of the frames ``keep`` ((F, r) bool, finite ones only) in row-major
        order, or None when ``fn`` was not computed."""
        v = self.values.get(fn)
        return None if v is None else v[keep[self.finite]]


def epoch_observables(ctx: RunContext, rec, comm: Optional[distributed.Comm] = None
                      ) -> Tuple[Dict[str, float], FrameObservables]:
    """Monitoring losses of one epoch (mean over replicas and frames vs references) and the
    per-frame values behind them.  With a distributed ``comm`` the sums over this rank's
    replicas are all-reduced first."""
    comm = comm or distributed.Comm()
    pos = rec.frames.to(torch.float64)
    F, R = pos.shape[:2]
    flat = pos.reshape(F * R, *pos.shape[2:])
    finite = torch.isfinite(flat).all(dim=(1, 2))
    M, A = ctx.refs.rdf_smeared.numel(), ctx.refs.adf.numel()
    sums = torch.zeros(M + A + 1, dtype=torch.float64, device=pos.device)
    per_frame = FrameObservables(finite.reshape(F, R), {})
    if finite.any():
        good = flat[finite]
        for fn, lo, hi in ((ctx.oset.rdf_smeared, 0, M), (ctx.oset.adf, M, M + A)):
            per_frame.values[fn] = fn(good)
            sums[lo:hi] = per_frame.values[fn].sum(0)
        sums[-1] = good.shape[0]
    comm.all_reduce(sums)
    out = {}
    if sums[-1] > 0:
        out["Observable Loss"] = mean_squared_error(sums[:M] / sums[-1], ctx.refs.rdf_smeared)
        out["ADF Loss"] = mean_squared_error(sums[M:M + A] / sums[-1], ctx.refs.adf)
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
            out["VACF Loss"] = mean_squared_error(vs[:W] / vs[-1], ctx.refs.vacf)
    return out, per_frame


def criterion_extreme(cfg: StableConfig, values: torch.Tensor, comm: distributed.Comm) -> Dict[str, float]:
    """The logged extreme of the stability criterion over all replicas and frames: the maximum
    bond-length deviation, the minimum intermolecular distance or the largest RDF MAE (spec §6
    scalars), labelled and directed by the criterion registry."""
    criterion = get_criterion(cfg.stability_criterion)
    crit_name, use_max = criterion.label, criterion.higher_is_worse
    vals = values[torch.isfinite(values)]
    ext = torch.tensor([(vals.max() if use_max else vals.min()).item() if vals.numel()
                        else (-math.inf if use_max else math.inf)], dtype=torch.float64, device=comm.device)
    ext = float(comm.all_reduce(ext, "max" if use_max else "min"))
    return {crit_name: ext} if math.isfinite(ext) else {}


def new_optimizer(cfg: StableConfig, model, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if cfg.optimizer == "SGD" else torch.optim.Adam(params, lr=lr))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.2, patience=10)
    return opt, sched


def sample_order(frames_ok: torch.Tensor, sel: torch.Tensor, shard: Shard, comm: distributed.Comm,
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


class StableLoop:
    """The state of a StABlE run between epochs (MD states, generators, optimizer, phase) and
    the steps of one epoch.  ``state`` holds this rank's replicas; ``learn_start`` and
    ``saved_starts`` hold all replicas (resets pick sources by global index)."""

    def __init__(self, ctx: RunContext, comm: distributed.Comm, log=print):
        cfg = ctx.cfg
        self.ctx, self.cfg, self.comm, self.log = ctx, cfg, comm, log
        self.model = ctx.model
        self.shard = Shard.of(comm, cfg.n_replicas)
        self.sizes = comm.shard_sizes(cfg.n_replicas)
        self.rules = PhaseRules.from_config(cfg)
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.shuffle_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        self.ef_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 2)  # energy/force frame subsets
        self.ef_test: Optional[Dict[str, float]] = None  # test-set errors of the current parameters
        self.integrator, self.md_gen = md_integrator(ctx, comm, self.shard, self.gen)
        self.ef = EFLossSettings.from_checkpoint(ctx.ckpt)
        self.target = training_observable(cfg.training_observable, ctx.oset, ctx.refs)
        self.resume_path = ctx.folder / "resume.pt"
        self.resumed: Optional[ResumeState] = None
        if self.resume_path.exists():  # checked before anything is written
            self.resumed = ResumeState.load(self.resume_path, ctx.device)
            check_resumable(self.resumed.config, to_dict(cfg), to_dict(StableConfig()), self.resume_path)

    # ------------------------------------------------------------------ state
    def start(self) -> int:
        """Initial or resumed state; returns the first epoch to run."""
        ctx, rs = self.ctx, self.resumed
        if rs is None:
            self.state = initial_shard(ctx, ctx.train.R, self.cfg.n_replicas, self.gen, self.shard, "random")
            self.learn_start, self.saved_starts = None, []
            self.flagged = torch.zeros(self.cfg.n_replicas, dtype=torch.bool, device=ctx.device)
            self.phase, lr = self.rules.initial()
            self.optimizer, self.scheduler = new_optimizer(self.cfg, self.model, lr)
            epoch0 = 0
        else:
            self.model.load_state_dict(rs.model)
            self.state = self.shard.local(rs.state)
            self.learn_start, self.saved_starts, self.flagged = rs.learn_start, rs.saved_starts, rs.flagged
            self.gen.set_state(rs.gen)
            self.shuffle_gen.set_state(rs.shuffle_gen)
            if rs.ef_gen is not None:
                self.ef_gen.set_state(rs.ef_gen)
            self.phase, epoch0 = rs.phase, rs.epoch
            self.optimizer, self.scheduler = new_optimizer(self.cfg, self.model, rs.lr)
            self.optimizer.load_state_dict(rs.optimizer)
            self.scheduler.load_state_dict(rs.scheduler)
            self.log(f"resuming {ctx.folder} at epoch {epoch0}")
        self.comm.check_same(self.model)
        return epoch0

    def snapshot(self, epochs_done: int) -> ResumeState:
        return ResumeState(
            config=to_dict(self.cfg), model=self.model.state_dict(), state=self.gather(self.state),
            learn_start=self.learn_start, saved_starts=self.saved_starts, flagged=self.flagged,
            gen=self.gen.get_state(), shuffle_gen=self.shuffle_gen.get_state(),
            ef_gen=self.ef_gen.get_state(),
            optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), phase=self.phase,
            epoch=epochs_done, lr=self.optimizer.param_groups[0]["lr"], world_size=self.comm.world_size)

    def gather(self, s: MDState) -> MDState:
        """Global copy of a sharded state (every rank gets it)."""
        return s.clone() if not self.comm.distributed else distributed.gather_state(self.comm, s, self.sizes)

    # ------------------------------------------------------------------ epoch
    def run_epoch(self, epoch: int) -> Dict[str, float]:
        """Simulate, check stability, log, learn if learning, move to the next phase."""
        ctx, cfg, comm, rules = self.ctx, self.cfg, self.comm, self.rules
        t0 = time.time()
        from_cycle_start = rules.restarts_from_cycle_start(self.phase) and self.learn_start is not None
        start = self.shard.local(self.learn_start).clone() if from_cycle_start else self.state
        end, rec = simulate(self.integrator, ctx.force_field, start.clone(), cfg.steps, cfg.n_dump,
                            cfg.eq_steps, ctx.oset.vacf_stride, self.md_gen, progress=False,
                            backend=cfg.md_backend, planned_steps=cfg.steps * cfg.n_epochs)
        unstable_fr, values = stability_values(rec.frames, ctx.system, energy=rec.energies)
        unstable = comm.all_gather_cat(unstable_fr.any(dim=0), self.sizes)  # all replicas
        if not self.phase.learning:
            self.flagged = self.flagged | unstable  # unstable since the last learning phase
        u = float((unstable if self.phase.learning else self.flagged).float().mean())
        scalars = {"Fraction of Unstable Replicas": u, "Simulation Time": time.time() - t0,
                   "Learning Rate": self.optimizer.param_groups[0]["lr"]}
        scalars.update(criterion_extreme(cfg, values, comm))
        monitor, per_frame = epoch_observables(ctx, rec, comm)
        scalars.update(monitor)
        if epoch == 0 or self.phase.learning:
            scalars.update(self.test_errors())
        lr = None
        if rules.learns(self.phase):
            scalars.update(self.learn(rec.frames, unstable, u, per_frame))
            lr = self.optimizer.param_groups[0]["lr"]
        self.phase, event = next_phase(self.phase, rules, u, lr)
        self.apply(event, epoch, start, end, unstable, u)
        return scalars

    def test_errors(self) -> Dict[str, float]:
        """Energy/force errors on the test frames (spec §6: at epoch 0 and in learning epochs),
        computed once per parameter values: an epoch whose parameters were already evaluated
        (the first learning epoch after a simulation phase, or every epoch when nothing is
        learned) reuses the values."""
        if self.ef_test is None:
            ctx = self.ctx
            m = evaluate(self.model, ctx.test, 100, ctx.device, ctx.dtype, max_frames=EF_TEST_FRAMES,
                         comm=self.comm)
            self.ef_test = {"Energy MAE": m["energy_mae"], "Force MAE": m["forces_mae"],
                            "Energy RMSE": m["energy_rmse"], "Force RMSE": m["forces_rmse"]}
        return dict(self.ef_test)

    def observable_gradient(self, frames: torch.Tensor, unstable: torch.Tensor,
                            per_frame: Optional[FrameObservables] = None):
        """The one estimator dispatch: local (water neighbourhoods), sharded over ranks
        (torchrun) or global.  ``frames`` (F, r, N, 3) of this rank; ``per_frame``: the epoch's
        monitoring observables, reused when the training observable is one of them.  Returns
        (grads, loss)."""
        ctx, cfg, comm, shard = self.ctx, self.cfg, self.comm, self.shard
        sel = (unstable if (cfg.only_train_on_unstable_replicas and unstable.any())
               else torch.ones_like(unstable))
        local_sel = sel[shard.lo:shard.hi]
        samples = frames[:, local_sel]
        ok = torch.isfinite(samples).all(dim=(2, 3))
        if cfg.local_estimator:
            return local_observable_gradient(
                self.model, samples[ok], ctx.system, cfg.n_local_neighborhoods, cfg.n_closest_molecules,
                ctx.kT, cfg.minibatch_size, cfg.boltzmann_scale_by_kT, ctx.dtype, self.shuffle_gen)
        shuffle = self.shuffle_gen if cfg.shuffle else None
        samples = samples[ok]
        O = None if per_frame is None else per_frame.rows(self.target.samples, per_frame.finite & local_sel[None, :])
        if comm.distributed:  # this rank's samples in the single-process (shuffled) order
            order = sample_order(ok, sel, shard, comm, shuffle)[0]
            samples = samples[order]
            O = None if O is None else O[order]
            shuffle = None
        cell = ctx.system.cell if ctx.system.pbc else None
        return observable_gradient(self.model, self.target, samples, ctx.system.atomic_numbers, cell, ctx.kT,
                                   cfg.minibatch_size, cfg.boltzmann_scale_by_kT, ctx.dtype, shuffle, comm,
                                   observables=O)

    def learn(self, frames: torch.Tensor, unstable: torch.Tensor, u: float,
              per_frame: Optional[FrameObservables] = None) -> Dict[str, float]:
        """One optimizer step: observable gradient + w · energy/force gradient (on all training
        frames, or on a fresh random subset of ``energy_force_frames_per_epoch``), clipped."""
        cfg, ctx = self.cfg, self.ctx
        g_obs, obs_loss = self.observable_gradient(frames, unstable, per_frame)
        scalars, g_ef = {}, None
        if cfg.energy_force_loss_weight:
            subset = energy_force_subset(len(ctx.train), cfg.energy_force_frames_per_epoch, self.ef_gen)
            g_ef, scalars["Energy-Force Loss"] = energy_force_gradient(
                self.model, ctx.train, self.ef, cfg.minibatch_size, ctx.device, ctx.dtype, comm=self.comm,
                frames=subset)
        obs_weight = 1.0 if cfg.original_obs_weighting else cfg.obs_loss_weight
        info = apply_update(self.model, self.optimizer, g_obs, g_ef, obs_weight, cfg.energy_force_loss_weight,
                            cfg.grad_clip_norm_threshold if cfg.gradient_clipping else None)
        self.ef_test = None  # new parameters
        self.comm.check_same(self.model)  # every rank took the same step
        scalars["Loss"] = cfg.obs_loss_weight * (obs_loss or 0.0)
        scalars["Gradient Norm"] = info["grad_norm"]
        if "cosine" in info:
            scalars["Gradient Cosine Similarity (Observable vs Energy-Force)"] = info["cosine"]
            scalars["Gradient Ratios (Observable vs Energy-Force)"] = info["ratio"]
        self.scheduler.step(u)
        return scalars

    def apply(self, event: Event, epoch: int, start: MDState, end: MDState, unstable: torch.Tensor,
              u: float) -> None:
        """Carry out a phase transition: checkpoints, optimizer, replicas for the next epoch."""
        ctx, folder = self.ctx, self.ctx.folder
        for name in event.save:
            if self.comm.is_main:
                save_model(ctx, folder / f"{name}.pt", epoch + 1)
                shutil.copyfile(folder / f"{name}.pt", folder / "ckpt.pt")
        if event.kind == END_CYCLE:
            self.log(f"epoch {epoch + 1}: end of learning cycle {self.phase.cycle} "
                     f"(lr {self.optimizer.param_groups[0]['lr']:.3g}, unstable {u:.2f})")
            self.learn_start = None
            self.flagged = torch.zeros_like(self.flagged)
        elif event.kind == START_LEARNING:
            self.learn_start = self.gather(start)
            self.log(f"epoch {epoch + 1}: {u:.0%} of replicas unstable → learning cycle {self.phase.cycle + 1}")
        if event.new_lr is not None:
            self.optimizer, self.scheduler = new_optimizer(self.cfg, self.model, event.new_lr)
        if event.restart_unstable:
            nxt = restart_replicas(ctx, end, unstable, start, self.gen, self.shard)
            self.state = self.random_resets(nxt, start, unstable) if event.kind == SIMULATED else nxt

    def random_resets(self, nxt: MDState, start: MDState, unstable: torch.Tensor) -> MDState:
        """A ``reset_probability`` fraction of the stable replicas jumps to a random earlier
        start state; this epoch's start state joins the saved ones."""
        stable_idx = torch.nonzero(~unstable).reshape(-1)
        n_jump = int(math.ceil(self.cfg.reset_probability * stable_idx.numel()))
        if n_jump and self.saved_starts:
            pick = stable_idx[torch.randperm(stable_idx.numel(), generator=self.gen)[:n_jump].to(stable_idx.device)]
            src = self.saved_starts[int(torch.randint(len(self.saved_starts), (1,), generator=self.gen))]
            mask = torch.zeros_like(unstable)
            mask[pick] = True
            nxt = restart_replicas(self.ctx, nxt, mask, self.shard.local(src), self.gen, self.shard)
        self.saved_starts = (self.saved_starts + [self.gather(start)])[-MAX_SAVED_STARTS:]
        return nxt


def check_launch(cfg: StableConfig, comm: distributed.Comm) -> None:
    if cfg.n_replicas < comm.world_size:
        raise setup.SetupError(f"n_replicas {cfg.n_replicas} is smaller than the {comm.world_size} processes; "
                               "every rank needs at least one replica")
    if cfg.local_estimator and comm.distributed:
        raise setup.SetupError("local_estimator: true runs in a single process only (launch without torchrun)")


def write_run_files(ctx: RunContext) -> None:
    folder = ctx.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "stable_training_config.yml", to_dict(ctx.cfg))
    if ctx.ckpt.get("config"):
        write_yaml(folder / "pretraining_config.yml", ctx.ckpt["config"])
    for k, v in ctx.refs.as_numpy().items():
        np.save(folder / f"{k}.npy", v)


def train(cfg: StableConfig, log=print) -> Path:
    """Run (or resume) StABlE training; returns the run folder.  Under torchrun the replicas
    are sharded over the ranks (module docstring)."""
    comm = distributed.setup(cfg.device)
    main = comm.is_main
    log = log if main else quiet
    check_launch(cfg, comm)
    ctx = prepare(cfg, log=log, device=comm.device)
    if cfg.local_estimator and ctx.system.molecule_index is None:
        raise setup.SetupError("local_estimator: true needs molecule membership (molecule_index) in the data")
    loop = StableLoop(ctx, comm, log)  # refuses a resume.pt of other settings
    folder = ctx.folder
    if main:
        write_run_files(ctx)
    log(f"run folder: {folder}; reference RDF reweighting ESS {ctx.refs.ess:.1f} "
        f"(data {ctx.refs.data_temperature:g} K → simulation {cfg.temperature:g} K)")
    if comm.distributed:
        log(f"distributed: {comm.world_size} processes ({comm.device.type}), replicas per rank {loop.sizes}")
    epoch0 = loop.start()
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(folder / "logs"), purge_step=epoch0 + 1)
    bar = tqdm(total=cfg.n_epochs, initial=epoch0, desc="StABlE", disable=not (cfg.progress and main))
    for epoch in range(epoch0, cfg.n_epochs):
        scalars = loop.run_epoch(epoch)
        if writer is not None:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    writer.add_scalar(k, v, epoch + 1)
            writer.flush()
        bar.update(1)
        bar.set_postfix(unstable=f"{scalars['Fraction of Unstable Replicas']:.2f}",
                        learning=int(loop.phase.learning), cycle=loop.phase.cycle)
        snapshot = loop.snapshot(epoch + 1)  # collective under torchrun: every rank
        if main:
            snapshot.save(folder / "resume.pt")
    bar.close()
    if writer is not None:
        writer.close()
    if main and not (folder / "ckpt.pt").exists():
        save_model(ctx, folder / "ckpt.pt", cfg.n_epochs)
    log(f"done: {folder}")
    return folder
