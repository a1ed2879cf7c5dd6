"""Re-save the original's published SchNet checkpoints in this package's checkpoint format.

Needed because ``mdsim/training/setup.py:check_compatible`` fails on the original's
*pretrained* checkpoint (its ``config['model']`` is the string ``'schnet'``, not a dict).
The model is rebuilt by ``mdsim.models.checkpoint.load_model`` (the same loader the evaluation
would use) and written unchanged with ``save_checkpoint``; forces of the two files are compared.

    python experiments/xtb_aspirin/convert_original.py SRC.pt DEST.pt
"""
import sys
from pathlib import Path

import numpy as np
import torch

from mdsim.models import batch_from_frames, energy_and_forces
from mdsim.models.checkpoint import load_model, save_checkpoint


def main(src: str, dest: str) -> None:
    model, ck = load_model(src)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dest, model, {"converted_from": str(src), "epoch": ck.get("epoch"),
                                  "original_val_metrics": ck.get("val_metrics")})
    again, _ = load_model(dest)
    rng = np.random.default_rng(0)
    R = torch.tensor(rng.normal(scale=1.5, size=(2, 21, 3)), dtype=torch.float32)
    z = torch.tensor([6] * 9 + [8] * 4 + [1] * 8)
    f1 = energy_and_forces(model, **batch_from_frames(R, z, None))[1]
    f2 = energy_and_forces(again, **batch_from_frames(R, z, None))[1]
    assert torch.allclose(f1, f2), "converted checkpoint gives different forces"
    print(f"{src} -> {dest} ({model.model_name} {dict(model.hyperparameters)})")


if __name__ == "__main__":
    main(*sys.argv[1:3])
