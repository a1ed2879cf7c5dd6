"""Re-save a SchNet checkpoint in this package's minimal checkpoint format (model name,
hyperparameters, state dict, normalisers, a few metadata): the original's published checkpoints
(``mdsim/training/setup.py:check_compatible`` fails on the original's *pretrained* one, whose
``config['model']`` is the string ``'schnet'``) and the study's own final checkpoints (without
optimizer state, so they are small enough to commit).

The model is rebuilt by ``mdsim.models.checkpoint.load_model`` and written with
``save_checkpoint``; the copy is reloaded through ``mdsim.calculator.StableCalculator`` and its
forces compared with the source's.

    python experiments/xtb_aspirin/convert_original.py SRC.pt DEST.pt [--max-bytes N]
"""
import argparse
import os
from pathlib import Path

import numpy as np
import torch

from mdsim.calculator import StableCalculator
from mdsim.models import batch_from_frames, energy_and_forces
from mdsim.models.checkpoint import load_model, save_checkpoint


def export(src: str, dest: str, max_bytes=None) -> None:
    model, ck = load_model(src)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    extra = {"converted_from": str(src), "epoch": ck.get("epoch"), "val_metrics": ck.get("val_metrics")}
    if isinstance(ck.get("config"), dict):  # the training config (small): StABlE records it
        extra["config"] = ck["config"]
    save_checkpoint(dest, model, extra)
    size = os.path.getsize(dest)
    if max_bytes is not None and size > max_bytes:
        raise SystemExit(f"{dest}: {size} bytes, more than --max-bytes {max_bytes}")
    again = StableCalculator(checkpoint=dest).model
    rng = np.random.default_rng(0)
    R = torch.tensor(rng.normal(scale=1.5, size=(2, 21, 3)), dtype=torch.float32)
    z = torch.tensor([6] * 9 + [8] * 4 + [1] * 8)
    f1 = energy_and_forces(model, **batch_from_frames(R, z, None))[1]
    f2 = energy_and_forces(again, **batch_from_frames(R, z, None))[1]
    assert torch.allclose(f1, f2), "the re-saved checkpoint gives different forces"
    print(f"{src} -> {dest} ({size} bytes; {model.model_name} {dict(model.hyperparameters)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dest")
    ap.add_argument("--max-bytes", type=int, default=None, help="fail if the copy is larger")
    a = ap.parse_args()
    export(a.src, a.dest, a.max_bytes)
