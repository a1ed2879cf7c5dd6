"""The one-command pipeline (configs/quickstart/train.yml) at tiny scale: makes data and a
pretrained model when missing, trains, evaluates pre and post, prints the table; a second run
reuses everything."""
from pathlib import Path

import pytest

from mdsim.config import StableConfig, load_config
from mdsim.training.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_pipeline_end_to_end_and_reuse(tmp_path):
    pytest.importorskip("tblite")
    cfg = load_config(StableConfig, ROOT / "configs/quickstart/train.yml", [
        ("src", str(tmp_path / "data")), ("model_dir", str(tmp_path / "MODELPATH")), ("log_dir", str(tmp_path)),
        "n_replicas=3", "steps=20", "n_dump=10", "vacf_window=10", "n_epochs=2", "progress=false",
        "bond_dev_tol=0.0001",  # forces learning in the second epoch
        "pipeline.xtb_frames=300",
        ("pipeline.pretrain_overrides", ["model.hidden_channels=8", "model.num_filters=8",
                                         "model.num_interactions=1", "optim.max_epochs=1", "logger.name=none"]),
        ("pipeline.simulate_overrides", ["integrator=Langevin", "bond_dev_tol=0.5", "steps=20", "n_epochs=1",
                                         "n_dump=10"])])
    logs = []
    res = run_pipeline(cfg, log=logs.append)
    text = "\n".join(map(str, logs))
    assert "generating 300 frames" in text and "pretraining with" in text
    assert set(res) == {"pre", "post"}
    for em in ("pre", "post"):
        assert Path(res[em]["folder"], "final_metrics.json").is_file()
        assert res[em]["Mean Stability (ps)"] is not None
    assert "stability (ps)" in text and "plots and metrics in" in text
    assert "comparison figure" in text
    fig = Path(res["pre"]["folder"]).parent / "comparison.png"
    assert fig.is_file() and fig.stat().st_size > 10_000
    from mdsim.training.pipeline import survival_summary
    s = survival_summary(res["pre"]["folder"])
    assert s["km"].n == 3 and s["times"].shape == (3,)
    # a second run generates nothing, pretrains nothing and resumes the finished training
    logs2 = []
    run_pipeline(cfg, log=logs2.append)
    text2 = "\n".join(map(str, logs2))
    assert "generating" not in text2 and "pretraining with" not in text2 and "resuming" in text2


def test_empty_evaluate_list_trains_only(tmp_path, monkeypatch):
    """pipeline.evaluate: [] = train only (documented): no evaluation, no table, no crash."""
    from mdsim.training import evaluate, pipeline, stable
    calls = []
    monkeypatch.setattr(pipeline, "ensure_data", lambda cfg, log: calls.append("data"))
    monkeypatch.setattr(pipeline, "ensure_pretrained", lambda cfg, log: calls.append("pretrain"))
    monkeypatch.setattr(stable, "train", lambda cfg, log: calls.append("train"))
    monkeypatch.setattr(evaluate, "run_evaluation", lambda cfg, log: calls.append("evaluate"))
    cfg = load_config(StableConfig, ROOT / "configs/quickstart/train.yml", [("log_dir", str(tmp_path)),
                                                                           ("pipeline.evaluate", [])])
    logs = []
    assert run_pipeline(cfg, log=logs.append) == {}
    assert calls == ["data", "pretrain", "train"]
    assert "pipeline.evaluate is empty: trained only" in "\n".join(logs)


def test_evaluation_config_of_a_pipeline():
    from mdsim.training.pipeline import evaluation_config
    cfg = load_config(StableConfig, ROOT / "configs/quickstart/train.yml",
                      [("pipeline.simulate_overrides", ["integrator=Langevin", "n_epochs=7"])])
    e = evaluation_config(cfg, "post_cycle1")
    assert (e.train, e.eval_model, e.pipeline, e.integrator, e.n_epochs) == (False, "post_cycle1", None,
                                                                            "Langevin", 7)
    assert (e.lr, e.exp_name, e.timestep) == (cfg.lr, cfg.exp_name, cfg.timestep)  # same run folder


def test_print_table_survival_lines(tmp_path):
    """The comparison table counts censored replicas and gives the log-rank p and the hazard
    ratio of the second model against the first, as mdsim.stats computes them."""
    import numpy as np

    from mdsim import stats
    from mdsim.training.pipeline import print_table
    rng = np.random.default_rng(0)
    res = {}
    for name, scale in (("pre", 2.0), ("post", 8.0)):
        d = tmp_path / name
        d.mkdir()
        t = rng.exponential(scale, 40)
        stable = t > 10
        np.save(d / "replicas_stable_time.npy", np.minimum(t, 10))
        np.save(d / "replicas_stable.npy", stable)
        res[name] = {"folder": str(d), "Mean Stability (ps)": float(np.minimum(t, 10).mean())}
    lines = []
    print_table(res, log=lines.append)
    text = "\n".join(lines)
    a, b = (np.load(tmp_path / n / "replicas_stable_time.npy") for n in ("pre", "post"))
    ea, eb = (~np.load(tmp_path / n / "replicas_stable.npy") for n in ("pre", "post"))
    hr = stats.hazard_ratio(a, ea, b, eb)
    assert f"hazard ratio post / pre: {hr.estimate:.3g}" in text and hr.upper < 1
    assert f"p = {stats.logrank_test(a, ea, b, eb).pvalue:.3g}" in text
    assert f"{int((~eb).sum())}/40" in text
