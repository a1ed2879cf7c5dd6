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
    if len(results) >= 2:
        fig = comparison_figure(results, cfg, setup.run_folder(cfg) / "inference" / "comparison.png")
        if fig is not None:
            log(f"comparison figure (survival curves, RDF against the reference): {fig}")
    return results


def survival_summary(folder) -> dict:
    """Stability times of one evaluation folder with their censoring (replicas never found
    unstable) and the Kaplan–Meier estimate."""
    from pathlib import Path

    import numpy as np

    from mdsim import stats
    folder = Path(folder)
    times = np.load(folder / "replicas_stable_time.npy").astype(np.float64)
    censored = np.load(folder / "replicas_stable.npy").astype(bool)
    return {"times": times, "events": ~censored, "km": stats.kaplan_meier(times, ~censored)}


def comparison_figure(results: dict, cfg: StableConfig, path):
    """One figure comparing the evaluated models: Kaplan–Meier survival curves of the replicas
    (log-rank p of the first two models in the title) and their mean RDF over the stable parts
    against the reference.  Returns the path, or None without matplotlib/the files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        from mdsim import observables as obs
        from mdsim import stats
        surv = {em: survival_summary(r["folder"]) for em, r in results.items()}
    except (ImportError, OSError):  # no matplotlib, or folders without the survival files
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    horizon = max(float(np.max(s["times"])) for s in surv.values())
    for k, (em, s) in enumerate(surv.items()):
        km = s["km"]
        x = np.concatenate([[0.0], km.times, [horizon]])
        y = np.concatenate([[1.0], km.survival, [km.survival[-1] if km.survival.size else 1.0]])
        a1.step(x, y, where="post", color=f"C{k}", label=f"{em} (n={km.n}, {int((~s['events']).sum())} stable)")
    names = list(surv)
    lr = stats.logrank_test(surv[names[0]]["times"], surv[names[0]]["events"],
                            surv[names[1]]["times"], surv[names[1]]["events"])
    a1.set(xlabel="time (ps)", ylabel="fraction of replicas stable", ylim=(0, 1.02),
           title=f"Kaplan–Meier, log-rank p = {lr.pvalue:.2g} ({names[0]} vs {names[1]})")
    a1.legend(fontsize=8)
    edges = obs.histogram_rdf_edges(cfg.max_rdf_dist, cfg.dr).numpy()
    r = 0.5 * (edges[1:] + edges[:-1])
    from pathlib import Path
    first = Path(results[names[0]]["folder"])
    if (first / "gt_rdf.npy").is_file():
        a2.plot(r, np.load(first / "gt_rdf.npy"), "k-", lw=2, label="reference")
    for k, em in enumerate(names):
        f = Path(results[em]["folder"]) / "final_rdfs.npy"
        if f.is_file():
            g = np.load(f)
            if np.isfinite(g).any():
                with np.errstate(invalid="ignore"):
                    a2.plot(r, np.nanmean(g, 0), f"C{k}--", lw=1.3,
                            label=f"{em} (RDF MAE {results[em].get('Mean RDF MAE', float('nan')):.3g})")
    a2.set(xlabel="r (Å)", ylabel="RDF", title="RDF over the stable parts")
    a2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
    try:  # survival: replicas never found unstable, and the log-rank test of the first two
        from mdsim import stats
        surv = {n: survival_summary(results[n]["folder"]) for n in names}
        row = "stable to the end".ljust(20)
        for n in names:
            row += f"{int((~surv[n]['events']).sum())}/{surv[n]['times'].size}".rjust(w)
        lines.append(row)
        if len(names) >= 2:
            a, b = surv[names[0]], surv[names[1]]
            p = stats.logrank_test(a["times"], a["events"], b["times"], b["events"]).pvalue
            lines.append(f"log-rank test {names[0]} vs {names[1]}: p = {p:.3g}")
            if a["events"].any() or b["events"].any():
                hr = stats.hazard_ratio(a["times"], a["events"], b["times"], b["events"])
                lines.append(f"hazard ratio {names[1]} / {names[0]}: {hr.estimate:.3g} "
                             f"[{hr.lower:.3g}, {hr.upper:.3g}] (< 1: {names[1]} goes unstable less often)")
    except (OSError, KeyError):
        pass
    lines.append("")
    for n in names:
        lines.append(f"{n}: plots and metrics in {results[n]['folder']}{os.sep}")
    log("\n".join(lines))
