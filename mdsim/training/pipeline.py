"""One-command pipeline (``configs/quickstart/train.yml``): data → pretraining → StABlE →
evaluation of the models in ``pipeline.evaluate`` (default pre and post; ``[]`` = train only),
reusing whatever already exists."""
from __future__ import annotations

import json
import os

from mdsim.config import PretrainConfig, StableConfig, apply_overrides, build, load_config, to_dict

from . import setup


def ensure_data(cfg: StableConfig, log=print) -> None:
    try:
        setup.split(cfg, "train")
        setup.split(cfg, "test")
        return
    except Exception:
        pass
    p = cfg.pipeline
    if cfg.name != "xtb" or not p.xtb_frames:
        raise setup.SetupError(f"data for {cfg.name}/{cfg.molecule}/{cfg.size} missing under {cfg.src}; "
                               "run download_stable_paper_data.py first")
    from mdsim.data import download
    log(f"generating {p.xtb_frames} frames of GFN2-xTB {cfg.molecule} MD at {p.xtb_temperature:g} K "
        f"into {cfg.src} (one-off)")
    rc = download.main(["--dataset", "xtb", "--molecule", cfg.molecule, "--frames", str(p.xtb_frames),
                        "--temperature", str(p.xtb_temperature), "--data-dir", cfg.src, "--sizes", cfg.size])
    if rc:
        raise setup.SetupError("data generation failed")


def ensure_pretrained(cfg: StableConfig, log=print) -> None:
    try:
        setup.pretrained_checkpoint(cfg)
        return
    except setup.SetupError:
        pass
    p = cfg.pipeline
    overrides = [("dataset.src", cfg.src), ("dataset.name", cfg.name), ("dataset.molecule", cfg.molecule),
                 ("dataset.size", cfg.size), ("run_dir", cfg.model_dir), ("progress", cfg.progress)]
    pcfg = load_config(PretrainConfig, p.pretrain_config, overrides + list(p.pretrain_overrides))
    if pcfg.model.name != cfg.model:
        raise setup.SetupError(f"pipeline.pretrain_config trains '{pcfg.model.name}' but model: {cfg.model}")
    from .pretrain import train as pretrain
    log(f"no pretrained checkpoint: pretraining with {p.pretrain_config}")
    res = pretrain(pcfg, log=log)
    log(f"pretrained in {res.epochs} epochs ({res.stopped}); best val {res.best_val}")


def evaluation_config(cfg: StableConfig, eval_model: str) -> StableConfig:
    """The evaluation run of ``eval_model`` for a training config: ``train: false``, no pipeline,
    ``pipeline.simulate_overrides`` (if any) applied on top."""
    data = to_dict(cfg)
    data.update({"train": False, "eval_model": eval_model, "pipeline": None})
    if cfg.pipeline is not None:
        data = apply_overrides(data, cfg.pipeline.simulate_overrides)
    return build(StableConfig, data)


def run_pipeline(cfg: StableConfig, log=print) -> dict:
    """Data, pretraining, training, then the evaluations of ``pipeline.evaluate`` (returns
    their metrics by eval_model; empty when the list is empty: train only)."""
    from .evaluate import run_evaluation
    from .stable import train

    ensure_data(cfg, log)
    ensure_pretrained(cfg, log)
    train(cfg, log=log)
    results = {}
    for em in cfg.pipeline.evaluate:
        out = run_evaluation(evaluation_config(cfg, em), log=log)
        results[em] = json.loads((out / "final_metrics.json").read_text())
        results[em]["folder"] = str(out)
    print_table(results, log)
    return results


def print_table(results: dict, log=print) -> None:
    keys = [("Mean Stability (ps)", "stability (ps)"), ("Std Dev Stability (ps)", "± std"),
            ("Force MAE (eV/A)", "force MAE (eV/Å)"), ("Energy MAE (eV)", "energy MAE (eV)"),
            ("Mean RDF MAE", "RDF MAE"), ("Mean ADF MAE", "ADF MAE"), ("Mean VACF MAE", "VACF MAE")]
    if not results:
        log("pipeline.evaluate is empty: trained only, nothing evaluated")
        return
    names = list(results)
    w = max(16, *(len(n) + 2 for n in names))
    lines = ["", "metric".ljust(20) + "".join(n.rjust(w) for n in names)]
    for k, label in keys:
        row = label.ljust(20)
        for n in names:
            v = results[n].get(k)
            row += (f"{v:.4g}" if isinstance(v, (int, float)) else "n/a").rjust(w)
        lines.append(row)
    lines.append("")
    for n in names:
        lines.append(f"{n}: plots and metrics in {results[n]['folder']}{os.sep}")
    log("\n".join(lines))
