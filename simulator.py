"""Batched multi-replica MD with a trained potential (public entry point).

Library use::

    from simulator import Simulator            # = mdsim.md.runner.Simulator
    sim = Simulator(model_or_force_field, system, integrator="NoseHoover", timestep_fs=0.5,
                    temperature_K=500, integrator_config={"ttime": 20}, n_dump=100, out_dir="run")
    state = sim.initial_state(frames, n_replicas=8, mode="first")
    result = sim.run(state, n_steps=10000)

Command line (see docs/simulator.md)::

    python simulator.py --checkpoint best_checkpoint.pt --init frames.npz --replicas 8 \\
        --steps 2000 --integrator NoseHoover --temperature 500 --timestep 0.5 --out runs/md
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mdsim.md.integrators import DOF_CONVENTIONS, INTEGRATOR_NAMES
from mdsim.md.rollout import BACKENDS
from mdsim.md.runner import Recorder, RunResult, Simulator  # noqa: F401  (public re-export)
from mdsim.md.stability import CRITERIA as STABILITY_CRITERIA

__all__ = ["Simulator", "Recorder", "RunResult", "load_init_frames", "main"]


def load_init_frames(path) -> dict:
    """Frames for initial conditions: ``{R (F,N,3) Å, z (N,), cell (F,3,3)|None, pbc (bool),
    molecule_index (N,)|None}`` from an xyz/extxyz file (all frames) or an MD17-style npz
    (keys ``z``, ``R`` in Å; optional ``cell``, ``pbc``, ``molecule_index``)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--init: file not found: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in f.files if k in ("R", "z", "cell", "pbc", "molecule_index")}
        except Exception as exc:
            raise SystemExit(f"--init: cannot read {path} as npz: {exc}")
        if "R" not in d or "z" not in d:
            raise SystemExit(f"--init: {path} needs keys 'R' (frames, atoms, 3) and 'z' (atoms,), has {sorted(d)}")
        R = np.asarray(d["R"], dtype=np.float64)
        if R.ndim == 2:
            R = R[None]
        z = np.asarray(d["z"], dtype=np.int64).reshape(-1)
        if R.ndim != 3 or R.shape[1:] != (z.shape[0], 3):
            raise SystemExit(f"--init: {path}: R has shape {R.shape}, expected (frames, {z.shape[0]}, 3)")
        cell = d.get("cell")
        if cell is not None:
            cell = np.asarray(cell, dtype=np.float64)
            cell = np.broadcast_to(cell.reshape(-1, 3, 3), (R.shape[0], 3, 3)).copy()
        pbc = bool(np.any(d["pbc"])) if "pbc" in d else cell is not None
        mol = d.get("molecule_index")
        return {"R": R, "z": z, "cell": cell, "pbc": pbc, "molecule_index": mol}
    from ase.io import read
    try:
        images = read(str(path), index=":")
    except Exception as exc:
        raise SystemExit(f"--init: cannot read {path} with ase.io.read: {exc}")
    if not images:
        raise SystemExit(f"--init: {path} holds no frames")
    z = images[0].numbers.astype(np.int64)
    if any(len(a) != len(z) or np.any(a.numbers != z) for a in images):
        raise SystemExit(f"--init: all frames of {path} must have the same atoms in the same order")
    R = np.stack([a.get_positions() for a in images])
    pbc = bool(images[0].pbc.any())
    cell = np.stack([np.asarray(a.cell) for a in images]) if pbc else None
    mol = images[0].arrays.get("molecule_index")
    return {"R": R, "z": z, "cell": cell, "pbc": pbc, "molecule_index": mol}


def build_system(frames: dict, criterion: str, tolerance: float, dtype=torch.float32):
    """System from the init frames: bonds detected on frame min(10, F−1), reference bond lengths
    averaged over all frames (as the original does on its train split)."""
    from mdsim.data.format import SplitData
    from mdsim.md.system import System

    n, N = frames["R"].shape[:2]
    split = SplitData(R=frames["R"], z=frames["z"], E=np.zeros(n), F=np.zeros((n, N, 3)), fid=np.arange(n),
                      cell=frames["cell"], pbc=np.array([frames["pbc"]] * 3) if frames["pbc"] else None,
                      molecule_index=frames["molecule_index"])
    try:
        return System.from_split(split, stability_criterion=criterion, stability_tolerance=tolerance, dtype=dtype)
    except ValueError as exc:
        raise SystemExit(f"--stability-criterion: {exc}")


