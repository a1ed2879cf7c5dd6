"""Shared fixtures: tiny offline data and a tiny pretrained model, made once per session."""
import os
from pathlib import Path

import pytest
import torch



@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use small models: one thread is as fast and avoids OpenMP stalls when other jobs
    share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

#: the workplace's shared folder beside the clone (data and the original's checkpoints), or
#: $STABLE_SHARED_DIR; tests that need it skip cleanly without it
SHARED = Path(os.environ.get("STABLE_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")


@pytest.fixture(scope="session")
def xtb_data_root(tmp_path_factory):
    """GFN2-xTB ethanol data (300 frames at 0.5 fs), split like MD17 (random + contiguous)."""
    pytest.importorskip("tblite")
    from mdsim.data import download

    root = tmp_path_factory.mktemp("data")
    rc = download.main(["--dataset", "xtb", "--molecule", "ethanol", "--frames", "300", "--temperature", "500",
                        "--data-dir", str(root), "--no-progress", "--equilibration-fs", "50", "--seed", "1"])
    assert rc == 0
    return root


TINY_SCHNET = ["model.hidden_channels=16", "model.num_filters=16", "model.num_interactions=2",
               "model.num_gaussians=10", "optim.batch_size=16", "optim.eval_batch_size=64",
               "optim.warmup_steps=0", "optim.lr_initial=0.005", "progress=false", "logger.name=none"]


def pretrain_config(data_root, run_dir, extra=()):
    from mdsim.config import PretrainConfig, load_config
    root = Path(__file__).resolve().parents[1]
    return load_config(PretrainConfig, root / "configs/pretraining/xtb/schnet.yml",
                       [("dataset.src", str(data_root)), ("dataset.molecule", "ethanol"),
                        ("run_dir", str(run_dir))] + TINY_SCHNET + list(extra))


@pytest.fixture(scope="session")
def tiny_pretrained(xtb_data_root, tmp_path_factory):
    """(model_dir, checkpoint path) of a tiny SchNet pretrained for a few epochs."""
    from mdsim.training.pretrain import train
    run_dir = tmp_path_factory.mktemp("MODELPATH")
    res = train(pretrain_config(xtb_data_root, run_dir, ["optim.max_epochs=6"]), log=lambda *a: None)
    return run_dir, res.run_dir / "checkpoints" / "best_checkpoint.pt"
