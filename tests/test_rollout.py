"""The one rollout loop: simulator.py and evaluation agree, backends, stability checks of
recorded energies, and the single step loop."""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import simulator
import stable_training

ROOT = Path(__file__).resolve().parents[1]
SIM_YML = str(ROOT / "configs/stable_training/xtb/simulate.yml")


def _base(xtb_data_root, model_dir, tmp_path):
    return ["--config-yml", SIM_YML, "--set", f"src={xtb_data_root}", "--set", "molecule=ethanol",
            "--set", f"model_dir={model_dir}", "--set", f"log_dir={tmp_path}"]


@pytest.mark.parametrize("offset", [0, 3])
def test_simulator_and_evaluation_give_the_same_stability_times(xtb_data_root, tiny_pretrained, tmp_path, offset):
    """Same config and seed: same initial frames and velocities, same noise order, same check
    cadence, same bond reference (train split) and same early stop → identical per-replica
    stability times.  A tight tolerance and a hot start make replicas fail at different steps."""
    model_dir, _ = tiny_pretrained
    sets = ["n_replicas=4", "steps=20", "n_epochs=3", "n_dump=5", "bond_dev_tol=0.2", "temperature=2000",
            "max_frac_unstable_threshold=0.99", "progress=false", f"init_frame_offset={offset}"]
    argv = _base(xtb_data_root, model_dir, tmp_path) + sum((["--set", s] for s in sets), [])
    assert stable_training.main(argv + ["--eval_model", "pre"]) == 0
    ev = np.load(next((tmp_path).rglob("inference/pre/replicas_stable_time.npy")))
    out = tmp_path / "md"
    assert simulator.main(argv + ["--eval_model", "pre", "--out", str(out), "--no-progress"]) == 0
    sim = json.loads((out / "stability.json").read_text())
    np.testing.assert_allclose(sim["stability_time_ps"], ev, rtol=1e-12)
    censored = np.load(next((tmp_path).rglob("inference/pre/replicas_stable.npy")))
    assert censored.dtype == bool and censored.tolist() == [bool(x) for x in sim["stable"]]
    times = sorted(set(np.round(ev, 6)))
    assert len(times) >= 3, ev  # some replicas failed, at different times


@pytest.mark.slow
def test_compile_backend_one_replica_does_not_fall_back(xtb_data_root, tiny_pretrained, tmp_path):
    """md_backend compile (inductor) at R = 1 on the CPU compiles (no eager fallback) and gives
    eager's stability result."""
    model_dir, _ = tiny_pretrained
    argv = _base(xtb_data_root, model_dir, tmp_path) + ["--eval_model", "pre", "--replicas", "1", "--steps", "10",
                                                         "--n-dump", "5", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert simulator.main(argv + ["--md-backend", "compile", "--out", str(tmp_path / "c")]) == 0
    assert simulator.main(argv + ["--md-backend", "eager", "--out", str(tmp_path / "e")]) == 0
    c, e = (json.loads((tmp_path / d / "stability.json").read_text()) for d in ("c", "e"))
    assert c["md_backend"] == "compile" and c["stable"] == e["stable"]
    np.testing.assert_allclose(c["worst_value"], e["worst_value"], atol=1e-4)
    # the evaluation path (md.rollout.simulate) alike
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert stable_training.main(_base(xtb_data_root, model_dir, tmp_path) + [
            "--eval_model", "pre", "--set", "n_replicas=1", "--set", "steps=10", "--set", "n_epochs=1",
            "--set", "n_dump=5", "--set", "md_backend=compile", "--set", "progress=false"]) == 0


def test_check_frames_flags_a_nan_energy_on_its_own_frame():
    from mdsim.md.forces import PotentialForceField
    from mdsim.md.potentials import HarmonicBonds
    from mdsim.md.runner import Simulator
    from mdsim.md.system import System

    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    bonds = torch.tensor([[0, 1], [1, 2]])
    sysm = System(atomic_numbers=torch.tensor([6, 6, 6]), masses=torch.full((3,), 12.0, dtype=torch.float64),
                  bonds=bonds, ref_bond_lengths=torch.ones(2, dtype=torch.float64), stability_tolerance=0.5)
    sim = Simulator(PotentialForceField(HarmonicBonds(bonds, torch.ones(2, dtype=torch.float64), k=5.0)), sysm,
                    integrator="VelocityVerlet", timestep_fs=0.5, temperature_K=100.0, n_dump=2, dtype=torch.float64,
                    seed=0)
    st = sim.initial_state(x[None].repeat(4, 1, 1), 2)
    res = sim.run(st, 8, record=True, record_every=2, record_fields=("positions", "energy"), progress=False,
                  write=False)
    assert res.stable.all()
    res.recorder.buffers["energy"][1, 1] = float("nan")  # step 4 of replica 1: positions still fine
    unstable, _ = sim.check_frames(res.recorder)
    assert unstable.tolist() == [[False, False], [False, True], [False, False], [False, False]]
    # given frames with energies alike
    unstable, _ = sim.check_frames(res.frames("positions"), energies=res.recorder.buffers["energy"])
    assert unstable[1, 1] and unstable.sum() == 1


def test_one_step_loop():
    """No step loop outside mdsim/md/rollout.py (eager) and mdsim/md/compiled.py (compiled
    blocks): every rollout goes through mdsim.md.rollout.rollout."""
    pat = re.compile(r"for [^\n]+ in (?:tqdm\()?range\([^\n]*\):\n(?:[^\n]*\n){0,3}?[^\n]*state = [^\n]*\.step\(")
    files = list((ROOT / "mdsim").rglob("*.py")) + list(ROOT.glob("*.py"))
    hits = [str(p.relative_to(ROOT)) for p in files if pat.search(p.read_text())
            and p.relative_to(ROOT).as_posix() not in ("mdsim/md/rollout.py", "mdsim/md/compiled.py")]
    assert not hits, hits
    assert not (ROOT / "mdsim/training/rollout.py").exists()
