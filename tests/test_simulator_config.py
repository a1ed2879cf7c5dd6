"""simulator.py driven by a simulate config: the config supplies checkpoint, frames and MD settings."""
import json
from pathlib import Path

import pytest

import simulator

ROOT = Path(__file__).resolve().parents[1]


def test_simulate_config_drives_the_cli(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, ckpt = tiny_pretrained
    base = ["--config-yml", str(ROOT / "configs/stable_training/xtb/simulate.yml"), "--set", f"src={xtb_data_root}",
            "--set", "molecule=ethanol", "--set", f"model_dir={model_dir}", "--set", f"log_dir={tmp_path}",
            "--no-progress", "--threads", "1"]
    out = tmp_path / "md"
    rc = simulator.main(base + ["--eval_model", "pre", "--set", "n_replicas=3", "--set", "steps=10",
                                "--set", "n_epochs=2", "--set", "n_dump=5", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "stability.json").read_text())
    assert Path(summary["checkpoint"]) == ckpt
    assert summary["replicas"] == 3 and summary["steps"] == 20 and summary["integrator"] == "Langevin"
    assert summary["init"].endswith("xtb/ethanol/1k/test/data.npz")
    # an explicit flag wins over the config
    rc = simulator.main(base + ["--eval_model", "pre", "--replicas", "2", "--steps", "5", "--out", str(out)])
    assert rc == 0 and json.loads((out / "stability.json").read_text())["replicas"] == 2
    # a checkpoint the config cannot find: one clear error
    with pytest.raises(SystemExit, match="post_cycle7"):
        simulator.main(base + ["--eval_model", "post_cycle7", "--out", str(out)])
