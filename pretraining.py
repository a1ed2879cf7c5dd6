#!/usr/bin/env python
"""QM pretraining of an interatomic potential on energies and forces.

    python pretraining.py --mode train --config-yml configs/pretraining/md17/schnet.yml \
        --molecule aspirin --size 1k
    python pretraining.py --mode validate --config-yml ... [--checkpoint PATH]

Outputs go to ``<run_dir>/<dataset>_<size>_<model>/``: ``checkpoints/{checkpoint,best_checkpoint}.pt``,
``checkpoints/config.yml`` and tensorboard logs in ``logs/``.  Rerunning ``--mode train`` resumes
from ``checkpoint.pt`` (``--fresh`` starts over).

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N pretraining.py ...`` trains with
DistributedDataParallel; ``optim.batch_size`` is the global batch (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

FLAGS = {"--molecule": "dataset.molecule", "--size": "dataset.size", "--seed": "seed",
         "--run-dir": "run_dir", "--device": "device", "--max-epochs": "optim.max_epochs"}


def main(argv=None) -> int:
    from mdsim.config import PretrainConfig
    from mdsim.config.cli import add_config_args, config_from_args
    from mdsim.data.format import DataError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("train", "validate", "test"), default="train")
    p.add_argument("--checkpoint", default=None, help="checkpoint for validate/test (default: the run's best)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint.pt and start over")
    p.add_argument("--nequip", action="store_true", help="accepted for compatibility: our NequIP-style "
                   "model trains with this same script (model.name: nequip)")
    add_config_args(p, FLAGS)
    args = p.parse_args(argv)
    cfg = config_from_args(PretrainConfig, args, FLAGS)
    from mdsim.training import distributed, pretrain

    main = int(os.environ.get("RANK", "0")) == 0
    try:
        if args.mode == "train":
            res = pretrain.train(cfg, fresh=args.fresh)
            if main:
                print(json.dumps({"run_dir": str(res.run_dir), "epochs": res.epochs, "stopped": res.stopped,
                                  "best_val": res.best_val}, indent=2))
        else:
            ck = Path(args.checkpoint) if args.checkpoint else pretrain.run_folder(cfg) / "checkpoints" / "best_checkpoint.pt"
            if not ck.is_file():
                raise FileNotFoundError(f"checkpoint not found: {ck}")
            split = "val" if args.mode == "validate" else "test"
            metrics = pretrain.evaluate_checkpoint(cfg, ck, split)
            if main:
                print(json.dumps(metrics, indent=2))
    except (DataError, FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
