"""StABlE loop end to end on tiny offline data: checkpoints, gating of learning, exact resume,
evaluation outputs and bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED
import torch

from mdsim.config import StableConfig, load_config
from mdsim.training.evaluate import run_evaluation
from mdsim.training.setup import SetupError, run_folder
from mdsim.training.stable import train

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a: None)


def stable_cfg(data_root, model_dir, log_dir, extra=()):
    return load_config(StableConfig, ROOT / "configs/stable_training/xtb/train.yml", [
        ("src", str(data_root)), ("molecule", "ethanol"), ("model_dir", str(model_dir)), ("log_dir", str(log_dir)),
        "n_replicas=4", "steps=40", "n_dump=10", "vacf_window=10", "n_epochs=3", "minibatch_size=20",
        "progress=false", "lr=0.001"] + list(extra))


def params(path):
    return torch.load(path, weights_only=False)["state_dict"]


def test_forced_instability_learns_and_outputs(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, pre = tiny_pretrained
    cfg = stable_cfg(xtb_data_root, model_dir, tmp_path, ["bond_dev_tol=0.0001"])
    folder = train(cfg, **QUIET)
    names = {p.name for p in folder.glob("*.pt")}
    # epoch 1 triggers learning; epochs 2 and 3 learn
    assert {"cycle1_epoch1.pt", "cycle1_epoch2.pt", "ckpt.pt", "resume.pt"} <= names
    assert list((folder / "logs").glob("events.out.tfevents.*"))
    before, after = params(pre), params(folder / "ckpt.pt")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(folder / "logs"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"Fraction of Unstable Replicas", "Loss", "Gradient Norm", "Force MAE", "Observable Loss"} <= tags
    assert [e.value for e in ea.Scalars("Fraction of Unstable Replicas")] == [1.0, 1.0, 1.0]

    # evaluation of pre and post: finite metrics consistent with the .npy files
    for em in ("pre", "post"):
        ecfg = stable_cfg(xtb_data_root, model_dir, tmp_path, ["train=false", f"eval_model={em}",
                                                               "integrator=Langevin", "n_epochs=2",
                                                               "bond_dev_tol=0.5"])
        out = run_evaluation(ecfg, **QUIET)
        m = json.loads((out / "final_metrics.json").read_text())
        stab = np.load(out / "replicas_stable_time.npy")
        assert m["Mean Stability (ps)"] == pytest.approx(stab.mean())
        assert m["Std Dev Stability (ps)"] == pytest.approx(stab.std())
        assert 0 < m["Mean Stability (ps)"] <= 2 * 40 * 0.5 / 1000 + 1e-12
        rm = np.load(out / "final_rdf_maes.npy")
        assert m["Mean RDF MAE"] == pytest.approx(np.nanmean(rm))
        for k in ("Energy MAE (eV)", "Force MAE (eV/A)", "Mean RDF MAE", "Mean ADF MAE"):
            assert m[k] is not None and np.isfinite(m[k])
        assert (out / "rdf.png").stat().st_size > 1000 and (out / "stability_hist.png").exists()
        traj = np.load(out / "full_traj.npy")
        assert traj.shape[0] == 4 and traj.shape[2:] == (9, 3)


def test_stable_run_does_not_learn(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, pre = tiny_pretrained
    folder = train(stable_cfg(xtb_data_root, model_dir, tmp_path, ["bond_dev_tol=100"]), **QUIET)
    assert not list(folder.glob("cycle*_epoch*.pt"))
    before, after = params(pre), params(folder / "ckpt.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_matches_uninterrupted(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, _ = tiny_pretrained
    extra = ["bond_dev_tol=0.0001", "reset_probability=0.5"]
    a = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "a", extra + ["n_epochs=4"]), **QUIET)
    first = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "b", extra + ["n_epochs=2"]), **QUIET)
    # the stopped run copied under another exp_name continues as that run
    cont = stable_cfg(xtb_data_root, model_dir, tmp_path / "b", extra + ["n_epochs=4", "exp_name=longer"])
    shutil.copytree(first, run_folder(cont))
    b = train(cont, **QUIET)
    assert b == run_folder(cont) != first
    with pytest.raises(SetupError, match=r"other settings \(\['reset_probability'\]\)"):
        train(stable_cfg(xtb_data_root, model_dir, tmp_path / "b", extra + ["n_epochs=4", "exp_name=longer",
                                                                            "reset_probability=0.25"]), **QUIET)
    pa, pb = params(a / "ckpt.pt"), params(b / "ckpt.pt")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=0)
    ra = torch.load(a / "resume.pt", weights_only=False)
    rb = torch.load(b / "resume.pt", weights_only=False)
    torch.testing.assert_close(ra["state"]["positions"], rb["state"]["positions"], rtol=0, atol=0)


def test_bad_input(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, _ = tiny_pretrained
    cmd = [sys.executable, str(ROOT / "stable_training.py"), "--config-yml",
           str(ROOT / "configs/stable_training/xtb/simulate.yml"), "--set", f"src={xtb_data_root}",
           "--molecule", "ethanol", "--set", f"model_dir={model_dir}", "--set", f"log_dir={tmp_path}"]
    out = subprocess.run(cmd + ["--eval_model", "latest"], capture_output=True, text=True)
    assert out.returncode == 2 and "eval_model: 'latest'" in out.stderr
    out = subprocess.run(cmd + ["--eval_model=post_cycle3"], capture_output=True, text=True)
    assert out.returncode == 2 and "post_cycle3" in out.stderr and "not found" in out.stderr
    assert not (tmp_path / "stable_training_results").exists() or not any((tmp_path / "stable_training_results").rglob("*.json"))
    with pytest.raises(SetupError, match="pretrained checkpoint not found"):
        train(stable_cfg(xtb_data_root, tmp_path / "nowhere", tmp_path), **QUIET)
    with pytest.raises(SetupError, match="molecule_index"):
        train(stable_cfg(xtb_data_root, model_dir, tmp_path, ["stability_criterion=imd"]), **QUIET)
    assert not run_folder(stable_cfg(xtb_data_root, model_dir, tmp_path)).exists()


def test_original_pretrained_checkpoint_is_accepted(xtb_data_root, tmp_path):
    """The original's pretrained SchNet checkpoint (config['model'] is a plain string) passes the
    compatibility check and is refused for another model."""
    from mdsim.training.setup import check_compatible
    ck = SHARED / "reference/original_stable_checkpoints/schnet_aspirin_1k_pretrained/best_checkpoint.pt"
    if not ck.is_file():
        pytest.skip("../shared absent")
    from mdsim.data.format import load_split, split_dir
    from mdsim.models import load_model
    _, ckpt = load_model(ck)
    train_split = load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "train"))
    cfg = stable_cfg(xtb_data_root, tmp_path, tmp_path)
    check_compatible(cfg, train_split, ckpt, ck)
    with pytest.raises(SetupError, match="holds a 'schnet' model"):
        check_compatible(stable_cfg(xtb_data_root, tmp_path, tmp_path, ["model=nequip"]), train_split, ckpt, ck)


def test_eval_model_flag_on_training_config_evaluates(xtb_data_root, tiny_pretrained, tmp_path):
    """`--config-yml train.yml --eval_model X` evaluates X (train: false implied) instead of
    refusing the existing resume.pt or training again."""
    model_dir, _ = tiny_pretrained
    folder = train(stable_cfg(xtb_data_root, model_dir, tmp_path, ["n_epochs=1"]), **QUIET)
    before = (folder / "resume.pt").read_bytes()
    sets = [f"src={xtb_data_root}", "molecule=ethanol", f"model_dir={model_dir}", f"log_dir={tmp_path}",
            "n_replicas=4", "steps=40", "n_dump=10", "vacf_window=10", "n_epochs=1", "minibatch_size=20",
            "progress=false", "lr=0.001"]
    cmd = [sys.executable, str(ROOT / "stable_training.py"), "--config-yml",
           str(ROOT / "configs/stable_training/xtb/train.yml")]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd + ["--eval_model", "post"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    metrics = folder / "inference" / "post" / "final_metrics.json"
    assert f"metrics: {metrics}" in out.stdout
    m = json.loads(metrics.read_text())
    assert m["eval_model"] == "post" and m["checkpoint"] == str(folder / "ckpt.pt")
    assert (folder / "resume.pt").read_bytes() == before  # no training happened


def test_evaluation_resumes_and_extends(xtb_data_root, tiny_pretrained, tmp_path):
    """An evaluation stopped after 2 epochs and rerun with n_epochs=4 gives exactly the result
    of an uninterrupted 4-epoch run (stochastic Langevin: the noise generator is restored); other
    settings, other parameters or a shorter horizon are refused."""
    model_dir, _ = tiny_pretrained

    def ecfg(log_dir, extra=()):
        return stable_cfg(xtb_data_root, model_dir, log_dir, ["train=false", "eval_model=pre", "integrator=Langevin",
                                                              "bond_dev_tol=0.5"] + list(extra))
    a = run_evaluation(ecfg(tmp_path / "a", ["n_epochs=4"]), **QUIET)
    b = run_evaluation(ecfg(tmp_path / "b", ["n_epochs=2"]), **QUIET)
    part = json.loads((b / "final_metrics.json").read_text())
    assert part["epochs"] == 2 and (b / "eval_resume.pt").exists()
    b = run_evaluation(ecfg(tmp_path / "b", ["n_epochs=4"]), **QUIET)
    ma, mb = (json.loads((x / "final_metrics.json").read_text()) for x in (a, b))
    assert ma["epochs"] == mb["epochs"] == 4
    assert {k: v for k, v in ma.items()} == {k: v for k, v in mb.items()}
    for f in ("full_traj.npy", "replicas_stable_time.npy", "final_rdfs.npy", "final_adfs.npy", "final_vacfs.npy"):
        np.testing.assert_array_equal(np.load(a / f), np.load(b / f), err_msg=f)
    # the trajectory really moved on after the resume (not a copy of the first two epochs)
    traj = np.load(b / "full_traj.npy")
    assert traj.shape[1] == 4 * 40 // 10 and not np.allclose(traj[:, -1], traj[:, 7])

    # a slimmed copy (no trajectory; what the study keeps in git) resumes to the same metrics;
    # full_traj.npy has NaN for the frames before the resume
    from mdsim.training.evaluate import slim_progress
    c = run_evaluation(ecfg(tmp_path / "c", ["n_epochs=2"]), **QUIET)
    slim_progress(c / "eval_resume.pt", c / "eval_resume.pt")
    assert torch.load(c / "eval_resume.pt", weights_only=False)["traj"] is None
    c = run_evaluation(ecfg(tmp_path / "c", ["n_epochs=4"]), **QUIET)
    assert json.loads((c / "final_metrics.json").read_text()) == ma
    for f in ("replicas_stable_time.npy", "final_rdfs.npy", "final_adfs.npy", "final_vacfs.npy"):
        np.testing.assert_array_equal(np.load(a / f), np.load(c / f), err_msg=f)
    tc = np.load(c / "full_traj.npy")
    assert tc.shape == traj.shape and np.isnan(tc[:, :8]).all()
    np.testing.assert_array_equal(tc[:, 8:], traj[:, 8:])

    with pytest.raises(SetupError, match="other settings"):
        run_evaluation(ecfg(tmp_path / "b", ["n_epochs=4", "temperature=350"]), **QUIET)
    with pytest.raises(SetupError, match="shorter than the 4 epochs"):
        run_evaluation(ecfg(tmp_path / "b", ["n_epochs=3"]), **QUIET)
    d = torch.load(b / "eval_resume.pt", weights_only=False)
    k = next(iter(d["model"]))
    d["model"][k] = d["model"][k] + 1
    torch.save(d, b / "eval_resume.pt")
    with pytest.raises(SetupError, match="other model parameters"):
        run_evaluation(ecfg(tmp_path / "b", ["n_epochs=5"]), **QUIET)


def test_parking_unstable_replicas_leaves_the_metrics_unchanged(xtb_data_root, tiny_pretrained, tmp_path):
    """park_unstable restarts flagged replicas from their start frames after each epoch: the
    replicas still stable are simulated exactly as without it (same noise, independent
    replicas), so stability times and observables are identical; only the unstable replicas'
    frames after their epoch of instability differ."""
    model_dir, _ = tiny_pretrained
    outs = {}
    for park in ("true", "false"):
        cfg = stable_cfg(xtb_data_root, model_dir, tmp_path / park,
                         ["train=false", "eval_model=pre", "integrator=Langevin", "n_epochs=4", "temperature=500",
                          "n_replicas=6", "bond_dev_tol=0.5", "max_frac_unstable_threshold=1.0",
                          f"park_unstable={park}"])
        outs[park] = run_evaluation(cfg, **QUIET)
    a, b = outs["true"], outs["false"]
    t = np.load(a / "replicas_stable_time.npy")
    flagged = ~np.load(a / "replicas_stable.npy")
    assert 0 < flagged.sum() < t.size, "the test needs some replicas unstable before the last epoch"
    assert t[flagged].min() < 3 * 40 * 0.5 / 1000, "a replica must go unstable before the last epoch"
    np.testing.assert_array_equal(t, np.load(b / "replicas_stable_time.npy"))
    for f in ("final_rdfs.npy", "final_adfs.npy", "final_vacfs.npy"):
        np.testing.assert_array_equal(np.load(a / f), np.load(b / f), err_msg=f)
    ta, tb = np.load(a / "full_traj.npy"), np.load(b / "full_traj.npy")
    np.testing.assert_array_equal(ta[~flagged], tb[~flagged])
    assert not np.array_equal(ta[flagged], tb[flagged])


def test_shrinking_the_batch_to_the_stable_replicas(xtb_data_root, tiny_pretrained, tmp_path):
    """park_unstable: once at most half of the replicas are stable only those are simulated (each
    keeps the noise it gets in the full batch). Stability times, observables and the stable
    replicas' trajectories equal those of simulating everything on; an evaluation interrupted
    after the batch shrank resumes with the same result."""
    model_dir, _ = tiny_pretrained
    base = ["train=false", "eval_model=pre", "integrator=Langevin", "temperature=500", "n_replicas=8",
            "bond_dev_tol=0.6", "max_frac_unstable_threshold=1.0"]
    outs, logs = {}, {}
    for name, extra in (("park", ["park_unstable=true", "n_epochs=6"]),
                        ("all", ["park_unstable=false", "n_epochs=6"]),
                        ("resumed", ["park_unstable=true", "n_epochs=5"])):
        logs[name] = []
        cfg = stable_cfg(xtb_data_root, model_dir, tmp_path / name, base + extra)
        outs[name] = run_evaluation(cfg, log=logs[name].append)
    n_first = len(logs["resumed"])
    cfg = stable_cfg(xtb_data_root, model_dir, tmp_path / "resumed", base + ["park_unstable=true", "n_epochs=6"])
    outs["resumed"] = run_evaluation(cfg, log=logs["resumed"].append)
    # 8 replicas, tolerance 0.6 Å: 5 flagged by the end of epoch 4 (of 6), 3 stable to the end
    shrank = [m for m in logs["park"] if "simulating only those" in m]
    assert len(shrank) == 1 and shrank[0].startswith("epoch 4: 3 of the 8"), logs["park"]
    assert [m for m in logs["resumed"][:n_first] if "simulating only those" in m] == shrank
    assert not [m for m in logs["resumed"][n_first:] if "simulating only those" in m]  # restored, not redone
    a, b, c = outs["park"], outs["all"], outs["resumed"]
    stable = np.load(a / "replicas_stable.npy")
    assert stable.any() and not stable.all(), "the test needs replicas stable to the end and unstable ones"
    for f in ("replicas_stable_time.npy", "replicas_stable.npy", "final_rdfs.npy", "final_adfs.npy",
              "final_vacfs.npy", "full_traj.npy"):  # the resumed run: bit-exact
        np.testing.assert_array_equal(np.load(a / f), np.load(c / f), err_msg=f"resumed {f}")
    for f in ("replicas_stable_time.npy", "replicas_stable.npy"):
        np.testing.assert_array_equal(np.load(a / f), np.load(b / f), err_msg=f)
    # the smaller batch changes the last bits of the forces (float32 here), which MD amplifies:
    # ~1e-6 Å after two epochs; the wrong replica's noise would move atoms by ~1e-3 Å per step
    ta, tb = np.load(a / "full_traj.npy"), np.load(b / "full_traj.npy")
    shrunk_at = 4 * 40 // 10  # frames before the batch shrank
    np.testing.assert_array_equal(ta[stable, :shrunk_at], tb[stable, :shrunk_at])
    assert np.abs(ta[stable] - tb[stable]).max() < 1e-4
    assert np.isnan(ta[~stable][:, shrunk_at:]).all()  # not simulated after the batch shrank
    for f in ("final_rdfs.npy", "final_adfs.npy", "final_vacfs.npy"):
        np.testing.assert_allclose(np.load(a / f), np.load(b / f), rtol=1e-3, atol=1e-6, err_msg=f)
