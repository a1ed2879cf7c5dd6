#!/usr/bin/env python
"""StABlE training and evaluation.

    python stable_training.py --config-yml configs/stable_training/md17/train.yml
    python stable_training.py --config-yml configs/stable_training/md17/simulate.yml --eval_model pre
    python stable_training.py --config-yml configs/quickstart/train.yml      # whole pipeline
    python stable_training.py --config-yml configs/stable_training/md17/train.yml --eval_model post

``--eval_model X`` always evaluates X: with a training (or pipeline) config it implies
``train: false`` (the pipeline's ``simulate_overrides`` applied), so it evaluates the run that
config trains; the other settings are the training config's (simulate.yml has the paper's).

Training writes checkpoints (``cycle<c>_epoch<e>.pt``, ``end_of_cycle<c>.pt``, ``ckpt.pt``),
tensorboard logs and ``resume.pt`` to the run folder; rerunning the same command resumes.
Evaluation (``train: false``) writes ``final_metrics.json``, ``.npy`` observables and PNG plots
to ``<run folder>/inference/<eval_model>/``.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node=N stable_training.py ...`` shards
the replicas over the processes; training gives the single-process update (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import os
import sys

FLAGS = {"--eval_model": "eval_model", "--molecule": "molecule", "--size": "size", "--seed": "seed",
         "--log_dir": "log_dir", "--exp_name": "exp_name", "--n_epochs": "n_epochs", "--device": "device",
         "--pretrained_checkpoint": "pretrained_checkpoint"}


def main(argv=None) -> int:
    from mdsim.config import StableConfig
    from mdsim.config.cli import add_config_args, config_from_args
    from mdsim.data.format import DataError
    from mdsim.models.checkpoint import CheckpointError
    from mdsim.training.setup import SetupError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, FLAGS)
    args = p.parse_args(argv)
    if not args.config_yml:
        p.error("--config-yml is required")
    cfg = config_from_args(StableConfig, args, FLAGS)
    if args.flag_eval_model is not None and (cfg.train or cfg.pipeline is not None):
        from mdsim.config import ConfigError
        from mdsim.training.pipeline import evaluation_config
        try:
            cfg = evaluation_config(cfg, cfg.eval_model)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
    from mdsim.training import distributed

    try:
        if cfg.pipeline is not None:
            if distributed.launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise SetupError("the one-command pipeline (pipeline: section) runs in one process; under "
                                 "torchrun run its steps separately (pretraining.py, then stable_training.py "
                                 "with train.yml and simulate.yml)")
            from mdsim.training.pipeline import run_pipeline
            run_pipeline(cfg)
        elif cfg.train:
            from mdsim.training.stable import train
            train(cfg)
        else:
            from mdsim.training.evaluate import run_evaluation
            out = run_evaluation(cfg)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"metrics: {out / 'final_metrics.json'}")
    except (SetupError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
