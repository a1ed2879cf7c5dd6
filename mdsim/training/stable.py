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
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mdsim.config import StableConfig, to_dict
from mdsim.md.forces import ModelForceField
from mdsim.md.init import initial_state, maxwell_boltzmann_velocities
from mdsim.md.integrators import make_integrator
from mdsim.md.stability import stability_values
from mdsim.md.state import MDState
from mdsim.models.checkpoint import load_model, save_checkpoint
from mdsim.units import KB

from . import setup
from .io import resolve_device, write_yaml
from .learning import EFLossSettings, apply_update, energy_force_gradient, observable_gradient
from .pretrain import evaluate
from .rollout import simulate
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


def prepare(cfg: StableConfig, checkpoint: Optional[Path] = None, log=print) -> RunContext:
    device = setup_device = resolve_device(cfg.device)
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


def epoch_observables(ctx: RunContext, rec) -> Dict[str, float]:
    """Monitoring losses of one epoch (mean over replicas and frames vs references)."""
    pos = rec.frames.to(torch.float64)
    F, R = pos.shape[:2]
    flat = pos.reshape(F * R, *pos.shape[2:])
    finite = torch.isfinite(flat).all(dim=(1, 2))
    out = {}
    if finite.any():
        good = flat[finite]
        out["Observable Loss"] = squared_error(ctx.oset.rdf_smeared(good).mean(0), ctx.refs.rdf_smeared)
        out["ADF Loss"] = squared_error(ctx.oset.adf(good).mean(0), ctx.refs.adf)
    if ctx.refs.vacf is not None and rec.velocities is not None and rec.velocities.shape[0] >= ctx.cfg.vacf_window:
        v = rec.velocities[::1].to(torch.float64)
        vac = ctx.oset.vacf(v)
        ok = torch.isfinite(vac).all(dim=-1)
        if ok.any():
            out["VACF Loss"] = squared_error(vac[ok].mean(0), ctx.refs.vacf)
    return out


def _new_optimizer(cfg: StableConfig, model, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr) if cfg.optimizer == "SGD" else torch.optim.Adam(params, lr=lr))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.2, patience=10)
    return opt, sched


def _fresh_velocities(ctx: RunContext, n: int, gen) -> torch.Tensor:
    return maxwell_boltzmann_velocities(ctx.system.masses, n, ctx.cfg.temperature, gen,
                                        dtype=ctx.dtype, device=ctx.device)


def _restart(ctx: RunContext, target: MDState, mask: torch.Tensor, source: MDState, gen) -> MDState:
    """Replicas ``mask`` of ``target`` restart from ``source`` positions with fresh velocities."""
    if not bool(mask.any()):
        return target
    fresh = source.clone()
    fresh.velocities = _fresh_velocities(ctx, fresh.n_replicas, gen)
    fresh.zeta = torch.zeros_like(fresh.zeta)
    fresh.energy, fresh.forces = ctx.force_field(fresh.positions, fresh.cell)
    return _where(mask, fresh, target)


def save_model(ctx: RunContext, path: Path, epoch: int, extra: Optional[dict] = None) -> None:
    pre_cfg = ctx.ckpt.get("config") or {}
    save_checkpoint(path, ctx.model, {"epoch": epoch, "step": epoch, "config": pre_cfg,
                                      "stable_config": to_dict(ctx.cfg), **(extra or {})})


