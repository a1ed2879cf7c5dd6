"""QM pretraining: learning, resume after a kill, checkpoints and bad input."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_SCHNET, pretrain_config
from mdsim.config import ConfigError
from mdsim.data.format import DataError, load_metadata, load_split, split_dir
from mdsim.models import load_model
from mdsim.training.pretrain import build_from_config, evaluate, refit_energy_offset, train

ROOT = Path(__file__).resolve().parents[1]


def test_pretraining_lowers_val_force_mae(xtb_data_root, tiny_pretrained):
    _, ckpt = tiny_pretrained
    cfg = pretrain_config(xtb_data_root, "unused")
    val = load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "val"))
    meta = load_metadata(split_dir(xtb_data_root, "xtb", "ethanol", "1k"))
    torch.manual_seed(cfg.seed)
    untrained = build_from_config(cfg, meta, load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "train")))
    before = evaluate(untrained, val, 64, "cpu")["forces_mae"]
    model, ck = load_model(ckpt)
    after = evaluate(model, val, 64, "cpu")["forces_mae"]
    assert after < 0.8 * before, (before, after)
    assert ck["val_metrics"]["forces_mae"] == pytest.approx(after, rel=1e-4)
    # energies are in eV around the data's mean: normalisation stored in the checkpoint
    assert ck["normalizers"]["target"]["mean"] == pytest.approx(meta["e_mean"])


def test_resume_continues_exactly(xtb_data_root, tmp_path):
    full = train(pretrain_config(xtb_data_root, tmp_path / "a", ["optim.max_epochs=3"]), log=lambda *a: None)
    train(pretrain_config(xtb_data_root, tmp_path / "b", ["optim.max_epochs=1"]), log=lambda *a: None)
    msgs = []
    part = train(pretrain_config(xtb_data_root, tmp_path / "b", ["optim.max_epochs=3"]), log=msgs.append)
    assert any("resuming" in m for m in msgs)
    ca = torch.load(full.run_dir / "checkpoints/checkpoint.pt", weights_only=False)
    cb = torch.load(part.run_dir / "checkpoints/checkpoint.pt", weights_only=False)
    assert [h["epoch"] for h in cb["trainer_state"]["history"]] == [1, 2, 3]
    for k in ca["state_dict"]:
        torch.testing.assert_close(ca["state_dict"][k], cb["state_dict"][k], rtol=0, atol=0)
    assert ca["optimizer"]["param_groups"][0]["lr"] == cb["optimizer"]["param_groups"][0]["lr"]


def test_kill_then_rerun_resumes(xtb_data_root, tmp_path):
    """A real SIGKILL after the first epoch's checkpoint, then the same command finishes."""
    args = [sys.executable, str(ROOT / "pretraining.py"), "--mode", "train", "--config-yml",
            str(ROOT / "configs/pretraining/xtb/schnet.yml"), "--molecule", "ethanol", "--run-dir", str(tmp_path),
            "--set", f"dataset.src={xtb_data_root}", "--max-epochs", "3"] + sum((["--set", o] for o in TINY_SCHNET), [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ck = tmp_path / "xtb-ethanol_1k_schnet/checkpoints/checkpoint.pt"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not ck.exists() and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = torch.load(ck, weights_only=False)["epoch"]
    assert first >= 1
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    final = torch.load(ck, weights_only=False)
    assert final["epoch"] == 3
    assert [h["epoch"] for h in final["trainer_state"]["history"]] == [1, 2, 3]
    if first < 3:
        assert "resuming" in out.stdout + out.stderr


def test_bad_input(xtb_data_root, tmp_path):
    with pytest.raises(DataError, match="missing split file"):
        train(pretrain_config(xtb_data_root, tmp_path, ["dataset.size=50k"]), log=lambda *a: None)
    with pytest.raises(ConfigError, match="optim.max_epochs: expected an integer"):
        pretrain_config(xtb_data_root, tmp_path, ["optim.max_epochs=many"])
    # resuming a run folder with another architecture is refused
    train(pretrain_config(xtb_data_root, tmp_path, ["optim.max_epochs=1"]), log=lambda *a: None)
    with pytest.raises(RuntimeError, match="was written for model"):
        train(pretrain_config(xtb_data_root, tmp_path, ["optim.max_epochs=2", "model.hidden_channels=8"]),
              log=lambda *a: None)
    # CLI: one clear line, non-zero exit
    out = subprocess.run([sys.executable, str(ROOT / "pretraining.py"), "--config-yml",
                          str(ROOT / "configs/pretraining/xtb/schnet.yml"), "--set", "optim.batchsize=3"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown key 'optim.batchsize' (did you mean 'batch_size'?)" in out.stderr


def test_refit_energy_offset_removes_a_constant_error(xtb_data_root, tiny_pretrained):
    """Shift the model's energies by a constant, refit on the train split: the energy error on the
    val split returns to what it was up to the train/val difference of the mean error; forces are
    untouched and the refit constant is the least-squares one (rmse² = var + bias²)."""
    _, ckpt = tiny_pretrained
    train_split = load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "train"))
    val = load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "val"))
    model, _ = load_model(ckpt)
    m0 = evaluate(model, val, 64, "cpu")
    r0 = evaluate(model, train_split, 64, "cpu")
    model.set_normalization(mean=float(model.target_mean) + 0.7)  # a constant energy error
    m1 = evaluate(model, val, 64, "cpu")
    assert m1["energy_bias"] == pytest.approx(m0["energy_bias"] + 0.7, abs=1e-5)
    shift = refit_energy_offset(model, train_split, 64, "cpu")
    assert shift == pytest.approx(-0.7 - r0["energy_bias"], abs=1e-5)
    r2, m2 = evaluate(model, train_split, 64, "cpu"), evaluate(model, val, 64, "cpu")
    assert abs(r2["energy_bias"]) < 1e-5
    assert r2["energy_rmse"] ** 2 == pytest.approx(r0["energy_rmse"] ** 2 - r0["energy_bias"] ** 2, rel=1e-4)
    assert m2["energy_bias"] == pytest.approx(m0["energy_bias"] - r0["energy_bias"], abs=1e-5)
    assert m2["forces_mae"] == m0["forces_mae"] and m2["forces_rmse"] == m0["forces_rmse"]


