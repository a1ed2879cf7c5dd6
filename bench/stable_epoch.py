"""Wall time of one full StABlE learning epoch and its split between simulation, observables
(stability check + monitoring observables) and learning (Boltzmann estimator, energy/force
gradient, update).

SchNet aspirin (the original's published pretrained checkpoint when ../shared is present, else
random weights with the original's hyperparameters), GFN2-xTB aspirin data split into a
temporary folder, Nosé–Hoover at 500 K, 0.5 fs.  The issue's setting is 128 replicas × 1 ps
(2000 steps); on a CPU use fewer (``--replicas 32 --steps 200``) and read the split.

    python bench/stable_epoch.py [--replicas 128] [--steps 2000] [--n-dump 100] [--device cpu]
                                 [--backend eager|compile|cuda_graph] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--n-dump", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="eager", choices=["eager", "compile", "cuda_graph"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mdsim.config import StableConfig, load_config
    from mdsim.data.splits import split_raw_file
    from mdsim.md.init import initial_state
    from mdsim.md.stability import stability_values
    from mdsim.models import build_model, save_checkpoint
    from mdsim.training.learning import (EFLossSettings, apply_update, energy_force_gradient,
                                         observable_gradient)
    from mdsim.md.rollout import simulate
    from mdsim.training.stable import epoch_observables, new_optimizer, prepare
    from mdsim.training.targets import training_observable

    raw = SHARED / "data" / "xtb_aspirin_500K.npz"
    if not raw.is_file():
        print(f"needs {raw} (GFN2-xTB aspirin frames)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="stable_epoch_"))
    split_raw_file(raw, tmp / "data", name="xtb", molecule="aspirin", sizes=["1k"], layouts=("random", "contiguous"))
    ckpt = SHARED / "reference/original_stable_checkpoints/schnet_aspirin_1k_pretrained/best_checkpoint.pt"
    if not ckpt.is_file():
        ckpt = tmp / "random.pt"
        save_checkpoint(ckpt, build_model("schnet", hidden_channels=64, num_filters=64, num_interactions=6,
                                          num_gaussians=25, cutoff=5.0))
    cfg = load_config(StableConfig, ROOT / "configs/stable_training/md17/train.yml", [
        ("src", str(tmp / "data")), ("name", "xtb"), ("max_size", "1k"), ("pretrained_checkpoint", str(ckpt)),
        ("log_dir", str(tmp)), ("n_replicas", args.replicas), ("steps", args.steps), ("n_dump", args.n_dump),
        ("device", args.device), ("md_backend", args.backend), "progress=false"])
    ctx = prepare(cfg, log=lambda *a: None)
    gen = torch.Generator().manual_seed(0)
    state = initial_state(ctx.system, ctx.train.R, ctx.force_field, cfg.n_replicas, cfg.temperature, generator=gen,
                          mode="random", dtype=ctx.dtype, device=ctx.device)
    target = training_observable(cfg.training_observable, ctx.oset, ctx.refs)
    opt, _ = new_optimizer(cfg, ctx.model, cfg.lr)
    if args.backend != "eager":  # compile once outside the timed region
        simulate(ctx.integrator, ctx.force_field, state.clone(), 2 * cfg.n_dump, cfg.n_dump,
                 vstride=ctx.oset.vacf_stride, generator=gen, backend=args.backend)

    _sync(args.device)
    t0 = time.perf_counter()
    end, rec = simulate(ctx.integrator, ctx.force_field, state, cfg.steps, cfg.n_dump, cfg.eq_steps,
                        ctx.oset.vacf_stride, gen, backend=args.backend)
    _sync(args.device)
    t1 = time.perf_counter()
    unstable, _ = stability_values(rec.frames, ctx.system, energy=rec.energies)
    scal = epoch_observables(ctx, rec)
    _sync(args.device)
    t2 = time.perf_counter()
    samples = rec.frames.reshape(-1, *rec.frames.shape[2:])
    g_obs, _ = observable_gradient(ctx.model, target, samples, ctx.system.atomic_numbers, None, ctx.kT,
                                   cfg.minibatch_size, cfg.boltzmann_scale_by_kT, ctx.dtype)
    _sync(args.device)
    t3 = time.perf_counter()
    g_ef, _ = energy_force_gradient(ctx.model, ctx.train, EFLossSettings.from_checkpoint(ctx.ckpt),
                                    cfg.minibatch_size, ctx.device, ctx.dtype)
    apply_update(ctx.model, opt, g_obs, g_ef, 1.0, cfg.energy_force_loss_weight, cfg.grad_clip_norm_threshold)
    _sync(args.device)
    t4 = time.perf_counter()
    total = t4 - t0
    print(f"StABlE learning epoch: {args.replicas} replicas × {args.steps} steps "
          f"({args.steps * cfg.timestep / 1000:g} ps), n_dump {args.n_dump} → {samples.shape[0]} estimator samples, "
          f"{len(ctx.train)} energy/force frames; device {args.device}, backend {args.backend}, "
          f"threads {torch.get_num_threads()}")
    rows = [("simulation", t1 - t0), ("observables + stability", t2 - t1), ("estimator gradient", t3 - t2),
            ("energy/force gradient + update", t4 - t3)]
    for name, t in rows:
        print(f"  {name:32s} {t:9.2f} s  {100 * t / total:5.1f} %")
    print(f"  {'total':32s} {total:9.2f} s   ({1000 * (t1 - t0) / args.steps:.2f} ms/MD step; "
          f"unstable fraction {float(unstable.any(0).float().mean()):.2f}; losses {sorted(scal)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