def train(cfg: StableConfig, log=print) -> Path:
    """Run (or resume) StABlE training; returns the run folder."""
    ctx = prepare(cfg, log=log)
    folder = ctx.folder
    folder.mkdir(parents=True, exist_ok=True)
    write_yaml(folder / "stable_training_config.yml", to_dict(cfg))
    if ctx.ckpt.get("config"):
        write_yaml(folder / "pretraining_config.yml", ctx.ckpt["config"])
    for k, v in ctx.refs.as_numpy().items():
        np.save(folder / f"{k}.npy", v)
    log(f"run folder: {folder}; reference RDF reweighting ESS {ctx.refs.ess:.1f} "
        f"(data {ctx.refs.data_temperature:g} K → simulation {cfg.temperature:g} K)")

    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    shuffle_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    model = ctx.model
    always_learn = not cfg.only_learn_if_unstable_threshold_reached
    min_lr = cfg.lr / (5 ** cfg.max_times_reduce_lr)
    ef = EFLossSettings.from_checkpoint(ctx.ckpt)
    obs_weight = 1.0 if cfg.original_obs_weighting else cfg.obs_loss_weight
    target = training_observable(cfg.training_observable, ctx.oset, ctx.refs)

    resume_path = folder / "resume.pt"
    if resume_path.exists():
        rs = torch.load(resume_path, map_location="cpu", weights_only=False)
        if rs["config"] != to_dict(cfg):
            changed = sorted(k for k in rs["config"] if rs["config"].get(k) != to_dict(cfg).get(k))
            if set(changed) - {"n_epochs", "progress"}:
                raise setup.SetupError(f"{resume_path} belongs to a run with other settings ({changed}); "
                                       "use another exp_name or delete the folder")
        model.load_state_dict(rs["model"])
        state = _state_from(rs["state"], ctx.device)
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
        state = initial_state(ctx.system, ctx.train.R, ctx.force_field, cfg.n_replicas, cfg.temperature,
                              generator=gen, mode="random", ic_stddev=cfg.ic_stddev, dtype=ctx.dtype,
                              device=ctx.device)
        learn_start, saved_starts = None, []
        flagged = torch.zeros(cfg.n_replicas, dtype=torch.bool, device=ctx.device)
        learning, cycle, learn_epoch, epoch0 = always_learn, 0, 0, 0
        lr_now = cfg.lr if always_learn else 0.0
        optimizer, scheduler = _new_optimizer(cfg, model, lr_now)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(folder / "logs"), purge_step=epoch0 + 1)
    bar = tqdm(total=cfg.n_epochs, initial=epoch0, desc="StABlE", disable=not cfg.progress)
    for epoch in range(epoch0, cfg.n_epochs):
        t0 = time.time()
        start = learn_start.clone() if (learning and learn_start is not None and not always_learn) else state
        end, rec = simulate(ctx.integrator, ctx.force_field, start.clone(), cfg.steps, cfg.n_dump,
                            cfg.eq_steps, ctx.oset.vacf_stride, gen, progress=False,
                            backend=cfg.md_backend)
        unstable_fr, values = stability_values(rec.frames, ctx.system, energy=rec.energies)
        unstable = unstable_fr.any(dim=0)
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
        vals = values[torch.isfinite(values)]
        if vals.numel():
            scalars[crit_name] = float(vals.max() if cfg.stability_criterion == "bond_length_deviation" else vals.min())
        scalars.update(epoch_observables(ctx, rec))
        if epoch == 0 or learning:
            m = evaluate(model, ctx.test, 100, ctx.device, ctx.dtype, max_frames=EF_TEST_FRAMES)
            scalars.update({"Energy MAE": m["energy_mae"], "Force MAE": m["forces_mae"],
                            "Energy RMSE": m["energy_rmse"], "Force RMSE": m["forces_rmse"]})

        if learning and cfg.obs_loss_weight != 0:
            samples = rec.frames
            if cfg.only_train_on_unstable_replicas and unstable.any():
                samples = samples[:, unstable]
            samples = samples.reshape(-1, *samples.shape[2:])
            ok = torch.isfinite(samples).all(dim=(1, 2))
            g_obs, obs_loss = observable_gradient(
                model, target, samples[ok], ctx.system.atomic_numbers,
                ctx.system.cell if ctx.system.pbc else None, ctx.kT, cfg.minibatch_size,
                cfg.boltzmann_scale_by_kT, ctx.dtype, shuffle_gen if cfg.shuffle else None)
            g_ef = None
            if cfg.energy_force_loss_weight:
                g_ef, ef_loss = energy_force_gradient(model, ctx.train, ef, cfg.minibatch_size, ctx.device, ctx.dtype)
                scalars["Energy-Force Loss"] = ef_loss
            info = apply_update(model, optimizer, g_obs, g_ef, obs_weight, cfg.energy_force_loss_weight,
                                cfg.grad_clip_norm_threshold if cfg.gradient_clipping else None)
            scalars["Loss"] = cfg.obs_loss_weight * (obs_loss or 0.0)
            scalars["Gradient Norm"] = info["grad_norm"]
            if "cosine" in info:
                scalars["Gradient Cosine Similarity (Observable vs Energy-Force)"] = info["cosine"]
                scalars["Gradient Ratios (Observable vs Energy-Force)"] = info["ratio"]
            scheduler.step(u)
            learn_epoch += 1
            save_model(ctx, folder / f"cycle{cycle + 1}_epoch{learn_epoch}.pt", epoch + 1)
            shutil.copyfile(folder / f"cycle{cycle + 1}_epoch{learn_epoch}.pt", folder / "ckpt.pt")
            lr_now = optimizer.param_groups[0]["lr"]
            if not always_learn and (lr_now <= min_lr * (1 + 1e-9) or u <= cfg.min_frac_unstable_threshold):
                cycle += 1
                save_model(ctx, folder / f"end_of_cycle{cycle}.pt", epoch + 1)
                shutil.copyfile(folder / f"end_of_cycle{cycle}.pt", folder / "ckpt.pt")
                log(f"epoch {epoch + 1}: end of learning cycle {cycle} (lr {lr_now:.3g}, unstable {u:.2f})")
                learning, learn_epoch, learn_start = False, 0, None
                flagged = torch.zeros_like(flagged)
                optimizer, scheduler = _new_optimizer(cfg, model, 0.0)
                state = _restart(ctx, end, unstable, start, gen)
            elif always_learn:
                state = _restart(ctx, end, unstable, start, gen)
        else:
            if (not learning) and u >= cfg.max_frac_unstable_threshold and cfg.obs_loss_weight != 0:
                learning, learn_epoch, learn_start = True, 0, start.clone()
                optimizer, scheduler = _new_optimizer(cfg, model, cfg.lr)
                log(f"epoch {epoch + 1}: {u:.0%} of replicas unstable → learning cycle {cycle + 1}")
            else:
                nxt = _restart(ctx, end, unstable, start, gen)
                stable_idx = torch.nonzero(~unstable).reshape(-1)
                n_jump = int(math.ceil(cfg.reset_probability * stable_idx.numel()))
                if n_jump and saved_starts:
                    pick = stable_idx[torch.randperm(stable_idx.numel(), generator=gen)[:n_jump].to(stable_idx.device)]
                    src = saved_starts[int(torch.randint(len(saved_starts), (1,), generator=gen))]
                    mask = torch.zeros_like(unstable)
                    mask[pick] = True
                    nxt = _restart(ctx, nxt, mask, src, gen)
                saved_starts = (saved_starts + [start.clone()])[-MAX_SAVED_STARTS:]
                state = nxt
        for k, v in scalars.items():
            if v is not None and math.isfinite(v):
                writer.add_scalar(k, v, epoch + 1)
        writer.flush()
        bar.update(1)
        bar.set_postfix(unstable=f"{u:.2f}", learning=int(learning), cycle=cycle)
        torch_save_resume(resume_path, {
            "config": to_dict(cfg), "model": model.state_dict(), "state": _state_dict(state),
            "learn_start": _state_dict(learn_start) if learn_start is not None else None,
            "saved_starts": [_state_dict(s) for s in saved_starts], "gen": gen.get_state(),
            "flagged": flagged.cpu(),
            "shuffle_gen": shuffle_gen.get_state(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "phase": {"learning": learning, "cycle": cycle, "learn_epoch": learn_epoch, "epoch": epoch + 1,
                      "lr": optimizer.param_groups[0]["lr"]}})
    bar.close()
    writer.close()
    if not (folder / "ckpt.pt").exists():
        save_model(ctx, folder / "ckpt.pt", cfg.n_epochs)
    log(f"done: {folder}")
    return folder


def torch_save_resume(path: Path, obj: dict) -> None:
    from .io import atomic_torch_save
    atomic_torch_save(obj, path)