def test_energy_offset_script(xtb_data_root, tiny_pretrained, tmp_path):
    """experiments/xtb_aspirin/energy_offset.py on a model whose energies carry a known constant
    error: the refit takes that constant out (the MAE after it is the unshifted model's after its
    own refit), forces are unchanged, and both results files are written."""
    import json
    import sys
    sys.path.insert(0, str(ROOT / "experiments" / "xtb_aspirin"))
    import energy_offset
    from mdsim.models.checkpoint import save_checkpoint

    _, ckpt = tiny_pretrained
    (tmp_path / "ck").mkdir()
    model, _ = load_model(ckpt)
    save_checkpoint(tmp_path / "ck" / "qm_1k.pt", model)
    model.set_normalization(mean=float(model.target_mean) - 0.4)
    save_checkpoint(tmp_path / "ck" / "stable_1k.pt", model)
    rc = energy_offset.main(["--data", str(xtb_data_root), "--checkpoints", str(tmp_path / "ck"),
                             "--dest", str(tmp_path), "--molecule", "ethanol", "--max-frames", "50"])
    assert rc == 0
    res = json.loads((tmp_path / "results" / "energy_offset.json").read_text())["models"]
    qm, shifted = res["QM(1k)"], res["StABlE(1k), paper settings"]
    assert shifted["before"]["energy_bias"] == pytest.approx(qm["before"]["energy_bias"] - 0.4, abs=1e-5)
    assert shifted["shift"] == pytest.approx(qm["shift"] + 0.4, abs=1e-5)
    assert shifted["after"]["energy_mae"] == pytest.approx(qm["after"]["energy_mae"], abs=1e-5)
    assert shifted["after"]["forces_mae"] == shifted["before"]["forces_mae"] == pytest.approx(qm["before"]["forces_mae"])
    assert "| StABlE(1k), paper settings |" in (tmp_path / "results" / "energy_offset.md").read_text()
    assert energy_offset.main(["--data", str(tmp_path / "nothing"), "--dest", str(tmp_path)]) == 2