#: defaults of the flags a simulate config can also supply
DEFAULTS = {"replicas": 1, "steps": 1000, "integrator": "NoseHoover", "temperature": 500.0, "timestep": 0.5,
            "gamma": 0.1, "ttime": 20.0, "n_dump": 100, "seed": 0, "dtype": "float32",
            "stability_criterion": "bond_length_deviation", "bond_dev_tol": 0.5, "imd_tol": 1.2,
            "md_backend": "auto", "dof_convention": "physical", "ic_stddev": 0.0, "neighbor_skin": 0.3,
            "radial_table_spacing": 0.005,
            "frame_offset": 0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Batched multi-replica MD with a trained potential.")
    p.add_argument("--config-yml", "--config_yml", dest="config_yml", default=None,
                   help="a simulate config (configs/stable_training/*/simulate.yml): supplies the checkpoint "
                        "(eval_model), initial frames (test split), bond reference (train split), replicas, steps "
                        "(steps × n_epochs), integrator, temperature, timestep, n_dump, stability criterion, seed, "
                        "md_backend, dof_convention, ic_stddev and the early stop of evaluation "
                        "(max_frac_unstable_threshold after every `steps`); explicit flags win")
    p.add_argument("--eval_model", default=None, help="with --config-yml: which checkpoint (pre, post, ...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="with --config-yml: override a config key (repeatable)")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (ours or the original's SchNet)")
    p.add_argument("--init", default=None, help="initial frames: xyz/extxyz file or npz with keys z, R (Å)")
    p.add_argument("--reference", default=None,
                   help="frames (same formats as --init) defining bonds and reference bond lengths for the "
                        "stability criterion (default: the --init frames)")
    p.add_argument("--replicas", type=int, default=None, help="number of replicas R (default 1)")
    p.add_argument("--steps", type=int, default=None, help="MD steps (default 1000)")
    p.add_argument("--integrator", default=None,
                   choices=INTEGRATOR_NAMES)
    p.add_argument("--md-backend", dest="md_backend", default=None, choices=BACKENDS,
                   help="how the steps run: auto (default: compile on a CPU for runs of >= 2e7 atom-steps, "
                        "cuda_graph on CUDA, else eager), eager, compile (torch.compile), cuda_graph (CUDA graphs)")
    p.add_argument("--neighbor-skin", dest="neighbor_skin", type=float, default=None,
                   help="Verlet neighbour-list skin in Å for models that support it (SchNet; default 0.3); "
                        "a negative value uses the static all-pairs graph")
    p.add_argument("--radial-table-spacing", dest="radial_table_spacing", type=float, default=None,
                   help="grid spacing in Å of the tabulated radial functions (SchNet's filters) in MD "
                        "(default 0.005); a negative value evaluates the network every step")
    p.add_argument("--dof-convention", dest="dof_convention", default=None, choices=DOF_CONVENTIONS,
                   help="degrees of freedom of temperature, initial velocities and Nosé–Hoover target: physical "
                        "(3N−3 when momentum is conserved, default) or original (3N)")
    p.add_argument("--temperature", type=float, default=None, help="K (default 500)")
    p.add_argument("--timestep", type=float, default=None, help="fs (default 0.5)")
    p.add_argument("--gamma", type=float, default=None, help="Langevin friction in 1/ps (default 0.1)")
    p.add_argument("--ttime", type=float, default=None, help="Nosé–Hoover time constant in timesteps (default 20)")
    p.add_argument("--out", default=None, help="output folder (thermo.csv, replica_<r>.extxyz, stability.json)")
    p.add_argument("--n-dump", type=int, default=None, help="steps between dumps/stability checks (default 100)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float64"])
    p.add_argument("--frame-offset", dest="frame_offset", type=int, default=None,
                   help="start from the --init frames from this index on (default 0; config init_frame_offset)")
    p.add_argument("--ic-stddev", dest="ic_stddev", type=float, default=None,
                   help="Gaussian noise added to the initial positions (Å, default 0)")
    p.add_argument("--stop-fraction", dest="stop_fraction", type=float, default=None,
                   help="stop once this fraction of replicas is unstable (default: never)")
    p.add_argument("--stop-every", dest="stop_every", type=int, default=None,
                   help="steps between looks at --stop-fraction (a multiple of --n-dump; default --n-dump)")
    p.add_argument("--frames", default="first", choices=["first", "random"],
                   help="starting frames: the first R (default) or R random distinct frames")
    p.add_argument("--stability-criterion", default=None,  # the registry's criteria that need no reference data
                   choices=[n for n, c in STABILITY_CRITERIA.items() if not c.needs_reference])
    p.add_argument("--bond-dev-tol", type=float, default=None, help="Å (bond_length_deviation, default 0.5)")
    p.add_argument("--imd-tol", type=float, default=None, help="Å (imd, default 1.2)")
    p.add_argument("--dump-replicas", default="all", help="'all' or comma-separated replica ids to write as extxyz")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.config_yml:
        _apply_config(args)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in ("checkpoint", "init", "out"):
        if getattr(args, name) is None:
            p.error(f"--{name} is required (or give --config-yml)")
    for key, val, lo in (("--replicas", args.replicas, 1), ("--steps", args.steps, 0), ("--n-dump", args.n_dump, 1)):
        if val < lo:
            p.error(f"{key}: expected an integer >= {lo}, got {val}")
    if not args.timestep > 0:
        p.error(f"--timestep: expected a positive number of fs, got {args.timestep}")
    if not args.temperature > 0:
        p.error(f"--temperature: expected a positive temperature in K, got {args.temperature}")
    if args.stop_fraction is not None and not 0 < args.stop_fraction <= 1:
        p.error(f"--stop-fraction: expected a fraction in (0, 1], got {args.stop_fraction}")
    if args.stop_every is not None and (args.stop_every < 1 or args.stop_every % args.n_dump):
        p.error(f"--stop-every: expected a positive multiple of --n-dump ({args.n_dump}), got {args.stop_every}")
    if args.ic_stddev < 0:
        p.error(f"--ic-stddev: expected >= 0 Å, got {args.ic_stddev}")
    return args


