"""The xTB-aspirin study's report (experiments/xtb_aspirin/report.py) and horizon rule
(horizon.py) on a tiny synthetic evaluation layout (fake npy/json, no simulation)."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mdsim import stats

pytest.importorskip("matplotlib")
STUDY = Path(__file__).resolve().parents[1] / "experiments" / "xtb_aspirin"


def _load(name):
    sys.path.insert(0, str(STUDY))
    try:
        spec = importlib.util.spec_from_file_location(f"study_{name}", STUDY / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(STUDY))


def fake_eval(root: Path, exp: str, times, n_stable: int, horizon_ps: int, rng):
    """An evaluation folder as stable_training.py writes it (only what report.py reads)."""
    d = root / "evals" / f"schnet_aspirin_{exp}_lr=0.001_efweight=10" / "inference" / "pre"
    d.mkdir(parents=True)
    t = np.asarray(times, dtype=np.float64)
    R = t.size
    simulated = horizon_ps if n_stable or (t >= horizon_ps).any() else float(np.ceil(t.max()))
    np.save(d / "replicas_stable_time.npy", t)
    cfg = {"n_epochs": horizon_ps, "steps": 2000, "timestep": 0.5, "max_rdf_dist": 10.0, "dr": 0.02,
           "angle_range": [0.0, 180.0], "temperature": 500.0}
    (d / "simulate_config.yml").write_text(yaml.safe_dump(cfg))
    m = {"Energy MAE (eV)": 0.05, "Force MAE (eV/A)": 0.1, "Simulated Time (ps)": simulated,
         "Fraction Stable": n_stable / R, "n_replicas": R, "Mean RDF MAE": 0.2, "Std Dev RDF MAE": 0.01,
         "Mean ADF MAE": 0.003, "Std Dev ADF MAE": 0.001, "Mean VACF MAE": None, "Std Dev VACF MAE": None}
    (d / "final_metrics.json").write_text(json.dumps(m))
    np.save(d / "gt_rdf.npy", rng.random(500))
    np.save(d / "gt_adf.npy", rng.random(180))
    np.save(d / "final_rdfs.npy", rng.random((R, 500)))
    np.save(d / "final_adfs.npy", rng.random((R, 180)))
    return d


def test_report_on_synthetic_layout(tmp_path):
    report = _load("report")
    rng = np.random.default_rng(0)
    out, dest = tmp_path / "out", tmp_path / "dest"
    H = 20
    # QM(1k): all unstable early, checked every 0.05 ps
    qm = np.round(rng.exponential(2.0, 32) / 0.05).clip(1, 399) * 0.05
    fake_eval(out, "qm_1k_500K", qm, 0, H, rng)
    # StABlE: 20 still stable at 20 ps, 2 flagged at the last check (also recorded as 20 ps), 10 earlier
    st = np.concatenate([np.full(22, float(H)), np.round(rng.uniform(2, 19, 10) / 0.05) * 0.05])
    fake_eval(out, "stable_1k_500K", st, 20, H, rng)
    # 700 K: only QM(1k), and only as the small copy run.sh keeps in results/evals
    d7 = fake_eval(tmp_path / "gone", "qm_1k_700K", qm / 2, 0, H, rng)
    copy = dest / "results" / "evals" / "qm_1k_700K"
    copy.mkdir(parents=True)
    for f in ("final_metrics.json", "replicas_stable_time.npy", "simulate_config.yml"):
        (copy / f).write_bytes((d7 / f).read_bytes())

    assert report.main(["--out", str(out), "--dest", str(dest)]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    rows = {r["model"]: r for r in res["temperatures"]["500"]["models"]}
    q, s = rows["qm_1k"], rows["stable_1k"]
    assert rows["qm_10k"]["status"] == "not run yet"
    assert "original QM(1k), DFT MD17 at 700 K" in res["not_run"]
    # no censoring: RMST is the mean of min(t, H), the median the lower sample median
    assert q["rmst_ps"] == pytest.approx(np.minimum(qm, H).mean(), abs=1e-6)
    assert q["km_median_ps"] == pytest.approx(np.sort(qm)[15], abs=1e-6)
    assert q["stable_to_horizon"] == 0 and q["events"] == 32
    # exponential fit: time at risk / events (no censoring: the plain mean)
    assert q["exponential_mean_ps"][0] == pytest.approx(np.minimum(qm, H).sum() / 32, rel=1e-4)
    assert len(q["hazard_rate_halves_per_ps"]) == 2
    # censoring: 20 of the 22 at the horizon are censored, 2 are events
    assert s["stable_to_horizon"] == 20 and s["events"] == 12 and sum(s["censored"]) == 20
    km = stats.kaplan_meier(st, stats.censored_at_horizon(st, H, 20))
    assert s["rmst_ps"] == pytest.approx(km.rmst(H).estimate, abs=1e-6)
    assert s["km_median_ps"] is None  # > half stable to the end: median not reached
    lo, hi = s["rmst_ratio_vs_qm_1k"][1:]
    assert lo < s["rmst_ps"] / q["rmst_ps"] < hi and lo > 1
    assert s["logrank_vs_qm_1k"]["p"] < 1e-6
    assert s["paired_sign_test_vs_qm_1k"]["b_longer"] > 25
    assert res["temperatures"]["700"]["models"][0]["folder"] == str(copy)
    md = (dest / "results" / "results.md").read_text()
    assert "not run yet" in md and "StABlE(1k)" in md and "not reached" in md and "Constant-hazard check" in md
    for f in ("km_500K.png", "km_700K.png", "stability_hist_500K.png", "observables_500K.png"):
        assert (dest / "figures" / f).stat().st_size > 1000, f


def test_report_training_curves_from_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    report = _load("report")
    logs = tmp_path / "out" / "stable_runs" / "schnet_aspirin_stable_1k_lr=0.001_efweight=10" / "logs"
    w = SummaryWriter(str(logs))
    for e in range(1, 6):
        w.add_scalar("Fraction of Unstable Replicas", 0.8 / e, e)
        w.add_scalar("Force MAE", 0.1 + 0.01 * e, e)
        w.add_scalar("Learning Rate", 0.0 if e < 3 else 1e-3, e)
    w.close()
    dest = tmp_path / "dest"
    assert report.main(["--out", str(tmp_path / "out"), "--dest", str(dest)]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    assert res["stable_training"]["epochs"] == 5 and res["stable_training"]["learning_epochs"] == 3
    assert res["stable_training"]["force_mae_first_last"] == pytest.approx([0.11, 0.15])
    assert (dest / "figures" / "stable_training.png").is_file()
    # the scalars were cached in results/, so the report still has them once out/ is gone
    import shutil
    shutil.rmtree(tmp_path / "out")
    assert report.main(["--out", str(tmp_path / "out"), "--dest", str(dest), "--no-figures"]) == 0
    assert json.loads((dest / "results" / "results.json").read_text())["stable_training"]["learning_epochs"] == 3


def test_horizon_rule(tmp_path):
    horizon = _load("horizon")
    rng = np.random.default_rng(1)
    d = fake_eval(tmp_path, "pilot_qm_1k_500K", [1.0, 2.0, 3.0, 4.0, 9.5, 12.0], 0, 20, rng)
    # KM median = 3 ps (smallest t with S <= 1/2): 3 x 3 = 9 -> the minimum 20 wins; factor 10 -> 30
    assert horizon.horizon(d, 20, 3, 100) == 20
    assert horizon.horizon(d, 20, 10, 100) == 30
    assert horizon.horizon(d, 20, 10, 25) == 25
    assert horizon.horizon(d, 0.4, 0.5, 5, epoch_ps=0.2) == pytest.approx(1.6)  # 1.5 ps -> 8 epochs of 0.2
    # median not reached within the pilot (4 of 6 stable at 20 ps): the pilot length stands in
    d2 = fake_eval(tmp_path / "b", "pilot_qm_1k_700K", [1.0, 2.0, 20, 20, 20, 20], 4, 20, rng)
    assert horizon.horizon(d2, 20, 3, 100) == 60
    # run.sh then extends that pilot to ceil(100 / 3) = 34 ps; a pilot whose median is reached,
    # or that already ran that long, needs nothing more
    assert horizon.pilot_length(d2, 34) == 34
    assert horizon.pilot_length(d, 34) == 12  # median reached; it stopped at 12 ps (all unstable)
    d3 = fake_eval(tmp_path / "c", "pilot_qm_1k_500K", [1.0, 2.0, 34, 34, 34, 34], 4, 34, rng)
    assert horizon.pilot_length(d3, 34) == 34 and horizon.horizon(d3, 20, 3, 100) == 100


def test_pretrain_summary_and_baseline_table_and_timings_outlive_out(tmp_path, capsys):
    """pretrain_summary.py takes the last JSON block of a resumed stage log (earlier, killed runs
    printed none or other blocks) and the test errors; report.py lists the baselines with the
    rule that stopped them, and keeps stage wall times in results/ once out/ is gone."""
    summary = _load("pretrain_summary")
    log = tmp_path / "qm_1k.log"
    log.write_text("resuming from x at epoch 36\n{\n \"epochs\": 3, \"stopped\": \"wall_time\"\n}\n"
                   "resuming from x at epoch 348\nwarning: something { odd\n"
                   "{\n  \"run_dir\": \"r\",\n  \"epochs\": 612,\n  \"stopped\": \"min_lr\",\n"
                   "  \"best_val\": {\n    \"forces_mae\": 0.0701\n  }\n}\n")
    test = tmp_path / "test.json"
    test.write_text('{\n  "energy_mae": 0.029,\n  "forces_mae": 0.0684\n}\n')
    npz = tmp_path / "data.npz"
    np.savez(npz, E=np.zeros((7, 1)), F=np.zeros((7, 3, 3)))
    capsys.readouterr()
    assert summary.main(["--log", str(log), "--test-json", str(test), "--test-data", str(npz)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == {"epochs": 612, "stopped": "min_lr", "best_val": {"forces_mae": 0.0701},
                   "test": {"energy_mae": 0.029, "forces_mae": 0.0684}, "test_frames": 7}
    # --checkpoint: the training's own wall time, summed by the trainer over resumed runs
    import torch
    ck = tmp_path / "checkpoint.pt"
    torch.save({"trainer_state": {"epoch": 612, "elapsed": 17999.94}}, ck)
    assert summary.main(["--log", str(log), "--test-json", str(test), "--checkpoint", str(ck)]) == 0
    got10 = json.loads(capsys.readouterr().out)
    assert got10["train_wall_s"] == 17999.9 and got10["epochs"] == 612
    torch.save({"state_dict": {}}, ck)  # an exported model: no trainer state
    assert summary.main(["--log", str(log), "--test-json", str(test), "--checkpoint", str(ck)]) == 2
    unfinished = tmp_path / "unfinished.log"
    unfinished.write_text("resuming from x at epoch 348\n")
    assert summary.main(["--log", str(unfinished), "--test-json", str(test)]) == 2

    report = _load("report")
    dest, out = tmp_path / "dest", tmp_path / "out"
    (dest / "results").mkdir(parents=True)
    (dest / "results" / "pretrain_qm_1k.json").write_text(json.dumps(got))
    (dest / "results" / "pretrain_qm_10k.json").write_text(json.dumps(got10))
    out.mkdir()
    (out / "timings.tsv").write_text("study (full) started x\nqm_1k\t4321\t2026-12-02T04:40:00\n")
    assert report.main(["--out", str(out), "--dest", str(dest), "--no-figures"]) == 0
    md = (dest / "results" / "results.md").read_text()
    # wall time: QM(1k)'s summary has none, so the stage's recorded time (4321 s); QM(10k)'s its own
    assert "| QM(1k) | 612 | lr ≤ early_stopping_lr (the original's rule) | 0.0701 | 7 | 0.029 | 0.0684 | 1.2 |" in md
    assert "| QM(10k) | 612 | lr ≤ early_stopping_lr (the original's rule) | 0.0701 | — | 0.029 | 0.0684 | 5 |" in md
    import shutil
    shutil.rmtree(out)
    out.mkdir()
    (out / "timings.tsv").write_text("stable_1k\t99\t2026-12-03T01:00:00\n")
    assert report.main(["--out", str(out), "--dest", str(dest), "--no-figures"]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    assert res["timings_s"] == {"qm_1k": 4321, "stable_1k": 99}
    # a stage finished in two pieces counts both; a rerun of the report counts each piece once
    (out / "timings.tsv").write_text("stable_1k\t99\t2026-12-03T01:00:00\nstable_1k\t50\t2026-12-03T05:00:00\n")
    for _ in range(2):
        assert report.main(["--out", str(out), "--dest", str(dest), "--no-figures"]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    assert res["timings_s"] == {"qm_1k": 4321, "stable_1k": 149}


def test_training_wall_time_skips_interruptions():
    report = _load("report")
    wall = [0.0, 40.0, 80.0, 125.0, 5000.0, 5042.0]  # an interruption between epochs 4 and 5
    sc = {"Fraction of Unstable Replicas": [[1, 2, 3, 4, 5, 6], [0.1] * 6], "_epoch_wall_time": wall,
          "Learning Rate": [[1, 2, 3, 4, 5, 6], [0, 0, 1e-3, 1e-3, 0, 0]]}
    t = report.training_summary(sc)
    assert t["epoch_wall_s_mean"] == pytest.approx((40 + 40 + 45 + 42) / 4)
    assert t["wall_s_estimate"] == pytest.approx(6 * (40 + 40 + 45 + 42) / 4) and t["learning_epochs"] == 2


def test_report_ablations_against_both_baselines(tmp_path):
    """Ablation arms (run.sh eval_abl_<arm>_700K) are compared with QM(1k) and with the paper-settings
    arm on their own seeds; the parameter move is the L2 distance of the checkpoints."""
    import torch
    report = _load("report")
    rng = np.random.default_rng(1)
    out, dest, ck = tmp_path / "out", tmp_path / "dest", tmp_path / "ck"
    H = 20
    qm = np.round(rng.exponential(2.0, 32) / 0.05).clip(1, 399) * 0.05
    fake_eval(out, "abl_qm_1k_700K", qm, 0, H, rng)
    fake_eval(out, "abl_stable_1k_cycle1_700K", qm * 1.1, 0, H, rng)
    # the variant only as the small copy in results/ablations (its out/ folder gone)
    long = np.concatenate([np.full(16, float(H)), qm[:16] * 3])
    d = fake_eval(tmp_path / "gone", "abl_lr1e-2_700K", long, 16, H, rng)
    copy = dest / "results" / "ablations" / "abl_lr1e-2_700K"
    copy.mkdir(parents=True)
    for f in ("final_metrics.json", "replicas_stable_time.npy", "simulate_config.yml"):
        (copy / f).write_bytes((d / f).read_bytes())
    (dest / "results" / "ablations" / "abl_lr1e-2_training.txt").write_text(
        "variant lr1e-2: lr=0.01 (n_epochs 60); evaluated: end_of_cycle1.pt\n")
    # a variant evaluated at the end of its last cycle (run.sh @eval=last_cycle)
    fake_eval(out, "abl_epochs300_700K", qm * 1.2, 0, H, rng)
    (dest / "results" / "ablations" / "abl_epochs300_training.txt").write_text(
        "variant epochs300: n_epochs=300 @eval=last_cycle (n_epochs 60 unless set); evaluated: end_of_cycle3.pt\n")
    (ck / "ablations").mkdir(parents=True)
    from mdsim.models import build_model, save_checkpoint
    torch.manual_seed(0)
    model = build_model("schnet", hidden_channels=8, num_filters=8, num_interactions=2, num_gaussians=6, cutoff=3.0)
    model.set_normalization(mean=-50.0, std=2.0)
    save_checkpoint(ck / "qm_1k.pt", model)
    params = list(model.parameters())  # each tensor once, although SchNet shares its filter network
    n_par = sum(t.numel() for t in params)
    norm = float(torch.sqrt(sum((t.detach().double() ** 2).sum() for t in params)))
    with torch.no_grad():
        for t in params:
            t.add_(0.5)
    model.set_normalization(mean=-900.0, std=7.0)  # buffers: not part of the move
    save_checkpoint(ck / "ablations" / "lr1e-2.pt", model)

    assert report.main(["--out", str(out), "--dest", str(dest), "--checkpoints", str(ck)]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    arms = {r["model"]: r for r in res["ablations"]["700"]["arms"]}
    # the two references first, then the variants in run.sh's order (lr1e-2 ran before epochs300)
    assert list(arms) == ["abl_qm_1k", "abl_stable_1k_cycle1", "abl_lr1e-2", "abl_epochs300"]
    assert arms["abl_lr1e-2"]["label"] == "StABlE(1k), lr 1e-2, end of cycle 1"
    assert arms["abl_epochs300"]["label"] == "StABlE(1k), paper settings, 300 epochs, end of cycle 3"
    assert "param_move_from_qm_1k" not in arms["abl_epochs300"]  # no checkpoint
    v, paper, q = arms["abl_lr1e-2"], arms["abl_stable_1k_cycle1"], arms["abl_qm_1k"]
    assert "rmst_ratio_vs_qm_1k" not in q and "rmst_ratio_vs_paper" not in paper
    assert v["rmst_ratio_vs_qm_1k"][0] == pytest.approx(v["rmst_ps"] / q["rmst_ps"], rel=1e-4)
    assert v["rmst_ratio_vs_paper"][0] == pytest.approx(v["rmst_ps"] / paper["rmst_ps"], rel=1e-4)
    assert v["logrank_vs_paper"]["p"] < 1e-3 and v["paired_sign_test_vs_qm_1k"]["b_longer"] >= 16
    # every trainable parameter moved by 0.5, counted once; the normalisation buffers ignored
    move = 0.5 * n_par ** 0.5
    assert v["param_move_from_qm_1k"] == pytest.approx([move, move / norm], rel=1e-6)
    assert v["training"][0].startswith("variant lr1e-2")
    md = (dest / "results" / "results.md").read_text()
    assert "## Ablations" in md and "variant lr1e-2" in md
    assert (dest / "figures" / "km_ablations_700K.png").stat().st_size > 1000
    assert (dest / "figures" / "move_vs_hazard.png").stat().st_size > 1000  # lr1e-2: a move and a hazard ratio


def test_report_compares_the_original_stable_model_with_its_own_start(tmp_path):
    """The original's StABlE checkpoint is compared with the original's QM checkpoint (its own
    starting point) as well as with QM(1k); hazard ratios agree with mdsim.stats on the same data."""
    report = _load("report")
    rng = np.random.default_rng(3)
    out, dest = tmp_path / "out", tmp_path / "dest"
    H = 20
    qm = np.round(rng.exponential(4.0, 32) / 0.05).clip(1, 399) * 0.05
    oq = np.round(rng.exponential(8.0, 32) / 0.05).clip(1, 399) * 0.05
    os_ = np.concatenate([np.full(24, float(H)), np.round(rng.uniform(1, 19, 8) / 0.05) * 0.05])
    fake_eval(out, "qm_1k_500K", qm, 0, H, rng)
    fake_eval(out, "original_qm_1k_500K", oq, int((oq >= H).sum()), H, rng)
    fake_eval(out, "original_stable_1k_500K", os_, 24, H, rng)
    assert report.main(["--out", str(out), "--dest", str(dest)]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    rows = {r["model"]: r for r in res["temperatures"]["500"]["models"]}
    s = rows["original_stable_1k"]
    e_os = stats.censored_at_horizon(os_, H, 24)
    e_oq = stats.censored_at_horizon(oq, H, int((oq >= H).sum()))
    hr = stats.hazard_ratio(oq, e_oq, os_, e_os)
    assert s["hazard_ratio_vs_own_start"] == pytest.approx([hr.estimate, hr.lower, hr.upper], rel=1e-4)
    assert s["hazard_ratio_vs_own_start"][2] < 1  # clearly lower hazard than its start
    hq = stats.hazard_ratio(qm, None, os_, e_os)
    assert s["hazard_ratio_vs_qm_1k"][0] == pytest.approx(hq.estimate, rel=1e-4)
    assert len(s["hazard_ratio_halves_vs_own_start"]) == 2
    assert "own_start" not in str(rows["original_qm_1k"].keys())  # the QM model has no own start
    md = (dest / "results" / "results.md").read_text()
    assert "against its own starting point, original QM(1k)" in md and "Proportional-hazards check" in md


def test_failure_modes_first_bond_beyond_tolerance(tmp_path):
    """failure_modes.py finds, per unstable replica, the first saved frame with a bond beyond the
    tolerance and that bond's type; censored replicas are skipped; the frame agrees with the
    recorded stability time."""
    from mdsim.data.format import SplitData, save_split, split_dir
    fm = _load("failure_modes")
    rng = np.random.default_rng(0)
    # C–O–H plus one C–H: bonds C0–O1 (1.43 Å), O1–H2 (0.96 Å), C0–H3 (1.09 Å)
    base = np.array([[0.0, 0, 0], [1.43, 0, 0], [1.75, 0.9, 0], [-0.4, 1.0, 0.1]])
    R = base + 0.01 * rng.standard_normal((20, 4, 3))
    src = tmp_path / "data"
    save_split(split_dir(src, "toy", "mol", "1k", "train"),
               SplitData(R=R, z=[6, 8, 1, 1], E=np.zeros(20), F=np.zeros((20, 4, 3)), fid=np.arange(20)))
    d = tmp_path / "out" / "evals" / "schnet_mol_x_700K_lr=0.001_efweight=10" / "inference" / "pre"
    d.mkdir(parents=True)
    F = 40
    traj = np.repeat(base[None, None], 3, axis=0).repeat(F, axis=1).copy()  # (R=3, F, N, 3)
    traj[0, 10:, 2] += [1.0, 0.0, 0.0]   # replica 0: O–H stretched by ~0.65 Å from frame 10
    traj[1, 25:, 1] += [0.7, 0.0, 0.0]   # replica 1: C–O (and O–H less) from frame 25
    np.save(d / "full_traj.npy", traj.astype(np.float32))
    dt = 0.5 * 100 / 1000
    np.save(d / "replicas_stable_time.npy", np.array([10 * dt, 25 * dt, F * dt]))
    np.save(d / "replicas_stable.npy", np.array([False, False, True]))
    (d / "simulate_config.yml").write_text(yaml.safe_dump({
        "src": str(src), "name": "toy", "molecule": "mol", "size": "1k", "exp_name": "x_700K",
        "bond_dev_tol": 0.5, "timestep": 0.5, "n_dump": 100}))
    assert fm.main(["--out", str(tmp_path / "out"), "--dest", str(tmp_path / "dest")]) == 0
    r = json.loads((tmp_path / "dest" / "results" / "failure_modes.json").read_text())["x_700K"]
    assert r["failed"] == 2 and r["by_type"] == {"O–H": 1, "C–O": 1}
    assert r["first_frame_agrees_with_stability_time"] == 2
    assert set(r["top_bonds"]) == {"O–H 1-2", "C–O 0-1"}
    # entries outlive out/: a second run without trajectories keeps them
    import shutil
    shutil.rmtree(tmp_path / "out" / "evals")
    (tmp_path / "out" / "evals").mkdir()
    assert fm.main(["--out", str(tmp_path / "out"), "--dest", str(tmp_path / "dest")]) == 0
    assert "x_700K" in (tmp_path / "dest" / "results" / "failure_modes.md").read_text()


def test_sync_validation_replaces_only_marked_blocks():
    sv = _load("sync_validation")
    results = ("# title\n\n## 500 K (horizon 92 ps)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nnote A\n\n"
               "## 700 K (horizon 23 ps)\n\n| a |\n|---|\n| 3 |\n\nnote B\n\n"
               "## Ablations (seed 3001)\n\nintro\n\n### 700 K (horizon 23 ps)\n\n| x |\n|---|\n| 9 |\n\n- detail\n")
    val = ("# V\n\nkept 1\n\n<!-- begin results.md: 500 K -->\nstale\n<!-- end results.md: 500 K -->\n\nkept 2\n"
           "<!-- begin results.md: Ablations / 700 K (tables) -->\n<!-- end results.md: Ablations / 700 K (tables) -->\n"
           "kept 3\n")
    new = sv.sync(val, results)
    assert new == ("# V\n\nkept 1\n\n<!-- begin results.md: 500 K -->\n| a | b |\n|---|---|\n| 1 | 2 |\n\nnote A\n"
                   "<!-- end results.md: 500 K -->\n\nkept 2\n"
                   "<!-- begin results.md: Ablations / 700 K (tables) -->\n| x |\n|---|\n| 9 |\n"
                   "<!-- end results.md: Ablations / 700 K (tables) -->\nkept 3\n")
    assert sv.sync(new, results) == new  # idempotent
    with pytest.raises(ValueError, match="0 sections match '900 K'"):
        sv.sync("<!-- begin results.md: 900 K -->\n<!-- end results.md: 900 K -->\n", results)
    with pytest.raises(ValueError, match="no '<!-- end results.md: 500 K -->'"):
        sv.sync("<!-- begin results.md: 500 K -->\nx\n", results)
    with pytest.raises(ValueError, match="no '<!-- begin results.md"):
        sv.sync("no markers\n", results)


def test_validation_md_tables_match_the_committed_results():
    """VALIDATION.md's generated blocks equal experiments/xtb_aspirin/results/results.md's."""
    sv = _load("sync_validation")
    root = STUDY.parents[1]
    text = (root / "VALIDATION.md").read_text()
    assert sv.sync(text, (STUDY / "results" / "results.md").read_text()) == text, \
        "VALIDATION.md is out of date: run python experiments/xtb_aspirin/sync_validation.py"


def test_every_stage_save_progress_saves_is_restored_by_run_sh():
    """A stage whose state save_progress.sh commits must be copied back into out/ by run.sh on a
    fresh machine; otherwise it silently starts over (as QM(10k) once did)."""
    import re
    saved = set(re.findall(r"^save (\w+) ", (STUDY / "save_progress.sh").read_text(), re.M))
    assert {"qm_1k", "qm_10k"} <= saved
    run = (STUDY / "run.sh").read_text()
    restored = set(re.findall(r'^\s*restore "?(\w+)"? ', run, re.M))
    assert saved <= restored, f"saved but never restored: {sorted(saved - restored)}"


def test_report_compares_our_stable_models_with_qm_10k(tmp_path):
    """StABlE(1k) is also compared with QM(10k), the baseline with 10x the data (and QM(10k) with
    QM(1k) in the table); the log-rank p agrees with mdsim.stats on the same data."""
    report = _load("report")
    rng = np.random.default_rng(5)
    out, dest = tmp_path / "out", tmp_path / "dest"
    H = 20
    qm = np.round(rng.exponential(3.0, 32) / 0.05).clip(1, 399) * 0.05
    q10 = np.round(rng.exponential(6.0, 32) / 0.05).clip(1, 399) * 0.05
    st = np.concatenate([np.full(20, float(H)), np.round(rng.uniform(1, 19, 12) / 0.05) * 0.05])
    fake_eval(out, "qm_1k_500K", qm, 0, H, rng)
    fake_eval(out, "qm_10k_500K", q10, int((q10 >= H).sum()), H, rng)
    fake_eval(out, "stable_1k_500K", st, 20, H, rng)
    assert report.main(["--out", str(out), "--dest", str(dest), "--no-figures"]) == 0
    res = json.loads((dest / "results" / "results.json").read_text())
    rows = {r["model"]: r for r in res["temperatures"]["500"]["models"]}
    s = rows["stable_1k"]
    lr = stats.logrank_test(q10, stats.censored_at_horizon(q10, H, int((q10 >= H).sum())),
                            st, stats.censored_at_horizon(st, H, 20))
    assert s["logrank_vs_qm_10k"]["p"] == pytest.approx(lr.pvalue, rel=1e-6)
    assert s["rmst_ratio_vs_qm_10k"][0] == pytest.approx(s["rmst_ps"] / rows["qm_10k"]["rmst_ps"], rel=1e-4)
    assert "rmst_ratio_vs_qm_10k" not in rows["qm_10k"] and "rmst_ratio_vs_qm_1k" in rows["qm_10k"]
    md = (dest / "results" / "results.md").read_text()
    assert "Against QM(10k) (QM on 10× the data): StABlE(1k): RMST ratio" in md


def test_bond_scan_stretches_only_the_moved_fragment(xtb_data_root, tiny_pretrained, tmp_path):
    """bond_scan.stretched sets the bond length and moves the fragment rigidly; the script's xTB
    curve has its minimum near the frame's own bond length (a C–C bond of ethanol, atoms 0–1 in
    the xTB ethanol data, moving atom 1 and the atoms nearer to it than to atom 0)."""
    import json
    import shutil
    sys.path.insert(0, str(STUDY))
    import bond_scan
    from mdsim.data.format import load_split, split_dir

    test = load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "test"))
    R = np.asarray(test.R[0], dtype=float)
    d0 = np.linalg.norm(R[:, None] - R[None], axis=-1)
    move = [k for k in range(len(R)) if k != 0 and d0[1, k] < d0[0, k]]
    S = bond_scan.stretched(R, 0, 1, move, 2.0)
    assert np.linalg.norm(S[1] - S[0]) == pytest.approx(2.0)
    d1 = np.linalg.norm(S[:, None] - S[None], axis=-1)
    fixed = [k for k in range(len(R)) if k not in move]
    np.testing.assert_allclose(d1[np.ix_(move, move)], d0[np.ix_(move, move)], atol=1e-12)
    np.testing.assert_allclose(d1[np.ix_(fixed, fixed)], d0[np.ix_(fixed, fixed)], atol=1e-12)
    _, ckpt = tiny_pretrained
    (tmp_path / "ck").mkdir()
    shutil.copy(ckpt, tmp_path / "ck" / "qm_1k.pt")
    rc = bond_scan.main(["--data", str(xtb_data_root), "--molecule", "ethanol", "--checkpoints",
                         str(tmp_path / "ck"), "--dest", str(tmp_path), "--bond", "0", "1",
                         "--move", *map(str, move), "--lengths", "1.2", "2.0", "17"])
    assert rc == 0
    res = json.loads((tmp_path / "results" / "bond_scan_0-1.json").read_text())
    ref = np.array(res["energy_rel_eV"]["GFN2-xTB (reference)"])
    assert abs(res["lengths"][int(ref.argmin())] - res["length_at_frame"]) < 0.15
    assert "QM(1k)" in res["energy_rel_eV"] and (tmp_path / "figures" / "bond_scan_0-1.png").is_file()
    bad = [["--move", "0", "1"], ["--frame", "100000"], ["--move", "1", "99"], ["--lengths", "2.0", "1.2", "5"]]
    for args in bad:
        dest = tmp_path / "bad"
        assert bond_scan.main(["--data", str(xtb_data_root), "--molecule", "ethanol", "--bond", "0", "1",
                               "--dest", str(dest), *(["--move", "1"] if "--move" not in args else []), *args]) == 2
        assert not dest.exists()  # nothing written


def test_prefailure_errors_on_a_made_up_trajectory(xtb_data_root, tiny_pretrained, tmp_path):
    """Two replicas of ethanol test frames; replica 1's C–C bond is stretched from saved frame 6 on.
    The script finds it, takes frame 6 − lag (lag 0.1 ps = 2 frames at 50 fs), and its QM(1k)
    force MAE there equals the checkpoint's error against tblite computed directly."""
    import json
    import shutil
    sys.path.insert(0, str(STUDY))
    import prefailure_errors
    from ase import Atoms
    from tblite.ase import TBLite

    from mdsim.calculator import StableCalculator
    from mdsim.data.format import load_split, split_dir

    test = load_split(split_dir(xtb_data_root, "xtb", "ethanol", "1k", "test"))
    traj = np.stack([np.asarray(test.R[:10], dtype=float)] * 2)  # (2 replicas, 10 frames, N, 3)
    traj[1, 6:, 1] += 3.0 * (traj[1, 6:, 1] - traj[1, 6:, 0]) / np.linalg.norm(
        traj[1, 6:, 1] - traj[1, 6:, 0], axis=-1, keepdims=True)
    d = tmp_path / "pre"
    d.mkdir()
    np.save(d / "full_traj.npy", traj)
    np.save(d / "replicas_stable.npy", np.array([True, False]))
    (d / "simulate_config.yml").write_text(yaml.safe_dump(
        {"src": str(xtb_data_root), "name": "xtb", "molecule": "ethanol", "size": "1k",
         "bond_dev_tol": 0.5, "timestep": 0.5, "n_dump": 100}))
    _, ckpt = tiny_pretrained
    (tmp_path / "ck").mkdir()
    shutil.copy(ckpt, tmp_path / "ck" / "qm_1k.pt")
    rc = prefailure_errors.main(["--eval", str(d), "--name", "t", "--checkpoints", str(tmp_path / "ck"),
                                 "--dest", str(tmp_path), "--lags-ps", "0.1"])
    assert rc == 0
    row = json.loads((tmp_path / "results" / "prefailure_t.json").read_text())["mae"]["0.1 ps"]
    a = Atoms(numbers=test.z, positions=traj[1, 4])
    a.calc = TBLite(method="GFN2-xTB", verbosity=0)
    ref = a.get_forces()
    a.calc = StableCalculator(checkpoint=str(ckpt))
    assert row["frames"] == 1
    assert row["QM(1k)"] == pytest.approx(float(np.abs(a.get_forces() - ref).mean()), rel=1e-5)
    assert prefailure_errors.main(["--eval", str(tmp_path), "--name", "x"]) == 2
    assert prefailure_errors.main(["--eval", str(d), "--name", "x", "--dest", str(tmp_path / "bad"),
                                   "--lags-ps", "0"]) == 2
    assert not (tmp_path / "bad").exists()
