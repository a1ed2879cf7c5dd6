"""How much of a model's energy error is a constant offset?

For each of the study's checkpoints, measures the test energy MAE/RMSE and the mean signed
energy error (the bias) as the evaluation reports them (the first ``--max-frames`` test frames),
then refits the model's energy constant on the 1k train split
(``mdsim.training.pretrain.refit_energy_offset``: the least-squares constant, forces unchanged)
and measures again.  A model whose energy MAE falls to its start's after the refit has an error
that is an offset, which neither forces nor dynamics see.

    python experiments/xtb_aspirin/energy_offset.py --data experiments/xtb_aspirin/out/data \
        --checkpoints experiments/xtb_aspirin/checkpoints --dest experiments/xtb_aspirin

Writes ``<dest>/results/energy_offset.json`` and ``energy_offset.md``.  Errors in eV.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdsim.data.format import DataError, load_split, split_dir  # noqa: E402
from mdsim.models import load_model  # noqa: E402
from mdsim.training.pretrain import evaluate, refit_energy_offset  # noqa: E402

sys.path.insert(0, str(HERE))
from study_models import present, write_results  # noqa: E402

MODELS = ["QM(1k)", "StABlE(1k), paper settings", "StABlE(1k), lr 1e-2",
          "efonly (energy-force term alone, lr 1e-2)", "QM(10k)"]


def measure(ckpt: Path, train, test, max_frames: int, batch_size: int) -> dict:
    model, _ = load_model(ckpt, device="cpu")
    before = evaluate(model, test, batch_size, "cpu", max_frames=max_frames)
    shift = refit_energy_offset(model, train, batch_size, "cpu")
    after = evaluate(model, test, batch_size, "cpu", max_frames=max_frames)
    keys = ("energy_mae", "energy_rmse", "energy_bias", "forces_mae")
    return {"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys},
            "shift": shift}


def table(res: dict, frames: int) -> str:
    out = [f"Test energy error before and after refitting the energy constant on the 1k train split "
           f"(first {frames} test frames, eV; forces unchanged by the refit).", "",
           "| model | energy MAE | energy RMSE | mean signed error | MAE after refit | RMSE after refit "
           "| constant shifted by |", "|---|---|---|---|---|---|---|"]
    for label, r in res.items():
        b, a = r["before"], r["after"]
        out.append(f"| {label} | {b['energy_mae']:.4f} | {b['energy_rmse']:.4f} | {b['energy_bias']:+.4f} "
                   f"| {a['energy_mae']:.4f} | {a['energy_rmse']:.4f} | {r['shift']:+.4f} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="experiments/xtb_aspirin/out/data",
                    help="the study's data root (download_stable_paper_data.py layout)")
    ap.add_argument("--checkpoints", default="experiments/xtb_aspirin/checkpoints")
    ap.add_argument("--dest", default="experiments/xtb_aspirin")
    ap.add_argument("--max-frames", type=int, default=1000,
                    help="test frames (1000: as the evaluation's final_metrics.json)")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--molecule", default="aspirin", help="the dataset's molecule (xtb/<molecule>/1k)")
    a = ap.parse_args(argv)
    if a.max_frames < 1:
        print("energy_offset: --max-frames must be ≥ 1", file=sys.stderr)
        return 2
    try:
        train = load_split(split_dir(a.data, "xtb", a.molecule, "1k", "train"))
        test = load_split(split_dir(a.data, "xtb", a.molecule, "1k", "test"))
    except DataError as exc:
        print(f"energy_offset: {exc}", file=sys.stderr)
        return 2
    res = {}
    for label, rel, ckpt in present(a.checkpoints, MODELS, "energy_offset"):
        res[label] = {"checkpoint": rel, **measure(ckpt, train, test, a.max_frames, a.batch_size)}
        print(f"{label}: MAE {res[label]['before']['energy_mae']:.4f} -> {res[label]['after']['energy_mae']:.4f} eV",
              file=sys.stderr)
    if not res:
        print("energy_offset: no checkpoint found", file=sys.stderr)
        return 2
    frames = min(a.max_frames, len(test))
    write_results(a.dest, "energy_offset", {"test_frames": frames, "models": res}, table(res, frames))
    return 0


if __name__ == "__main__":
    sys.exit(main())