def _apply_config(args) -> None:
    """Fill unset flags from a StableConfig (one clear error on a bad config)."""
    from mdsim.config import ConfigError, StableConfig, load_config
    from mdsim.data.format import split_dir
    from mdsim.training import setup

    overrides = list(args.overrides) + ([("eval_model", args.eval_model)] if args.eval_model else [])
    try:
        cfg = load_config(StableConfig, args.config_yml, overrides)
        ckpt = setup.eval_checkpoint(cfg)
    except (ConfigError, setup.SetupError) as exc:
        raise SystemExit(f"config error: {exc}")
    fill = {
        "checkpoint": str(ckpt),
        "init": str(split_dir(cfg.src, cfg.name, cfg.molecule, cfg.size, "test") / "data.npz"),
        "reference": str(split_dir(cfg.src, cfg.name, cfg.molecule, cfg.size, "train") / "data.npz"),
        "out": str(setup.run_folder(cfg) / "inference" / cfg.eval_model / "md"),
        "replicas": cfg.n_replicas, "steps": cfg.steps * cfg.n_epochs, "integrator": cfg.integrator,
        "temperature": cfg.temperature, "timestep": cfg.timestep, "gamma": cfg.integrator_config.gamma,
        "ttime": cfg.integrator_config.ttime, "n_dump": cfg.n_dump, "seed": cfg.seed,
        "stability_criterion": cfg.stability_criterion, "bond_dev_tol": cfg.bond_dev_tol, "imd_tol": cfg.imd_tol,
        "dtype": cfg.dtype, "md_backend": cfg.md_backend, "dof_convention": cfg.dof_convention,
        "neighbor_skin": -1.0 if cfg.neighbor_skin is None else cfg.neighbor_skin,
        "radial_table_spacing": -1.0 if cfg.radial_table_spacing is None else cfg.radial_table_spacing, "ic_stddev": cfg.ic_stddev,
        "frame_offset": cfg.init_frame_offset, "stop_fraction": cfg.max_frac_unstable_threshold, "stop_every": -(-cfg.steps // cfg.n_dump) * cfg.n_dump,
    }
    for k, v in fill.items():
        if getattr(args, k) is None:  # explicit flags win
            setattr(args, k, v)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    frames = load_init_frames(args.init)
    ref = frames
    if args.reference:
        ref = load_init_frames(args.reference)
        if ref["z"].shape != frames["z"].shape or (ref["z"] != frames["z"]).any():
            raise SystemExit(f"--reference: {args.reference} holds other atoms than --init {args.init}")
    tol = getattr(args, STABILITY_CRITERIA[args.stability_criterion].tolerance_key)
    system = build_system(ref, args.stability_criterion, tol, dtype=dtype)
    if args.replicas > frames["R"].shape[0]:
        raise SystemExit(f"--replicas: {args.replicas} replicas need at least as many frames, "
                         f"{args.init} has {frames['R'].shape[0]}")
    from mdsim.models import load_model
    try:
        model, _ = load_model(args.checkpoint, device=device)
    except Exception as exc:  # CheckpointError and friends: one clear line
        raise SystemExit(f"--checkpoint: {exc}")
    model = model.to(dtype) if args.dtype == "float64" else model
    for prm in model.parameters():
        prm.requires_grad_(False)
    dump = None if args.dump_replicas == "all" else [int(x) for x in args.dump_replicas.split(",") if x.strip()]
    sim = Simulator(model, system, integrator=args.integrator, timestep_fs=args.timestep,
                    temperature_K=args.temperature, integrator_config={"gamma": args.gamma, "ttime": args.ttime},
                    n_dump=args.n_dump, out_dir=args.out, dump_replicas=dump, seed=args.seed, device=device,
                    dtype=dtype, md_backend=args.md_backend, dof_convention=args.dof_convention,
                    neighbor_skin=None if args.neighbor_skin < 0 else args.neighbor_skin,
                    radial_table_spacing=None if args.radial_table_spacing < 0 else args.radial_table_spacing)
    if args.frame_offset < 0 or args.frame_offset >= len(frames["R"]):
        raise SystemExit(f"--frame-offset: expected 0 … {len(frames['R']) - 1}, got {args.frame_offset}")
    cells = frames["cell"]
    if cells is not None and getattr(cells, "ndim", 0) == 3:
        cells = cells[args.frame_offset:]
    state = sim.initial_state(frames["R"][args.frame_offset:], args.replicas, mode=args.frames, cells=cells,
                              ic_stddev=args.ic_stddev)
    t0 = time.perf_counter()
    res = sim.run(state, args.steps, progress=not args.no_progress, stop_fraction=args.stop_fraction,
                  stop_every=args.stop_every)
    steps_done = res.extra["steps_done"]
    wall = time.perf_counter() - t0
    sim.close()
    summary = {
        "checkpoint": str(args.checkpoint), "init": str(args.init), "replicas": args.replicas, "steps": args.steps,
        "integrator": args.integrator, "temperature_K": args.temperature, "timestep_fs": args.timestep,
        "stability_criterion": args.stability_criterion, "tolerance": tol, "n_dump": args.n_dump,
        "md_backend": args.md_backend, "dof_convention": args.dof_convention, "steps_done": steps_done,
        "stable": res.stable.cpu().tolist(), "first_unstable_step": res.first_unstable_step.cpu().tolist(),
        "stability_time_ps": res.stability_time_ps.cpu().tolist(),
        "worst_value": res.tracker.worst_value.cpu().tolist(),
        "mean_temperature_K": float(res.temperature.mean()) if res.temperature.numel() else None,
        "wall_s": wall, "ms_per_step": 1000 * wall / max(steps_done, 1),
    }
    out = Path(args.out)
    (out / "stability.json").write_text(json.dumps(summary, indent=2))
    n_st = int(res.stable.sum())
    print(f"{n_st}/{args.replicas} replicas stable after {steps_done} steps "
          f"({steps_done * args.timestep / 1000:.3g} ps); mean stability "
          f"{float(res.stability_time_ps.mean()):.3g} ps; {summary['ms_per_step']:.2f} ms/step; output in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
