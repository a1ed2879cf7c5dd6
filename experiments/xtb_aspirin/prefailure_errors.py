"""Are the models wrong where a model's MD goes before it fails?

For one evaluation folder that still holds its trajectory (``full_traj.npy``), takes each
unstable replica's saved frames ``--lags-ps`` before its first bond beyond the tolerance (found
as ``failure_modes.py`` finds it), computes GFN2-xTB forces there (tblite) and each checkpoint's
forces, and reports each model's force MAE on those frames next to its test-set MAE.  A model
whose error is much larger on its own pre-failure frames than on the test set has wandered into
configurations its training data did not cover; the other models' errors there tell whether
they would have been right.

    python experiments/xtb_aspirin/prefailure_errors.py \
        --eval experiments/xtb_aspirin/out/evals/schnet_aspirin_qm_10k_500K_lr=0.001_efweight=10/inference/pre \
        --name qm_10k_500K --dest experiments/xtb_aspirin

Writes ``<dest>/results/prefailure_<name>.{json,md}``.  Forces in eV/Å.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

MODELS = ["QM(1k)", "QM(10k)", "StABlE(1k), paper settings", "StABlE(1k), lr 1e-2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", required=True, help="an evaluation's inference/pre folder with full_traj.npy")
    ap.add_argument("--name", required=True, help="name for the results files")
    ap.add_argument("--checkpoints", default="experiments/xtb_aspirin/checkpoints")
    ap.add_argument("--dest", default="experiments/xtb_aspirin")
    ap.add_argument("--lags-ps", type=float, nargs="+", default=[0.5, 0.1])
    a = ap.parse_args(argv)
    d = Path(a.eval)
    if not (d / "full_traj.npy").is_file() or not (d / "simulate_config.yml").is_file():
        print(f"prefailure_errors: {d}: no full_traj.npy/simulate_config.yml (trajectory not kept?)", file=sys.stderr)
        return 2
    if min(a.lags_ps) <= 0:
        print("prefailure_errors: --lags-ps must be > 0 (ps before the failure)", file=sys.stderr)
        return 2
    from ase import Atoms
    from tblite.ase import TBLite

    from failure_modes import folder_failures
    from mdsim.calculator import StableCalculator
    from study_models import on_frames, present, write_results

    _, system, traj, stable, dt_frame, hits = folder_failures(d)
    z = system.atomic_numbers.numpy()
    res = {"eval": d.as_posix(), "lags_ps": a.lags_ps, "mae": {}}
    for lag in a.lags_ps:
        k = int(round(lag / dt_frame))
        frames = [Atoms(numbers=z, positions=np.asarray(traj[r, f - k], dtype=float))
                  for r, (f, _) in enumerate(hits) if not stable[r] and f is not None and f - k >= 0]
        ref = on_frames(frames, TBLite(method="GFN2-xTB", verbosity=0), "forces")
        row = {"frames": len(frames)}
        for label, _, ck in present(a.checkpoints, MODELS, "prefailure_errors"):
            row[label] = float(np.abs(on_frames(frames, StableCalculator(checkpoint=str(ck)), "forces") - ref).mean())
        res["mae"][f"{lag:g} ps"] = row
        print(f"{lag:g} ps before failure: {row}", file=sys.stderr)
    labels = [lab for lab in MODELS if any(lab in r for r in res["mae"].values())]
    lines = [f"Force MAE (eV/Å, against GFN2-xTB) on the saved frames of `{a.name}`'s unstable replicas, "
             "a lag before each replica's first bond beyond the tolerance.", "",
             "| frames | n | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for lag, row in res["mae"].items():
        lines.append(f"| {lag} before failure | {row['frames']} | "
                     + " | ".join(f"{row[lab]:.3f}" for lab in labels) + " |")
    write_results(a.dest, f"prefailure_{a.name}", res, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
