"""Summary of a finished QM pretraining stage, for the report and VALIDATION.md.

    python experiments/xtb_aspirin/pretrain_summary.py --log out/logs/qm_1k.log \
        --test-json out/logs/test_qm_1k.json --test-data out/data/xtb/aspirin/1k/test/data.npz \
        > results/pretrain_qm_1k.json

Reads the last JSON block ``pretraining.py --mode train`` printed into the stage log (epochs,
the rule that stopped training — ``min_lr``: the learning rate reached ``optim.early_stopping_lr``,
``wall_time``, ``max_epochs`` — and the best validation errors) and the test-set errors of the
best checkpoint (``pretraining.py --mode test``), and prints one JSON object.  Errors in eV and
eV/Å.  With ``--checkpoint`` (the run's ``checkpoint.pt``) it adds ``train_wall_s``, the
training's own wall time summed over every resumed run (what the wall-time rule counts)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def last_json(text: str) -> dict:
    """The last top-level JSON object in ``text`` (a block starting with a line '{')."""
    lines = text.splitlines()
    for start in range(len(lines) - 1, -1, -1):
        if lines[start].strip() == "{":
            for end in range(start, len(lines)):
                if lines[end].strip() == "}":  # nested objects close with an indented "}": try on
                    try:
                        return json.loads("\n".join(lines[start:end + 1]))
                    except json.JSONDecodeError:
                        continue
    raise ValueError("no JSON object found")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, help="the pretraining stage's log (out/logs/<stage>.log)")
    ap.add_argument("--test-json", required=True, help="output of pretraining.py --mode test")
    ap.add_argument("--test-data", default=None, help="the test split's data.npz (to count its frames)")
    ap.add_argument("--checkpoint", default=None,
                    help="the run's checkpoint.pt (its trainer state holds the training's wall time)")
    a = ap.parse_args(argv)
    try:
        train = last_json(Path(a.log).read_text())
        test = last_json(Path(a.test_json).read_text())
    except (OSError, ValueError) as exc:
        print(f"pretrain_summary: {exc}", file=sys.stderr)
        return 2
    if "stopped" not in train:
        print(f"pretrain_summary: {a.log}: the last JSON block has no 'stopped' key (training not finished?)",
              file=sys.stderr)
        return 2
    out = {"epochs": train.get("epochs"), "stopped": train["stopped"], "best_val": train.get("best_val"),
           "test": test}
    if a.checkpoint:
        try:
            import torch
            ck = torch.load(a.checkpoint, map_location="cpu", weights_only=False)
            out["train_wall_s"] = round(float(ck["trainer_state"]["elapsed"]), 1)
        except (OSError, KeyError, RuntimeError, TypeError) as exc:
            print(f"pretrain_summary: {a.checkpoint}: no training wall time ({exc})", file=sys.stderr)
            return 2
    if a.test_data and Path(a.test_data).is_file():
        out["test_frames"] = int(np.load(a.test_data)["E"].shape[0])
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
