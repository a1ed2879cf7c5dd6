"""Evaluation of a model by long simulations (``simulate.yml``, spec §7).

``n_replicas`` replicas start from the first test frames; stability is checked on every frame
stored every ``n_dump`` steps; a replica's stability time is the time of its first unstable
frame (frozen afterwards).  With ``park_unstable`` a flagged replica restarts from its start frame
at the end of that epoch (an exploded molecule costs up to twice a step), and once at most half of
the replicas a process simulates are still stable, it simulates only those (the batch shrinks:
at most log2(R) times, each a new compiled step; every replica keeps the noise it gets in the
full batch).  Observables are averaged over each replica's stable frames.
Writes ``final_metrics.json``, the observables as ``.npy`` and PNG plots to
``<run folder>/inference/<eval_model>/``.

Under ``torchrun`` the replicas are sharded over the ranks (initial velocities and Langevin
noise drawn for all replicas, each rank keeping its own, as in training); the stopping rule
uses the global unstable fraction, and the per-replica results are gathered on rank 0, which
computes the metrics and writes everything (docs/distributed.md).

Long evaluations resume: after every epoch rank 0 writes ``eval_resume.pt`` (atomically) into
the output folder with everything the loop holds (MD state, the noise generator, stability
flags, observable sums, trajectory so far).  Rerunning the same command continues from the
last finished epoch with the same result as an uninterrupted run; a larger ``n_epochs``
extends a finished evaluation (a longer horizon); other settings or another model are refused.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mdsim import observables as obs
from mdsim.atomic import atomic_torch_save
from mdsim.config import StableConfig, to_dict
from mdsim.md.init import replace_replicas
from mdsim.md.rollout import resolve_auto_backend, simulate
from mdsim.md.stability import StabilityTracker, stability_values
from mdsim.units import KCAL_MOL

from . import distributed, setup
from .io import write_json, write_yaml
from .pretrain import evaluate as ef_errors
from .resume import check_resumable, state_from_dict, state_to_dict
from .context import EF_TEST_FRAMES, Shard, initial_shard, md_integrator, prepare, quiet


def _mean_std(x: np.ndarray):
    x = x[np.isfinite(x)]
    return (float(x.mean()), float(x.std())) if x.size else (float("nan"), float("nan"))


EVAL_RESUME = "eval_resume.pt"
EVAL_RESUME_VERSION = 2  # 2: + "simulated" (the replicas still simulated); version 1 files are read


def _load_progress(path: Path, cfg: StableConfig, model: torch.nn.Module) -> Optional[dict]:
    """The saved progress of this evaluation, or None; refuses one of other settings or parameters."""
    if not path.exists():
        return None
    d = torch.load(path, map_location="cpu", weights_only=False)
    if d.get("version") not in (1, EVAL_RESUME_VERSION):
        raise setup.SetupError(f"{path}: format version {d.get('version')} is not supported "
                               f"(this code reads versions 1 to {EVAL_RESUME_VERSION}); delete it to start over")
    check_resumable(d["config"], to_dict(cfg), to_dict(StableConfig()), path)
    own = model.state_dict()
    if set(own) != set(d["model"]) or any(not torch.equal(own[k].cpu(), d["model"][k]) for k in own):
        raise setup.SetupError(f"{path} was written for other model parameters than {cfg.pretrained_checkpoint or cfg.eval_model}; "
                               "delete it (or use another exp_name) to evaluate this model")
    if d["epochs"] > cfg.n_epochs:
        raise setup.SetupError(f"n_epochs: {cfg.n_epochs} is shorter than the {d['epochs']} epochs {path} has "
                               "already run; give n_epochs >= that or delete the file")
    return d


def slim_progress(src: Path, dst: Path) -> None:
    """Copy ``eval_resume.pt`` without the trajectory so far (most of its size; used to keep an
    unfinished evaluation in git).  An evaluation resumed from the copy gives the same metrics and
    arrays; only ``full_traj.npy`` has NaN for the frames before the resume."""
    d = torch.load(src, map_location="cpu", weights_only=False)
    if d.get("traj") is not None:
        d["traj_shape"] = list(d["traj"].shape)
        d["traj"] = None
    atomic_torch_save(d, dst)


def _expand(x: Optional[torch.Tensor], idx: torch.Tensor, R: int) -> Optional[torch.Tensor]:
    """(T, len(idx), ...) → (T, R, ...): rows ``idx`` of dim 1 from ``x``, NaN elsewhere."""
    if x is None:
        return None
    full = x.new_full((x.shape[0], R) + tuple(x.shape[2:]), float("nan"))
    return full.index_copy_(1, idx.to(x.device), x)


def run_evaluation(cfg: StableConfig, log=print) -> Path:
    comm = distributed.setup(cfg.device)
    main = comm.is_main
    if not main:
        log = quiet
    ckpt_path = setup.eval_checkpoint(cfg)  # fails before anything is written
    ctx = prepare(cfg, checkpoint=ckpt_path, log=log, device=comm.device)
    out = ctx.folder / "inference" / cfg.eval_model
    log(f"evaluating {ckpt_path} → {out}")
    R = cfg.n_replicas
    if R > len(ctx.test):
        raise setup.SetupError(f"n_replicas {R} exceeds the {len(ctx.test)} test frames")
    if R < comm.world_size:
        raise setup.SetupError(f"n_replicas {R} is smaller than the {comm.world_size} processes")
    shard = Shard.of(comm, R)
    sizes = comm.shard_sizes(R)
    Rl = shard.hi - shard.lo
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.init_frame_offset + R > len(ctx.test.R):
        raise setup.SetupError(f"init_frame_offset: {cfg.init_frame_offset} + n_replicas {R} exceeds the "
                               f"{len(ctx.test.R)} test frames")
    state = initial_shard(ctx, ctx.test.R[cfg.init_frame_offset:], R, gen, shard, "first")
    start = state.clone()  # where unstable replicas are parked (park_unstable)
    ef = ef_errors(ctx.model, ctx.test, 100, ctx.device, ctx.dtype, max_frames=EF_TEST_FRAMES, comm=comm)
    integrator, md_gen = md_integrator(ctx, comm, shard, gen)
    tracker = StabilityTracker(Rl, cfg.stability_criterion, device=ctx.device)
    oset, refs = ctx.oset, ctx.refs
    H = refs.rdf_hist.numel()
    rdf_sum = torch.zeros(Rl, H, dtype=torch.float64)
    adf_sum = torch.zeros(Rl, refs.adf.numel(), dtype=torch.float64)
    nfr = torch.zeros(Rl, dtype=torch.float64)
    vacfs = []  # per epoch (R, W), NaN where the replica was unstable
    full_traj = []  # chunks (frames, R, N, 3)
    total_steps = 0
    epochs_run = 0
    stopped = False
    # md_backend auto is decided once, for the full batch and the whole run: a shrunk batch keeps it
    backend = cfg.md_backend
    if backend == "auto":
        backend, why = resolve_auto_backend(state, ctx.force_field, cfg.steps * cfg.n_epochs)
        log(f"md_backend auto → {backend} ({why})")
    # park_unstable: the local replicas simulated once the batch has shrunk (None: all of them)
    sim: Optional[torch.Tensor] = None
    sim_run = (integrator, ctx.force_field, md_gen)

    def shrunk(idx: torch.Tensor):
        """(integrator, force field, generator) simulating only local replicas ``idx``: the noise
        of all R replicas is drawn and their rows kept; a fresh force field (Verlet list sized
        for this batch, its own compiled step)."""
        if not ctx.integrator.stochastic:
            return ctx.integrator, ctx.force_field.renewed(), md_gen
        rows = (idx + shard.lo).tolist()
        return (distributed.GlobalNoiseIntegrator(ctx.integrator, shard.lo, shard.hi, R, rows=rows),
                ctx.force_field.renewed(), distributed.ShardedGenerator(gen))

    resume_path = out / EVAL_RESUME
    saved = _load_progress(resume_path, cfg, ctx.model)  # every rank reads it
    if saved is not None:
        lo, hi = shard.lo, shard.hi
        state = shard.local(state_from_dict(saved["state"], ctx.device)).clone()
        gen.set_state(saved["gen"])
        tracker.first_unstable_step = saved["first_unstable_step"][lo:hi].to(ctx.device).clone()
        tracker.worst_value = saved["worst_value"][lo:hi].to(ctx.device).clone()
        rdf_sum, adf_sum, nfr = (saved[k][lo:hi].clone() for k in ("rdf_sum", "adf_sum", "nfr"))
        vacfs = list(saved["vacfs"][lo:hi].unbind(1)) if saved["vacfs"] is not None else []
        if saved["traj"] is not None:
            full_traj = [saved["traj"][lo:hi].numpy().transpose(1, 0, 2, 3)]
        else:  # a slimmed copy (slim_progress): the frames before the resume are NaN in full_traj.npy
            _, F, N, _ = saved["traj_shape"]
            full_traj = [np.full((F, hi - lo, N, 3), np.nan, dtype=np.float32)]
        total_steps, epochs_run, stopped = saved["total_steps"], saved["epochs"], saved["stopped"]
        if saved.get("simulated") is not None and not bool(saved["simulated"][lo:hi].all()):
            sim = torch.nonzero(saved["simulated"][lo:hi]).flatten()
            sim_run = shrunk(sim)
        log(f"resuming the evaluation from {resume_path} after {epochs_run} epochs")
        del saved

    def save_progress() -> None:  # collective under torchrun; rank 0 writes
        g_state = distributed.gather_state(comm, state, sizes)
        parts = [comm.gather_cat(t, sizes) for t in (tracker.first_unstable_step, tracker.worst_value,
                                                     rdf_sum, adf_sum, nfr)]
        v = comm.gather_cat(torch.stack(vacfs, 1), sizes) if vacfs else None
        tr = comm.gather_cat(torch.from_numpy(np.concatenate(full_traj, 0).transpose(1, 0, 2, 3).copy()), sizes)
        simulated = torch.ones(Rl, dtype=torch.bool)
        if sim is not None:
            simulated[:] = False
            simulated[sim] = True
        simulated = comm.gather_cat(simulated, sizes)
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({
            "version": EVAL_RESUME_VERSION, "config": to_dict(cfg),
            "model": {k: t.detach().cpu() for k, t in ctx.model.state_dict().items()},
            "state": state_to_dict(g_state), "gen": gen.get_state(),
            **dict(zip(("first_unstable_step", "worst_value", "rdf_sum", "adf_sum", "nfr"),
                       (t.cpu() for t in parts))),
            "vacfs": v, "traj": tr, "simulated": simulated.cpu(), "total_steps": total_steps, "epochs": epochs_run, "stopped": stopped,
            "world_size": comm.world_size}, resume_path)

    for epoch in tqdm(range(epochs_run, cfg.n_epochs), desc=f"eval {cfg.eval_model}", initial=epochs_run,
                      total=cfg.n_epochs, disable=not (cfg.progress and main)):
        if stopped:
            break
        integ, ff, g = sim_run
        new, rec = simulate(integ, ff, state if sim is None else state.select(sim), cfg.steps, cfg.n_dump,
                            cfg.eq_steps, oset.vacf_stride, g, backend=backend)
        epochs_run += 1
        frames, energies, velocities = rec.frames, rec.energies, rec.velocities
        if sim is None:
            state = new
        else:  # replicas not simulated: NaN frames (they are flagged already)
            state = state.put(sim, new)
            frames, energies, velocities = (_expand(x, sim, Rl) for x in (frames, energies, velocities))
        unstable_fr, _ = stability_values(frames, ctx.system, energy=energies)
        was_stable = tracker.stable.clone()
        steps = rec.frame_steps.to(ctx.device) + total_steps
        tracker.update_frames(unstable_fr, steps)
        total_steps += cfg.steps
        # frames count for a replica while it is stable (up to, excluding, its first unstable frame)
        first = torch.where(tracker.stable, torch.full_like(tracker.first_unstable_step, 2 ** 62),
                            tracker.first_unstable_step)
        ok = (steps[:, None] < first[None, :]).cpu()  # (F, R)
        pos = frames.detach().to(torch.float64).cpu()
        for f in range(pos.shape[0]):
            m = ok[f]
            if m.any():
                rdf_sum[m] += oset.rdf_hist(pos[f, m])
                adf_sum[m] += oset.adf(pos[f, m])
                nfr[m] += 1
        if refs.vacf is not None and velocities is not None and velocities.shape[0] >= cfg.vacf_window:
            v = oset.vacf(velocities.to(torch.float64).cpu())
            keep = (was_stable & tracker.stable).cpu()
            v[~keep] = float("nan")
            vacfs.append(v)
        full_traj.append(pos.numpy().astype(np.float32))
        if cfg.park_unstable and not bool(tracker.stable.all()):
            state = replace_replicas(state, ~tracker.stable, start)
            live = torch.nonzero(tracker.stable.cpu()).flatten()
            cur = Rl if sim is None else int(sim.numel())
            if cur > 1 and live.numel() <= cur // 2:
                # simulate the stable ones only; a process with none keeps one parked replica,
                # so that its noise generator advances with the other processes'
                sim = live if live.numel() else torch.zeros(1, dtype=torch.long)
                sim_run = shrunk(sim)
                log(f"epoch {epoch + 1}: {live.numel()} of the {cur} replicas simulated here are stable; "
                    "simulating only those")
        (n_unstable,) = comm.sum_floats(float((~tracker.stable).sum()))
        stopped = n_unstable / R >= cfg.max_frac_unstable_threshold
        save_progress()
        if stopped:
            log(f"epoch {epoch + 1}: {n_unstable / R:.0%} unstable, stopping")
            break

    stab = tracker.stability_time_ps(total_steps, cfg.timestep).cpu()
    stable_now = tracker.stable.cpu()
    vacf_t = torch.stack(vacfs).transpose(0, 1).contiguous() if vacfs else None  # (R, epochs, W)
    traj = torch.from_numpy(np.concatenate(full_traj, 0).transpose(1, 0, 2, 3).copy())  # (R, frames, N, 3)
    if comm.distributed:  # per-replica results to rank 0 (CPU tensors)
        stab, stable_now, rdf_sum, adf_sum, nfr = (comm.gather_cat(t, sizes) for t in
                                                    (stab, stable_now, rdf_sum, adf_sum, nfr))
        vacf_t = comm.gather_cat(vacf_t, sizes) if vacf_t is not None else None
        traj = comm.gather_cat(traj, sizes)
    if not main:
        return out
    stab = stab.numpy()
    with torch.no_grad():
        have = nfr > 0
        rdfs = torch.where(have[:, None], rdf_sum / nfr.clamp(min=1)[:, None], torch.nan)
        adfs = torch.where(have[:, None], adf_sum / nfr.clamp(min=1)[:, None], torch.nan)
        rdf_maes = obs.rdf_mae(rdfs, refs.rdf_hist, cfg.max_rdf_dist).numpy()
        adf_maes = obs.adf_mae(adfs, refs.adf).numpy()
        vacf_arr = vacf_t.transpose(0, 1).numpy() if vacf_t is not None else None  # (epochs, R, W)
        if vacf_arr is not None:
            import warnings
            with warnings.catch_warnings(), np.errstate(invalid="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: never-stable replicas
                vacf_mean = np.nanmean(vacf_arr, axis=0) if np.isfinite(vacf_arr).any() else vacf_arr[0]
                vacf_maes = np.nanmean(np.abs(vacf_arr - refs.vacf.numpy()[None, None]).mean(-1), axis=0) \
                    if np.isfinite(vacf_arr).any() else np.full(R, np.nan)
    out.mkdir(parents=True, exist_ok=True)
    metrics: Dict[str, Optional[float]] = {
        "Energy MAE (kcal/mol)": ef["energy_mae"] / KCAL_MOL,
        "Force MAE (kcal/mol-A)": ef["forces_mae"] / KCAL_MOL,
        "Energy MAE (eV)": ef["energy_mae"],
        "Force MAE (eV/A)": ef["forces_mae"],
        "Mean Stability (ps)": float(np.mean(stab)),
        "Std Dev Stability (ps)": float(np.std(stab)),
        "Median Stability (ps)": float(np.median(stab)),
        "Simulated Time (ps)": total_steps * cfg.timestep / 1000.0,
        "Fraction Stable": float(stable_now.float().mean()),
    }
    for name, arr in (("RDF", rdf_maes), ("ADF", adf_maes)):
        m, s = _mean_std(arr)
        metrics[f"Mean {name} MAE"], metrics[f"Std Dev {name} MAE"] = m, s
    if vacf_arr is not None:
        m, s = _mean_std(vacf_maes)
        metrics["Mean VACF MAE"], metrics["Std Dev VACF MAE"] = m, s
    metrics = {k: (None if (v is None or not math.isfinite(v)) else v) for k, v in metrics.items()}
    np.save(out / "replicas_stable_time.npy", stab)
    # (R,) bool: never flagged unstable (right-censored at the simulated time in survival analysis)
    np.save(out / "replicas_stable.npy", stable_now.cpu().numpy().astype(bool))
    np.save(out / "full_traj.npy", traj.numpy())  # (R, frames, N, 3)
    np.save(out / "final_rdfs.npy", rdfs.numpy())
    np.save(out / "final_adfs.npy", adfs.numpy())
    np.save(out / "final_rdf_maes.npy", rdf_maes)
    np.save(out / "final_adf_maes.npy", adf_maes)
    if vacf_arr is not None:
        np.save(out / "final_vacfs.npy", vacf_mean)
        np.save(out / "final_vacf_maes.npy", vacf_maes)
    for k, v in refs.as_numpy().items():
        np.save(out / f"{k}.npy", v)
    write_yaml(out / "simulate_config.yml", to_dict(cfg))
    write_json(out / "final_metrics.json", {**metrics, "checkpoint": str(ckpt_path), "eval_model": cfg.eval_model,
                                            "n_replicas": R, "epochs": epochs_run})
    plot_all(out, cfg, refs, rdfs.numpy(), adfs.numpy(), vacf_mean if vacf_arr is not None else None, stab)
    return out


def plot_all(out: Path, cfg, refs, rdfs, adfs, vacf, stab) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def panel(fname, x, sim, ref, xlabel, ylabel, title):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        if ref is not None:
            ax.plot(x, ref, "k-", lw=2, label="reference")
        if sim is not None and np.isfinite(sim).any():
            ax.plot(x, sim, "C1--", lw=1.5, label=f"{cfg.eval_model} (mean of stable replicas)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)

    edges = obs.histogram_rdf_edges(cfg.max_rdf_dist, cfg.dr).numpy()
    r = 0.5 * (edges[1:] + edges[:-1])
    with np.errstate(invalid="ignore"):
        panel("rdf.png", r, np.nanmean(rdfs, 0) if np.isfinite(rdfs).any() else None, refs.rdf_hist.numpy(),
              "r (Å)", "RDF", "Radial distribution function")
        ang = obs.adf_bin_centers(refs.adf.numel(), tuple(cfg.angle_range)).numpy()
        panel("adf.png", ang, np.nanmean(adfs, 0) if np.isfinite(adfs).any() else None, refs.adf.numpy(),
              "angle (degrees)", "ADF", "Angular distribution function")
    if vacf is not None and refs.vacf is not None:
        with np.errstate(invalid="ignore"):
            sim = np.nanmean(vacf, 0) if np.isfinite(vacf).any() else None
        panel("vacf.png", np.arange(refs.vacf.numel()), sim, refs.vacf.numpy(), "lag (frames)", "VACF",
              "Velocity autocorrelation")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(stab, bins=min(30, max(5, len(stab) // 4)), color="C0")
    ax.set_xlabel("stability time (ps)")
    ax.set_ylabel("replicas")
    ax.set_title(f"Stability ({cfg.eval_model}): mean {np.mean(stab):.2f} ps")
    fig.tight_layout()
    fig.savefig(out / "stability_hist.png", dpi=120)
    plt.close(fig)
