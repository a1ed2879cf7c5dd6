"""Wall time of one full StABlE learning epoch (``StableLoop.run_epoch``) and its split between
simulation, observables (stability check + monitoring observables), test-set energy/force
errors, the Boltzmann-estimator gradient, the energy/force gradient and the update; optionally
side by side with the code at another git ref.

SchNet aspirin (``--checkpoint``, e.g. the original's pretrained model, else random weights with
the original's hyperparameters), GFN2-xTB aspirin frames (``--data``, split into a temporary
folder), Nosé–Hoover at 500 K, 0.5 fs, RDF training observable, a learning epoch (every epoch
learns).  The issue's setting is 128 replicas × 1 ps (2000 steps); on a CPU use fewer
(the defaults, 32 × 200) and read the split.

    python bench/stable_epoch.py [--data data/raw/xtb_aspirin_500K.npz] [--checkpoint CKPT]
        [--replicas 32] [--steps 200] [--n-dump 100] [--device cpu] [--backend eager]
        [--threads 1] [--ef-frames K] [--compare-to REF [--repeats 3]]

``--ef-frames K`` sets ``energy_force_frames_per_epoch`` for the current code (not for the
ref, which may not know the key).  ``--compare-to REF`` checks REF out into a temporary git
worktree and runs the same epoch (same data split, same weights) with that code and with the
current code, alternating (``--repeats`` times each, the order swapped every repeat), each in a
fresh subprocess whose ``mdsim`` is that tree's; it prints the median split of each and the
ratio REF / current.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "data/raw/xtb_aspirin_500K.npz"
#: rows of the split: label, functions of mdsim.training.stable timed (module globals run_epoch calls)
PARTS = (("simulation", ("simulate",)),
         ("observables + stability", ("stability_values", "epoch_observables")),
         ("test E/F errors", ("evaluate",)),
         ("estimator gradient", ("observable_gradient", "local_observable_gradient")),
         ("energy/force gradient", ("energy_force_gradient",)),
         ("update", ("apply_update",)))


# ----------------------------------------------------------------------------- one epoch (child)
def measure(code_root: Path, data_dir: Path, checkpoint: Path, log_dir: Path, args) -> dict:
    """One learning epoch with the ``mdsim`` of ``code_root``; returns seconds per part."""
    sys.path.insert(0, str(code_root))
    import torch

    import mdsim
    if not Path(mdsim.__file__).resolve().is_relative_to(code_root.resolve()):
        raise RuntimeError(f"imported {mdsim.__file__}, expected mdsim under {code_root}")
    from mdsim.config import StableConfig, load_config
    from mdsim.training import stable

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = [("src", str(data_dir)), ("name", "xtb"), ("max_size", "1k"),
                 ("pretrained_checkpoint", str(checkpoint)), ("log_dir", str(log_dir)),
                 ("n_replicas", args.replicas), ("steps", args.steps), ("n_dump", args.n_dump),
                 ("device", args.device), ("md_backend", args.backend), "progress=false",
                 "only_learn_if_unstable_threshold_reached=false"]  # a learning epoch
    if args.ef_frames is not None:
        overrides.append(("energy_force_frames_per_epoch", args.ef_frames))
    cfg = load_config(StableConfig, code_root / "configs/stable_training/md17/train.yml", overrides)
    comm = stable.distributed.setup(cfg.device)
    ctx = stable.prepare(cfg, log=lambda *a: None, device=comm.device)

    def sync():
        if comm.device.type == "cuda":
            torch.cuda.synchronize()

    loop = stable.StableLoop(ctx, comm, lambda *a: None)
    loop.start()
    compile_s = 0.0
    if args.backend != "eager":  # compile once outside the timed region (once per run, not per epoch)
        t_c = time.perf_counter()
        stable.simulate(loop.integrator, ctx.force_field, loop.state.clone(), 2 * cfg.n_dump, cfg.n_dump,
                        cfg.eq_steps, ctx.oset.vacf_stride, torch.Generator().manual_seed(1), progress=False,
                        backend=cfg.md_backend, planned_steps=cfg.steps * cfg.n_epochs)
        compile_s = time.perf_counter() - t_c
    times: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                times[name] = times.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    for _, names in PARTS:
        for name in names:
            if hasattr(stable, name):
                setattr(stable, name, timed(name, getattr(stable, name)))
    shapes = []
    sim = stable.simulate
    stable.simulate = lambda *a, **k: (lambda out: (shapes.append(tuple(out[1].frames.shape[:2])), out)[1])(
        sim(*a, **k))  # (stored frames, replicas)
    sync()
    t0 = time.perf_counter()
    scalars = loop.run_epoch(0)
    sync()
    total = time.perf_counter() - t0
    parts = {label: sum(times.get(n, 0.0) for n in names) for label, names in PARTS}
    parts["other"] = total - sum(parts.values())
    parts["total"] = total
    k = getattr(cfg, "energy_force_frames_per_epoch", None)
    return {"parts": parts, "mdsim": str(Path(mdsim.__file__).parent), "threads": torch.get_num_threads(),
            "backend": args.backend if args.backend != "auto" else "auto → " + stable_backend(loop, ctx, cfg),
            "compile_s": compile_s,
            "unstable": scalars.get("Fraction of Unstable Replicas"),
            "estimator_samples": shapes[0][0] * shapes[0][1],
            "ef_frames": len(ctx.train) if k is None else min(k, len(ctx.train)),
            "ms_per_step": 1000 * parts["simulation"] / cfg.steps}


def stable_backend(loop, ctx, cfg) -> str:
    from mdsim.md.rollout import resolve_auto_backend
    return resolve_auto_backend(loop.state, ctx.force_field, cfg.steps * cfg.n_epochs)[0]


# ----------------------------------------------------------------------------- driver
def resolve_data(arg: str) -> Path:
    p = Path(arg).expanduser()
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, ROOT / p]):
        if cand.is_file():
            return cand.resolve()
    raise SystemExit(f"--data: {arg} not found (expected the GFN2-xTB aspirin frames, an MD17-format .npz; "
                     "pass --data PATH)")


def prepare_inputs(raw: Path, checkpoint, tmp: Path):
    """Data split and checkpoint shared by every run (made once, with the current code)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from mdsim.data.splits import split_raw_file
    from mdsim.models import build_model, save_checkpoint
    split_raw_file(raw, tmp / "data", name="xtb", molecule="aspirin", sizes=["1k"], layouts=("random", "contiguous"))
    if checkpoint:
        ckpt = Path(checkpoint).expanduser().resolve()
        if not ckpt.is_file():
            raise SystemExit(f"--checkpoint: {checkpoint} not found")
        return tmp / "data", ckpt
    torch.manual_seed(0)
    ckpt = tmp / "random.pt"
    save_checkpoint(ckpt, build_model("schnet", hidden_channels=64, num_filters=64, num_interactions=6,
                                      num_gaussians=25, cutoff=5.0))
    return tmp / "data", ckpt


def resolve_ref(ref: str) -> str:
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                         capture_output=True, text=True)
    if rev.returncode != 0:
        raise SystemExit(f"--compare-to: {ref!r} is not a commit of the repository at {ROOT}")
    return rev.stdout.strip()


def checkout(sha: str, tmp: Path) -> Path:
    """Commit ``sha`` as a detached git worktree under ``tmp``."""
    where = tmp / "ref"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(where), sha], check=True)
    return where


def run_child(code_root: Path, data_dir: Path, ckpt: Path, log_dir: Path, args, ef_frames, backend) -> dict:
    out = log_dir / "result.json"
    log_dir.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(code_root), str(data_dir), str(ckpt),
           str(log_dir), "--replicas", str(args.replicas), "--steps", str(args.steps), "--n-dump", str(args.n_dump),
           "--device", args.device, "--backend", backend]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if ef_frames is not None:
        cmd += ["--ef-frames", str(ef_frames)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code_root)] + (
        [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(cmd, env=env, cwd=log_dir)
    if proc.returncode != 0:
        raise SystemExit(f"the epoch with the code at {code_root} failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def report(results: dict, args) -> None:
    """results: side name → list of child results."""
    labels = [label for label, _ in PARTS] + ["other", "total"]
    med = {side: {lab: statistics.median(r["parts"][lab] for r in rs) for lab in labels}
           for side, rs in results.items()}
    first = next(iter(results.values()))[0]
    print(f"StABlE learning epoch: {args.replicas} replicas × {args.steps} steps (n_dump {args.n_dump}) → "
          f"{first['estimator_samples']} estimator samples; device {args.device}, threads {first['threads']}")
    for side, rs in results.items():
        print(f"  {side}: mdsim {rs[0]['mdsim']}, md_backend {rs[0].get('backend')} (warm-up/compile before "
              f"the epoch {rs[0].get('compile_s', 0.0):.1f} s, not timed), {rs[0]['ef_frames']} energy/force frames, "
              f"{len(rs)} run(s), median {med[side]['total']:.2f} s, "
              f"{statistics.median(r['ms_per_step'] for r in rs):.2f} ms/MD step")
    sides = list(results)
    head = "".join(f"{s:>22s}" for s in sides) + ("      ratio" if len(sides) == 2 else "")
    print(f"  {'part':26s}{head}")
    for lab in labels:
        row = "".join(f"{med[s][lab]:9.2f} s ({100 * med[s][lab] / med[s]['total']:5.1f} %)" for s in sides)
        if len(sides) == 2:
            a, b = med[sides[0]][lab], med[sides[1]][lab]
            row += f"   {a / b:7.2f}×" if b > 0 else "         -"
        print(f"  {lab:26s}{row}")
    if len(sides) == 2:
        print(f"  ratio = {sides[0]} / {sides[1]} (> 1: the current code is faster)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="GFN2-xTB aspirin frames (MD17-format .npz)")
    p.add_argument("--checkpoint", default=None, help="SchNet aspirin checkpoint (default: random weights)")
    p.add_argument("--replicas", type=int, default=32)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--n-dump", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="eager", choices=["auto", "eager", "compile", "cuda_graph"],
                   help="md_backend of the current code (auto: what a StABlE run uses by default)")
    p.add_argument("--ref-backend", default=None, choices=["eager", "compile", "cuda_graph"],
                   help="md_backend of the --compare-to side (default: --backend; the code before the "
                        "speed work had no auto and defaulted to eager)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ef-frames", type=int, default=None,
                   help="energy_force_frames_per_epoch of the current code (default: all training frames)")
    p.add_argument("--compare-to", default=None, metavar="REF", help="git ref to run side by side")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side (alternating)")
    p.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ef_frames is not None and args.ef_frames < 1:
        p.error(f"--ef-frames: expected a positive number of frames, got {args.ef_frames}")
    if args.repeats < 1:
        p.error(f"--repeats: expected ≥ 1, got {args.repeats}")
    if args.child:
        code_root, data_dir, ckpt, log_dir = map(Path, args.child)
        res = measure(code_root, data_dir, ckpt, log_dir, args)
        (log_dir / "result.json").write_text(json.dumps(res))
        return 0

    raw = resolve_data(args.data)
    sha = resolve_ref(args.compare_to) if args.compare_to else None
    tmp = Path(tempfile.mkdtemp(prefix="stable_epoch_"))
    ref_tree = None
    try:
        data_dir, ckpt = prepare_inputs(raw, args.checkpoint, tmp)
        sides = [("current", ROOT, args.ef_frames, args.backend)]
        if args.compare_to:
            ref_tree = checkout(sha, tmp)
            sides.insert(0, (args.compare_to, ref_tree, None, args.ref_backend or args.backend))
        results = {name: [] for name, _, _, _ in sides}
        for i in range(args.repeats):
            for name, code, k, backend in (sides if i % 2 == 0 else sides[::-1]):
                results[name].append(run_child(code, data_dir, ckpt, tmp / f"run_{name.replace('/', '_')}_{i}",
                                               args, k, backend))
        report(results, args)
    finally:
        if ref_tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(ref_tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
