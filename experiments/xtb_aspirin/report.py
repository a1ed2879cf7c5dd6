"""Tables and figures of the xTB-aspirin stability study (run by run.sh after every stage).

Reads what the evaluations wrote (``final_metrics.json``, ``replicas_stable_time.npy``,
``simulate_config.yml``, ``final_*.npy``, ``gt_*.npy``) under ``<out>/evals/`` — or, for a model
whose ``out/`` folder is gone, the small copies run.sh keeps in ``<dest>/results/evals/`` — plus
the StABlE run's TensorBoard scalars, and writes

* ``<dest>/results/results.json`` and ``results.md``: per model and temperature the number of
  replicas, the horizon, how many stayed stable to it, the Kaplan–Meier median stability time
  with a Brookmeyer–Crowley 95 % CI, the restricted mean survival time (RMST) to the horizon with
  a Greenwood-based 95 % CI, the RMST ratio to QM(1k) (delta method), the log-rank p-value and a
  paired sign test vs QM(1k), test energy/force MAE and RDF/ADF/VACF MAE over stable frames;
* ``<dest>/figures/``: Kaplan–Meier curves per temperature, stability-time histograms,
  RDF/ADF/VACF vs the xTB reference, StABlE training curves.

Works on partial results: models without an evaluation are listed as "not run yet".

    python experiments/xtb_aspirin/report.py [--out experiments/xtb_aspirin/out] [--dest experiments/xtb_aspirin]

Censoring: the evaluation records a replica's stability time at the resolution of its checks
(every n_dump steps) and gives replicas still stable at the end the simulated time, the same
value as a replica flagged at the very last check.  ``replicas_stable.npy`` (written by the
evaluation) flags the replicas never found unstable (censored); for older folders without it,
``final_metrics.json``'s "Fraction Stable" gives how many are still stable, which is all the
survival statistics need (see ``mdsim.stats.censored_at_horizon``).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdsim import stats  # noqa: E402

# (key = the evaluation's exp_name prefix in run.sh, label)
MODELS = [
    ("qm_1k", "QM(1k)"),
    ("stable_1k", "StABlE(1k)"),
    ("stable_1k_abl_lr1e-2", "StABlE(1k), lr 1e-2 (chosen by the ablations)"),
    ("qm_10k", "QM(10k)"),
    ("original_qm_1k", "original QM(1k), DFT MD17"),
    ("original_stable_1k", "original StABlE(1k), DFT MD17"),
]
BASELINE = "qm_1k"
# Each StABlE model against the QM model it was trained from (its own starting point): the
# paper's claim is about this pair. Ours start from QM(1k) (already the table's baseline); the
# original's StABlE checkpoint starts from the original's QM checkpoint.
OWN_START = {"original_stable_1k": "original_qm_1k"}
# Our StABlE models also against the QM baseline trained on 10x the data (the paper's "more data"
# comparison: does StABlE on 1k frames buy what 10k frames of QM data buy?)
MORE_DATA, MORE_DATA_KEYS = "qm_10k", ("stable_1k", "stable_1k_abl_lr1e-2")
TEMPERATURES = (500, 700)
COLORS = {"qm_1k": "C3", "stable_1k": "C2", "stable_1k_abl_lr1e-2": "C5", "qm_10k": "C0", "original_qm_1k": "C1", "original_stable_1k": "C4"}
STYLES = {"qm_1k": "-", "stable_1k": "--", "stable_1k_abl_lr1e-2": (0, (3, 1)), "qm_10k": "-.", "original_qm_1k": ":", "original_stable_1k": (0, (6, 2, 1, 2))}
SMALL_FILES = ("final_metrics.json", "replicas_stable_time.npy", "replicas_stable.npy", "simulate_config.yml",
               "final_rdf_maes.npy", "final_adf_maes.npy", "final_vacf_maes.npy")


def eval_dir(out: Path, dest: Path, model: str, temp: int):
    """The evaluation folder of ``model`` at ``temp`` K: ``<out>/evals/schnet_aspirin_<model>_<T>K_*/
    inference/pre`` if finished there, else the copy ``<dest>/results/evals/<model>_<T>K``."""
    hits = sorted(glob.glob(str(out / "evals" / f"schnet_aspirin_{model}_{temp}K_*" / "inference" / "pre")))
    hits = [Path(h) for h in hits if (Path(h) / "final_metrics.json").is_file()]
    if hits:
        return hits[0]
    copy = dest / "results" / "evals" / f"{model}_{temp}K"
    return copy if (copy / "final_metrics.json").is_file() else None


def load_eval(d: Path) -> dict:
    """Stability times with their event flags, the horizon and the metrics of one evaluation."""
    import yaml
    m = json.loads((d / "final_metrics.json").read_text())
    cfg = yaml.safe_load((d / "simulate_config.yml").read_text())
    t = np.asarray(np.load(d / "replicas_stable_time.npy"), dtype=np.float64)
    n = int(m["n_replicas"])
    if t.size != n:
        raise ValueError(f"{d}: {t.size} stability times but n_replicas {n}")
    horizon = cfg["n_epochs"] * cfg["steps"] * cfg["timestep"] / 1000.0
    simulated = float(m["Simulated Time (ps)"])
    flags = d / "replicas_stable.npy"
    if flags.is_file():
        censored = np.asarray(np.load(flags), dtype=bool)
        events, n_stable = ~censored, int(censored.sum())
    else:
        n_stable = int(round(float(m["Fraction Stable"]) * n))
        events = stats.censored_at_horizon(t, simulated, n_stable)
    r = {"dir": d, "metrics": m, "config": cfg, "times": t, "events": events, "horizon": horizon,
         "simulated": simulated, "n": n, "n_stable": n_stable}
    for k in ("final_rdfs", "final_adfs", "final_vacfs", "gt_rdf", "gt_adf", "gt_vacf",
              "final_rdf_maes", "final_adf_maes", "final_vacf_maes"):
        p = d / f"{k}.npy"
        r[k] = np.load(p) if p.is_file() else None
    return r


def survival_summary(r: dict, horizon: float) -> dict:
    km = stats.kaplan_meier(r["times"], r["events"])
    med, lo, hi = km.median()
    rm = km.rmst(horizon)
    return {"km": km, "median": med, "median_ci": [lo, hi], "rmst": rm}


def paired_sign_test(a: dict, b: dict):
    """Replicas i of two evaluations share start frame, velocities and noise: count pairs where
    b lasted longer / shorter (ties, e.g. both stable to the end, dropped); two-sided binomial."""
    if a["n"] != b["n"] or not math.isclose(a["horizon"], b["horizon"]):
        return None
    from scipy.stats import binomtest
    longer = int((b["times"] > a["times"] + 1e-9).sum())
    shorter = int((b["times"] < a["times"] - 1e-9).sum())
    p = float(binomtest(longer, longer + shorter).pvalue) if longer + shorter else None
    return {"b_longer": longer, "b_shorter": shorter, "p": p}


def _num(x, p=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(float(x), p) if isinstance(x, float) else x


def summary_row(key, label, r, horizon, against=()) -> dict:
    """One model's survival statistics to ``horizon`` and, for each ``(base, base_s, vs)`` in
    ``against`` (a baseline run, its summary, a name), the RMST ratio, log-rank and paired sign
    test against it (keys ``*_vs_<vs>``; none against itself)."""
    s = survival_summary(r, horizon)
    m = r["metrics"]
    row = {"model": key, "label": label, "status": "done", "folder": str(r["dir"]),
           "n_replicas": r["n"], "horizon_ps": r["horizon"], "simulated_ps": r["simulated"],
           "stable_to_horizon": r["n_stable"], "events": int(r["events"].sum()),
           "km_median_ps": s["median"], "km_median_ci_ps": s["median_ci"],
           "rmst_horizon_ps": horizon, "rmst_ps": s["rmst"].estimate, "rmst_se_ps": s["rmst"].stderr,
           "rmst_ci_ps": [s["rmst"].lower, s["rmst"].upper],
           "energy_mae_eV": m.get("Energy MAE (eV)"), "force_mae_eV_A": m.get("Force MAE (eV/A)"),
           "rdf_mae": [m.get("Mean RDF MAE"), m.get("Std Dev RDF MAE")],
           "adf_mae": [m.get("Mean ADF MAE"), m.get("Std Dev ADF MAE")],
           "vacf_mae": [m.get("Mean VACF MAE"), m.get("Std Dev VACF MAE")],
           "stability_times_ps": [round(float(x), 4) for x in r["times"]],
           "censored": [bool(not e) for e in r["events"]]}
    rates = []  # constant-hazard check: events per ps at risk over each half of the horizon
    for lo, hi in ((0.0, horizon / 2), (horizon / 2, horizon)):
        try:
            x = stats.exponential_rate(r["times"], r["events"], lo, hi)
            rates.append([x.estimate, x.lower, x.upper])
        except ValueError:
            rates.append(None)
    row["hazard_rate_halves_per_ps"] = rates
    whole = stats.exponential_rate(r["times"], r["events"], 0.0, horizon)
    row["exponential_mean_ps"] = ([1 / whole.estimate, 1 / whole.upper,
                                   1 / whole.lower if whole.lower > 0 else None] if whole.events else None)
    for base, base_s, vs in against:
        if base is not None and base is not r:
            row.update(comparison(r, s, base, base_s, vs))
    return row


def comparison(r, s, base, base_s, vs) -> dict:
    """RMST ratio (delta method), log-rank test and paired sign test of run ``r`` against ``base``."""
    out = {}
    try:
        out[f"rmst_ratio_vs_{vs}"] = list(stats.rmst_ratio(s["rmst"], base_s["rmst"]))
    except ValueError:
        out[f"rmst_ratio_vs_{vs}"] = None
    lr = stats.logrank_test(base["times"], base["events"], r["times"], r["events"])
    out[f"logrank_vs_{vs}"] = {"chi2": lr.statistic, "p": lr.pvalue, "observed": lr.observed,
                               "expected": lr.expected}
    out[f"paired_sign_test_vs_{vs}"] = paired_sign_test(base, r)
    try:
        hr = stats.hazard_ratio(base["times"], base["events"], r["times"], r["events"])
        out[f"hazard_ratio_vs_{vs}"] = [hr.estimate, hr.lower, hr.upper]
    except ValueError:  # no events in either run
        out[f"hazard_ratio_vs_{vs}"] = None
    halves = []  # proportional-hazards check: the ratio over each half of the common horizon
    h = min(base["horizon"], r["horizon"])
    for lo, hi in ((0.0, h / 2), (h / 2, h)):
        try:
            w = stats.hazard_ratio_window(base["times"], base["events"], r["times"], r["events"], lo, hi)
            halves.append([w.estimate, w.lower, w.upper])
        except ValueError:
            halves.append(None)
    out[f"hazard_ratio_halves_vs_{vs}"] = halves
    return out


def analyse(out: Path, dest: Path) -> dict:
    res = {"temperatures": {}, "not_run": []}
    runs = {}
    for temp in TEMPERATURES:
        for key, label in MODELS:
            d = eval_dir(out, dest, key, temp)
            if d is None:
                res["not_run"].append(f"{label} at {temp} K")
                continue
            runs[(key, temp)] = load_eval(d)
    for temp, here in by_temperature(runs):
        horizons = sorted({r["horizon"] for r in here.values()})
        horizon = horizons[0]  # RMST to a common horizon (the shortest, if they differ)
        base = here.get(BASELINE)
        base_s = survival_summary(base, horizon) if base else None
        rows = []
        for key, label in MODELS:
            if key not in here:
                rows.append({"model": key, "label": label, "status": "not run yet"})
                continue
            against = [(base, base_s, "qm_1k")]
            start = here.get(OWN_START.get(key))
            if start is not None:
                against.append((start, survival_summary(start, horizon), "own_start"))
            if key in MORE_DATA_KEYS and here.get(MORE_DATA) is not None:
                against.append((here[MORE_DATA], survival_summary(here[MORE_DATA], horizon), MORE_DATA))
            rows.append(summary_row(key, label, here[key], horizon, against))
        res["temperatures"][str(temp)] = {"horizon_ps": horizon, "horizons_differ": len(horizons) > 1,
                                          "models": rows}
    return res, runs


# ----------------------------------------------------------------------------- ablations
ABL_BASE, ABL_PAPER = "abl_qm_1k", "abl_stable_1k_cycle1"


def ablation_runs(out: Path, dest: Path) -> dict:
    """The ablation evaluations (run.sh: ``eval_abl_<arm>_<T>K``) by arm: {(arm, T): run}."""
    found = {}
    pats = [(str(out / "evals" / "schnet_aspirin_abl_*K_*" / "inference" / "pre"), True),
            (str(dest / "results" / "ablations" / "abl_*K"), False)]
    for pat, in_out in pats:
        for h in sorted(glob.glob(pat)):
            d = Path(h)
            if not (d / "final_metrics.json").is_file():
                continue
            name = d.parents[1].name.split("_lr=")[0][len("schnet_aspirin_"):] if in_out else d.name
            arm, _, t = name.rpartition("_")
            if t.endswith("K") and t[:-1].isdigit():
                found.setdefault((arm, int(t[:-1])), d)
    return {k: load_eval(d) for k, d in found.items()}


def param_distance(a: Path, b: Path):
    """L2 norm of the difference of the trainable parameters of two checkpoints (buffers such as
    the energy normalisation excluded), and relative to ``b``'s parameter norm."""
    from mdsim.models.checkpoint import load_model
    pa = dict(load_model(a)[0].named_parameters())
    pb = dict(load_model(b)[0].named_parameters())
    if pa.keys() != pb.keys() or any(pa[k].shape != pb[k].shape for k in pb):
        raise ValueError(f"{a} and {b} hold different architectures")
    d = math.sqrt(sum(float((pa[k].detach().double() - pb[k].detach().double()).pow(2).sum()) for k in pb))
    n = math.sqrt(sum(float(pb[k].detach().double().pow(2).sum()) for k in pb))
    return d, d / n if n else None


def analyse_ablations(out: Path, dest: Path, ckpt: Path):
    """Survival statistics of every ablation arm against QM(1k) and StABlE(1k)'s end-of-cycle-1 model
    (the paper's settings) on the ablation seeds; the variants' training notes and parameter moves."""
    runs = ablation_runs(out, dest)
    res = {}
    for temp in sorted({t for _, t in runs}):
        here = {a: r for (a, t), r in runs.items() if t == temp}
        horizon = min(r["horizon"] for r in here.values())
        base, paper = here.get(ABL_BASE), here.get(ABL_PAPER)
        base_s = survival_summary(base, horizon) if base else None
        paper_s = survival_summary(paper, horizon) if paper else None
        arms = sorted(here, key=arm_order)
        rows = []
        for arm in arms:
            r = here[arm]
            against = [(base, base_s, "qm_1k")] + ([(paper, paper_s, "paper")] if arm != ABL_BASE else [])
            name = arm[len("abl_"):]
            note = dest / "results" / "ablations" / f"abl_{name}_training.txt"
            training = note.read_text().strip().splitlines() if note.is_file() else []
            m = re.search(r"evaluated: (\S+)", training[0]) if training else None
            row = summary_row(arm, ablation_label(arm, m.group(1) if m else "end_of_cycle1.pt"), r, horizon, against)
            if training:
                row["training"] = training
            ck = {ABL_BASE: None, ABL_PAPER: ckpt / "ablations" / "stable_1k_cycle1.pt"}.get(
                arm, ckpt / "ablations" / f"{name}.pt")
            if ck is not None and ck.is_file() and (ckpt / "qm_1k.pt").is_file():
                row["param_move_from_qm_1k"] = list(param_distance(ck, ckpt / "qm_1k.pt"))
            rows.append(row)
        res[str(temp)] = {"horizon_ps": horizon, "arms": rows}
    return res, runs


def param_moves(out: Path, dest: Path, ckpt: Path) -> dict:
    """How far each StABlE model moved from its own starting point: {model: [L2, L2 / |start|]},
    from the checkpoints where present (the original's are under out/original, which run.sh
    copies from --original), else from the copy saved in ``<dest>/results/param_moves.json``."""
    pairs = {"stable_1k": (ckpt / "stable_1k.pt", ckpt / "qm_1k.pt"),
             "stable_1k_abl_lr1e-2": (ckpt / "ablations" / "lr1e-2.pt", ckpt / "qm_1k.pt"),
             "original_stable_1k": (out / "original" / "original_stable_1k.pt", out / "original" / "original_qm_1k.pt")}
    cache = dest / "results" / "param_moves.json"
    moves = json.loads(cache.read_text()) if cache.is_file() else {}
    for key, (a, b) in pairs.items():
        if a.is_file() and b.is_file():
            moves[key] = [float(f"{x:.4g}") for x in param_distance(a, b)]
    if moves:
        cache.write_text(json.dumps(moves, indent=1) + "\n")
    return moves


#: run.sh's ABL_VARIANTS order (the order they ran), for the tables and legends
ABL_RUN_ORDER = ["lr1e-2", "epochs300", "obsbonds", "efonly", "rep64", "kT", "tol0.5", "epoch2ps",
                 "lr1e-2long", "rep128"]


def arm_order(arm):
    """Sort key: QM(1k), the paper-settings model, then the variants in run order, others by name."""
    name = arm[len("abl_"):]
    known = name in ABL_RUN_ORDER
    return (arm != ABL_BASE, arm != ABL_PAPER, not known, ABL_RUN_ORDER.index(name) if known else 0, arm)


#: what each run.sh ABL_VARIANTS variant changes, for the tables
VARIANT_LABELS = {"lr1e-2": "lr 1e-2", "epochs300": "paper settings, 300 epochs", "rep64": "64 replicas",
                  "kT": "1/kT in the estimator", "tol0.5": "training tolerance 0.5 Å",
                  "epoch2ps": "epochs of 2 ps", "lr1e-2long": "lr 1e-2, 200 epochs", "rep128": "128 replicas",
                  "obsbonds": "lr 1e-2, bond-length observable (control: ~energy-force fine-tuning only)",
                  "efonly": "lr 1e-2, energy-force term only, 24 learning epochs (matched control)"}


def ablation_label(arm: str, evaluated: str = "end_of_cycle1.pt") -> str:
    """Table label of an ablation arm; ``evaluated`` is the variant's evaluated model file
    (its training note's "evaluated: ..."): end_of_cycle<c>.pt or ckpt.pt (the last model)."""
    if arm in (ABL_BASE, ABL_PAPER):
        return {ABL_BASE: "QM(1k)", ABL_PAPER: "StABlE(1k), paper settings, end of cycle 1"}[arm]
    name = arm[len("abl_"):]
    m = re.fullmatch(r"end_of_cycle(\d+)\.pt", evaluated)
    when = f"end of cycle {m.group(1)}" if m else "last model (no cycle ended)"
    return f"StABlE(1k), {VARIANT_LABELS.get(name, 'variant ' + name)}, {when}"


def ablation_markdown(abl: dict) -> list:
    if not abl:
        return []
    lines = ["## Ablations (seed 3001, test frames from 2000 on: not the evaluation's seeds or starts)", "",
             "Each variant is StABlE(1k) with one setting changed (run.sh `ABL_VARIANTS`; the controls `obsbonds` "
             "and `efonly`: the lr 1e-2 variant with the observable changed, or weighted ~0), trained with the "
             "same training seed; its model at the end of a learning cycle (the first unless the label says "
             "otherwise) is evaluated with the evaluation protocol, next to QM(1k) and StABlE(1k)'s own end-of-cycle-1 model (the paper's "
             "settings). Parameter move: L2 norm of θ − θ_QM(1k) (relative to ‖θ_QM(1k)‖).", ""]
    for temp, block in abl.items():
        lines += [f"### {temp} K (RMST horizon {block['horizon_ps']:g} ps)", "",
                  "| arm | replicas | stable to horizon | KM median (ps) [95 % CI] | RMST (ps) [95 % CI] "
                  "| RMST ratio vs QM(1k) | hazard ratio vs QM(1k) | log-rank p vs QM(1k) | RMST ratio vs paper settings "
                  "| log-rank p vs paper | force MAE (eV/Å) | RDF MAE | parameter move |", "|" + "---|" * 13]
        for r in block["arms"]:
            def ratio(k):
                x = r.get(f"rmst_ratio_vs_{k}")
                return _ci(x[0], x[1:]) if x else "—"

            def p(k):
                x = r.get(f"logrank_vs_{k}")
                return _f(x["p"], 2) if x else "—"
            mv = r.get("param_move_from_qm_1k")
            mu, sd = r["rdf_mae"]
            lines.append("| " + " | ".join([
                r["label"], str(r["n_replicas"]), f"{r['stable_to_horizon']}/{r['n_replicas']}",
                _ci(r["km_median_ps"], r["km_median_ci_ps"]), _ci(r["rmst_ps"], r["rmst_ci_ps"]),
                ratio("qm_1k"), _hr(r.get("hazard_ratio_vs_qm_1k")), p("qm_1k"), ratio("paper"), p("paper"), _f(r["force_mae_eV_A"]),
                "n/a" if mu is None else f"{_f(mu)} ± {_f(sd)}",
                f"{mv[0]:.3g} ({mv[1]:.2g})" if mv else "—"]) + " |")
        lines.append("")
        for r in block["arms"]:
            if r.get("training"):
                lines += [f"- {r['label']}: " + "; ".join(r["training"])]
        lines.append("")
    return lines


def fig_ablations(runs, fig_dir: Path, abl: dict):
    """Kaplan–Meier curves of the ablation arms, labelled as in the tables (``abl``: analyse_ablations);
    95 % bands for the two reference arms only (QM(1k) and the paper settings), a fixed colour per
    variant."""
    plt = _plt()
    labels = {(r["model"], int(t)): r["label"] for t, b in (abl or {}).items() for r in b["arms"]}
    order = ABL_RUN_ORDER + [v for v in VARIANT_LABELS if v not in ABL_RUN_ORDER]
    palette = [f"C{i}" for i in (0, 1, 4, 5, 6, 7, 8, 9)]  # C2, C3: the reference arms
    for temp in sorted({t for _, t in runs}):
        here = {a: r for (a, t), r in runs.items() if t == temp}
        fig, ax = plt.subplots(figsize=(7.5, 4.2 + 0.17 * len(here)))
        arms = sorted(here, key=arm_order)
        for arm in arms:
            name = arm[len("abl_"):]
            k = order.index(name) if name in order else len(order) + arms.index(arm)
            c = {ABL_BASE: COLORS["qm_1k"], ABL_PAPER: COLORS["stable_1k"]}.get(arm, palette[k % len(palette)])
            ref = arm in (ABL_BASE, ABL_PAPER)
            ls = "-" if ref else ("--" if k < len(palette) else ":")
            km_step(ax, here[arm], c, ls, labels.get((arm, temp), ablation_label(arm)), band=ref)
        _finish_km(plt, fig, ax, f"Ablations: Langevin {temp} K, seed 3001, other start frames "
                   "(bands: 95 % CI of the two reference arms)", fig_dir / f"km_ablations_{temp}K.png",
                   legend_below=True)


def fig_move_vs_hazard(res: dict, fig_dir: Path):
    """Hazard ratio against the QM model each StABlE model started from, versus how far training
    moved its parameters from that start (log-log): the ablation arms (ablation seeds, 700 K) and
    the evaluated StABlE models (evaluation seeds, each temperature), the original's included."""
    def plottable(hr):  # a log axis needs 0 < lower and a finite upper bound
        return bool(hr) and hr[1] > 0 and math.isfinite(hr[2])

    pts = []  # (move, [hr, lo, hi], label, marker, colour)
    for t, block in (res.get("ablations") or {}).items():
        for r in block["arms"]:
            mv, hr = r.get("param_move_from_qm_1k"), r.get("hazard_ratio_vs_qm_1k")
            if mv and plottable(hr):
                pts.append((mv[0], hr, r["label"].replace("StABlE(1k), ", ""), "o", "0.55"))
    moves = res.get("param_moves") or {}
    for temp, block in res["temperatures"].items():
        for r in block["models"]:
            key = r["model"]
            hr = r.get("hazard_ratio_vs_own_start") or r.get("hazard_ratio_vs_qm_1k")
            if key in moves and r["status"] == "done" and plottable(hr):
                mk = "s" if temp == "500" else "^"
                pts.append((moves[key][0], hr, f"{r['label']}, {temp} K", mk, COLORS.get(key, "k")))
    if not pts:
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for mv, (h, lo, hi), label, mk, c in pts:
        ax.errorbar([mv], [h], yerr=[[h - lo], [hi - h]], fmt=mk, color=c, ms=6, capsize=2, lw=1,
                    label=label if mk != "o" else None)
    ax.plot([], [], "o", color="0.55", label="ablation arms (700 K, ablation seeds)")
    ax.axhline(1.0, color="k", lw=0.6, ls=":")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameter move from the QM start (L2 norm of the trainable parameters)")
    ax.set_ylabel("hazard ratio vs the QM start (95 % CI)")
    _finish(plt, fig, ax, "Stability gain vs how far StABlE training moved the model",
            fig_dir / "move_vs_hazard.png", legend_below=True)


# ----------------------------------------------------------------------------- markdown
def _f(x, p=3):
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{p}g}"


def _ci(est, ci, p=3, unit=""):
    lo, hi = ci
    if est is None:
        return f"not reached (> horizon){unit}"
    return f"{_f(est, p)} [{_f(lo, p) if lo is not None else '?'}, {_f(hi, p) if hi is not None else '> horizon'}]{unit}"


def _hr(h):
    """A hazard ratio [lower, upper] (None: no events at all)."""
    if not h:
        return "—"
    return f"{_f(h[0], 3)} [{_f(h[1], 3)}, {_f(h[2], 3)}]"


def markdown(res: dict) -> str:
    lines = ["# xTB aspirin: stability of QM-pretrained vs StABlE-trained SchNet", "",
             "Kaplan–Meier survival of the stability time (bond-length deviation < 0.5 Å, checked every "
             "50 fs; replicas still stable at the horizon are right-censored). Median: KM median, 95 % CI "
             "by Brookmeyer–Crowley (log-log band). RMST: restricted mean stability time to the horizon, "
             "95 % CI from the Greenwood-type variance. Ratio: RMST / RMST of QM(1k), 95 % CI by the delta "
             "method on the log scale (the two runs treated as independent); it cannot exceed horizon / RMST(QM(1k)). "
             "Hazard ratio: this model's hazard of going unstable / QM(1k)'s, from the Cox partial likelihood "
             "(proportional hazards assumed; Wald 95 % CI); it does not saturate at the horizon, and with "
             "exponential survival 1 / HR is the ratio of mean stability times. Log-rank: two-sample test vs "
             "QM(1k). Paired: replicas share start frame, velocities and noise with QM(1k)'s replica of the "
             "same index; pairs where this model lasted longer/shorter (two-sided sign test). MAEs: energy "
             "and force on ≤ 1000 test frames; RDF/ADF/VACF over each replica's stable frames (mean ± std "
             "over replicas). The original's checkpoints were trained on DFT (MD17) aspirin: their energy MAE "
             "against xTB is mostly the constant offset between the two theories. At 700 K the reference "
             "observables come from the 500 K data (the RDF reweighted to 700 K, ADF and VACF not): compare "
             "models with each other there, not with the reference.", ""]
    for temp, block in res["temperatures"].items():
        lines += [f"## {temp} K (RMST horizon {block['horizon_ps']:g} ps"
                  + ("; models were run to different horizons" if block["horizons_differ"] else "") + ")", "",
                  "| model | replicas | horizon (ps) | stable to horizon | KM median (ps) [95 % CI] "
                  "| RMST (ps) [95 % CI] | RMST ratio vs QM(1k) [95 % CI] | hazard ratio vs QM(1k) [95 % CI] "
                  "| log-rank p vs QM(1k) "
                  "| paired longer/shorter (p) | energy MAE (eV) | force MAE (eV/Å) | RDF MAE | ADF MAE | VACF MAE |",
                  "|" + "---|" * 15]
        for r in block["models"]:
            if r["status"] != "done":
                lines.append(f"| {r['label']} | not run yet |" + " |" * 13)
                continue
            ratio = r.get("rmst_ratio_vs_qm_1k")
            lrk = r.get("logrank_vs_qm_1k")
            pr = r.get("paired_sign_test_vs_qm_1k")
            cells = [r["label"], str(r["n_replicas"]), f"{r['horizon_ps']:g}",
                     f"{r['stable_to_horizon']}/{r['n_replicas']}",
                     _ci(r["km_median_ps"], r["km_median_ci_ps"]),
                     _ci(r["rmst_ps"], r["rmst_ci_ps"]),
                     _ci(ratio[0], ratio[1:]) if ratio else "—",
                     _hr(r.get("hazard_ratio_vs_qm_1k")),
                     _f(lrk["p"], 2) if lrk else "—",
                     f"{pr['b_longer']}/{pr['b_shorter']} ({_f(pr['p'], 2)})" if pr else "—",
                     _f(r["energy_mae_eV"]), _f(r["force_mae_eV_A"])]
            for k in ("rdf_mae", "adf_mae", "vacf_mae"):
                mu, sd = r[k]
                cells.append("n/a" if mu is None else f"{_f(mu)} ± {_f(sd)}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        ph = [f"{r['label']} {_hr(r['hazard_ratio_halves_vs_qm_1k'][0])} / {_hr(r['hazard_ratio_halves_vs_qm_1k'][1])}"
              for r in block["models"] if r.get("hazard_ratio_halves_vs_qm_1k")]
        if ph:
            lines += ["Proportional-hazards check, hazard ratio vs QM(1k) over the first / second half of the horizon "
                      "(similar values: the single hazard ratio summarises the whole run): " + "; ".join(ph) + ".", ""]
        ch = [f"{r['label']} {_f(100 * r['hazard_rate_halves_per_ps'][0][0], 2)} / "
              f"{_f(100 * r['hazard_rate_halves_per_ps'][1][0], 2)} (mean {_ci(r['exponential_mean_ps'][0], r['exponential_mean_ps'][1:], 3, ' ps')})"
              for r in block["models"] if r.get("exponential_mean_ps")
              and all(r["hazard_rate_halves_per_ps"])]
        if ch:
            lines += ["Constant-hazard check, replicas going unstable per 100 ps at risk over the first / second half "
                      "of the horizon (similar values: exponential survival, whose mean, in brackets, extrapolates "
                      "beyond the horizon): " + "; ".join(ch) + ".", ""]
        labels = {r["model"]: r["label"] for r in block["models"]}
        for r in block["models"]:
            ratio, hr, halves, lrk, pr = (r.get(f"{k}_vs_own_start") for k in (
                "rmst_ratio", "hazard_ratio", "hazard_ratio_halves", "logrank", "paired_sign_test"))
            if r["status"] != "done" or lrk is None:
                continue
            paired = (f", paired longer/shorter {pr['b_longer']}/{pr['b_shorter']} ({_f(pr['p'], 2)})" if pr else "")
            lines += [f"{r['label']} against its own starting point, {labels[OWN_START[r['model']]]}: RMST ratio "
                      f"{_ci(ratio[0], ratio[1:]) if ratio else '—'}, hazard ratio {_hr(hr)} (first / second half of the horizon {_hr(halves[0])} / {_hr(halves[1])}), log-rank p {_f(lrk['p'], 2)}{paired}.", ""]
        more = []
        for r in block["models"]:
            ratio, hr, lrk = (r.get(f"{k}_vs_{MORE_DATA}") for k in ("rmst_ratio", "hazard_ratio", "logrank"))
            if r["status"] == "done" and lrk is not None:
                more.append(f"{r['label']}: RMST ratio {_ci(ratio[0], ratio[1:]) if ratio else '—'}, hazard ratio "
                            f"{_hr(hr)}, log-rank p {_f(lrk['p'], 2)}")
        if more:
            lines += [f"Against {labels[MORE_DATA]} (QM on 10× the data): " + "; ".join(more) + ".", ""]
    if res.get("param_moves"):
        labels = dict(MODELS)
        start = {k: labels[OWN_START.get(k, BASELINE)] for k in res["param_moves"]}
        lines += ["Parameter move of each StABlE model from its own starting point (L2 norm of the difference; "
                  "relative to the start's norm): " + "; ".join(
                      f"{labels.get(k, k)} from {start[k]} {_f(d)} ({_f(rel, 2)})" for k, (d, rel) in res["param_moves"].items())
                  + ".", ""]
    lines += ablation_markdown(res.get("ablations"))
    if res["not_run"]:
        lines += ["Not run yet: " + ", ".join(res["not_run"]) + ".", ""]
    pre = res.get("pretraining") or {}
    if pre:
        lines += ["## QM baselines (pretraining)", "",
                  "| model | epochs | stopped by | best val force MAE (eV/Å) | test frames | test energy MAE (eV) "
                  "| test force MAE (eV/Å) | training wall time (h) |", "|---|---|---|---|---|---|---|---|"]
        rules = {"min_lr": "lr ≤ early_stopping_lr (the original's rule)", "wall_time": "wall-time limit",
                 "max_epochs": "max_epochs"}
        for key, label in MODELS:
            p = pre.get(key)
            if p:
                bv = (p.get("best_val") or {}).get("forces_mae")
                wall = p.get("train_wall_s") or (res.get("timings_s") or {}).get(key)
                lines.append(f"| {label} | {p.get('epochs')} | {rules.get(p['stopped'], p['stopped'])} | {_f(bv)} "
                             f"| {p.get('test_frames', '—')} | {_f(p['test'].get('energy_mae'))} "
                             f"| {_f(p['test'].get('forces_mae'))} | {_f(wall / 3600, 2) if wall else '—'} |")
        lines += ["", "Training wall time: the training's own clock summed over its resumed runs (from its "
                  "checkpoint), or, for a summary without it, the stage's recorded wall time.", ""]
    tr = res.get("stable_training")
    if tr:
        fm = tr.get("force_mae_first_last") or [None, None]
        wall = (f" Wall time ≈ {tr['wall_s_estimate'] / 3600:.2f} h ({tr['epoch_wall_s_mean']:.0f} s per epoch, "
                "from the log's event times)." if tr.get("wall_s_estimate") else "")
        lines += ["## StABlE training", "", f"Epochs: {tr['epochs']}, learning epochs: {tr['learning_epochs']}, "
                  f"test force MAE (eV/Å) first → last: {_f(fm[0])} → {_f(fm[1])}, unstable fraction in the last "
                  f"epoch: {_f(tr['unstable_fraction_last'])}.{wall}", ""]
    if res.get("timings_s"):
        lines += ["## Wall time per stage (out/timings.tsv: the finished runs of each, summed; a run "
                  "killed before finishing its stage is not counted, see the StABlE training estimate above)", "",
                  "| stage | s |", "|---|---|"] + [f"| {k} | {v} |" for k, v in res["timings_s"].items()] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- training scalars
TRAIN_TAGS = ("Fraction of Unstable Replicas", "Loss", "Observable Loss", "Force MAE", "Energy MAE",
              "Learning Rate", "Gradient Norm")


def training_scalars(out: Path, dest: Path):
    """StABlE training curves from the run's TensorBoard logs (saved to
    ``<dest>/results/stable_training_scalars.json`` so they outlive out/), else from that file."""
    cache = dest / "results" / "stable_training_scalars.json"
    logs = sorted(glob.glob(str(out / "stable_runs" / "schnet_aspirin_stable_1k_*" / "logs")))
    if logs:
        try:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        except ImportError:
            EventAccumulator = None
        if EventAccumulator is not None:
            ea = EventAccumulator(logs[0], size_guidance={"scalars": 0})
            ea.Reload()
            sc = {t: [[int(e.step) for e in ea.Scalars(t)], [float(e.value) for e in ea.Scalars(t)]]
                  for t in ea.Tags()["scalars"] if t in TRAIN_TAGS}
            if "Fraction of Unstable Replicas" in sc:  # one event per epoch: its wall-clock time
                sc["_epoch_wall_time"] = [e.wall_time for e in ea.Scalars("Fraction of Unstable Replicas")]
            if sc:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(sc) + "\n")
                return sc
    return json.loads(cache.read_text()) if cache.is_file() else None


EPOCH_GAP_S = 600  # longer gaps between two epochs' log events are interruptions


def training_summary(sc) -> dict:
    if not sc:
        return {}
    lr = sc.get("Learning Rate", [[], []])[1]
    fm = sc.get("Force MAE", [[], []])[1]
    uf = sc.get("Fraction of Unstable Replicas", [[], []])
    wall = sc.get("_epoch_wall_time") or []
    gaps = [b - a for a, b in zip(wall, wall[1:]) if 0 < b - a < EPOCH_GAP_S]
    return {"epochs": max(uf[0]) if uf[0] else 0, "learning_epochs": int(sum(1 for x in lr if x > 0)),
            "force_mae_first_last": [fm[0], fm[-1]] if fm else None,
            "unstable_fraction_last": uf[1][-1] if uf[1] else None,
            # epochs timed by consecutive log events (an interruption's gap and the first epoch of
            # each resumed piece are left out); mean × epochs estimates the whole run
            "epoch_wall_s_mean": (sum(gaps) / len(gaps)) if gaps else None,
            "wall_s_estimate": (sum(gaps) / len(gaps) * max(uf[0])) if gaps and uf[0] else None}


# ----------------------------------------------------------------------------- figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def label_of(key):
    return dict(MODELS)[key]


def by_temperature(runs):
    """(temperature, {model key: run}) for the temperatures that have runs."""
    for temp in TEMPERATURES:
        here = {k: r for (k, t), r in runs.items() if t == temp}
        if here:
            yield temp, here


def _finish(plt, fig, ax, title, path, legend_below=False):
    ax.set_title(title, fontsize=9)
    if legend_below:  # many or long labels: one column under the axes
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _finish_km(plt, fig, ax, title, path, legend_below=False):
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("fraction of replicas still stable (Kaplan–Meier)")
    ax.set_ylim(-0.02, 1.02)
    _finish(plt, fig, ax, title, path, legend_below)


def km_step(ax, r, c, ls, label, band=True):
    """Kaplan–Meier curve of run ``r`` with its 95 % band (``band``) and a tick where the censored
    replicas end."""
    km = stats.kaplan_meier(r["times"], r["events"])
    lo, hi = km.confidence_band()
    x = np.concatenate([[0.0], km.times, [r["horizon"]]])
    y = np.concatenate([[1.0], km.survival, [km.survival[-1] if km.times.size else 1.0]])
    ylo = np.concatenate([[1.0], lo, [lo[-1] if lo.size else 1.0]])
    yhi = np.concatenate([[1.0], hi, [hi[-1] if hi.size else 1.0]])
    ax.step(x, y, where="post", color=c, lw=1.6, ls=ls, label=f"{label} (n={r['n']}, {r['n_stable']} censored)")
    if band:
        ax.fill_between(x, ylo, yhi, step="post", color=c, alpha=0.15, lw=0)
    if (~r["events"]).any():
        ax.plot([r["simulated"]], [km(r["simulated"])], "|", color=c, ms=10)


def fig_km(runs, res, fig_dir: Path):
    plt = _plt()
    for temp, here in by_temperature(runs):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for key, _ in MODELS:
            r = here.get(key)
            if r is None:
                continue
            km_step(ax, r, COLORS[key], STYLES[key], label_of(key))
        _finish_km(plt, fig, ax, f"Langevin {temp} K, bond deviation < 0.5 Å (95 % log-log bands)",
                   fig_dir / f"km_{temp}K.png")


def fig_hist(runs, fig_dir: Path):
    plt = _plt()
    for temp, here in by_temperature(runs):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        bins = np.linspace(0, max(r["horizon"] for r in here.values()), 31)
        for key, _ in MODELS:
            if key in here:
                ax.hist(here[key]["times"], bins=bins, histtype="step", lw=1.5, color=COLORS[key], ls=STYLES[key],
                        label=label_of(key))
        ax.set_xlabel("stability time (ps); the last bin holds the censored replicas")
        ax.set_ylabel("replicas")
        _finish(plt, fig, ax, f"Stability times at {temp} K", fig_dir / f"stability_hist_{temp}K.png")


def fig_observables(runs, fig_dir: Path):
    from mdsim import observables as obs
    plt = _plt()
    for temp, here in by_temperature(runs):
        ref = next((r for r in here.values() if r["gt_rdf"] is not None), None)
        if ref is None:
            continue
        cfg = ref["config"]
        edges = obs.histogram_rdf_edges(cfg["max_rdf_dist"], cfg["dr"]).numpy()
        rr = 0.5 * (edges[1:] + edges[:-1])
        ang = obs.adf_bin_centers(ref["gt_adf"].size, tuple(cfg["angle_range"])).numpy() \
            if ref["gt_adf"] is not None else None
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        panels = [("final_rdfs", "gt_rdf", rr, "r (Å)", "RDF"), ("final_adfs", "gt_adf", ang, "angle (degrees)", "ADF"),
                  ("final_vacfs", "gt_vacf", None, "lag (samples)", "VACF")]
        for ax, (k, gk, x, xl, yl) in zip(axes, panels):
            g = ref[gk]
            if g is None:
                continue
            xx = np.arange(g.size) if x is None else x
            ax.plot(xx, g, "k-", lw=2.2, label="xTB reference")
            for key, _ in MODELS:
                v = here[key][k] if key in here else None
                if v is None or not np.isfinite(v).any():
                    continue
                with warnings.catch_warnings(), np.errstate(invalid="ignore"):
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ax.plot(xx, np.nanmean(v, 0), "--", color=COLORS[key], lw=1.2, label=label_of(key))
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
        axes[0].set_xlim(0, 8)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Observables over each model's stable frames, {temp} K, vs the xTB reference", fontsize=10)
        fig.tight_layout()
        fig.savefig(fig_dir / f"observables_{temp}K.png", dpi=130)
        plt.close(fig)


def fig_training(sc, fig_dir: Path):
    if not sc:
        return
    plt = _plt()
    panels = [("Fraction of Unstable Replicas", "unstable fraction (tol 0.25 Å)"),
              ("Observable Loss", "RDF loss"), ("Force MAE", "test force MAE (eV/Å)"),
              ("Learning Rate", "learning rate")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, (k, yl) in zip(axes, panels):
        if k in sc:
            ax.plot(sc[k][0], sc[k][1], "o-", ms=2.5, lw=1)
        ax.set_xlabel("StABlE epoch")
        ax.set_ylabel(yl)
    if "Loss" in sc:
        tw = axes[1].twinx()
        tw.plot(sc["Loss"][0], sc["Loss"][1], "C3.-", ms=2, lw=0.8)
        tw.set_ylabel("total loss (incl. energy/force)", color="C3")
    fig.tight_layout()
    fig.savefig(fig_dir / "stable_training.png", dpi=130)
    plt.close(fig)


def timings(out: Path, dest: Path) -> dict:
    """Wall time (s) per stage, summed over the runs of it that finished a piece (a stage resumed
    in several sessions is recorded once per finished run; a run killed before finishing records
    nothing).  Runs are keyed by their finishing time and merged into
    ``<dest>/results/timings_runs.json`` (kept in git, so that pieces run on other machines count);
    returns {stage: total seconds}."""
    cache = dest / "results" / "timings_runs.json"
    runs = json.loads(cache.read_text()) if cache.is_file() else {}
    p = out / "timings.tsv"
    if p.is_file():
        for line in p.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                runs.setdefault(parts[0], {})[parts[2]] = int(parts[1])
    if runs:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    return {k: sum(v.values()) for k, v in runs.items()}


def pretraining(dest: Path) -> dict:
    """``results/pretrain_<model>.json`` written by run.sh (pretrain_summary.py) per QM baseline."""
    out = {}
    for key, _ in MODELS:
        f = dest / "results" / f"pretrain_{key}.json"
        if f.is_file():
            out[key] = json.loads(f.read_text())
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return _num(float(x), 6)
    if isinstance(x, np.integer):
        return int(x)
    return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "out"), help="the study's output folder (out/ or out_quick/)")
    ap.add_argument("--dest", default=str(HERE), help="writes <dest>/results/ and <dest>/figures/")
    ap.add_argument("--checkpoints", default=None,
                    help="the study's checkpoints/ (default <dest>/checkpoints; run.sh --quick: out_quick/checkpoints)")
    ap.add_argument("--no-figures", action="store_true", help="tables only")
    a = ap.parse_args(argv)
    out, dest = Path(a.out), Path(a.dest)
    (dest / "results").mkdir(parents=True, exist_ok=True)
    res, runs = analyse(out, dest)
    sc = training_scalars(out, dest)
    res["stable_training"] = training_summary(sc)
    res["timings_s"] = timings(out, dest)
    res["pretraining"] = pretraining(dest)
    res["ablations"], abl_runs = analyse_ablations(out, dest, Path(a.checkpoints) if a.checkpoints
                                                   else dest / "checkpoints")
    res["param_moves"] = param_moves(out, dest, Path(a.checkpoints) if a.checkpoints else dest / "checkpoints")
    for (key, temp), r in runs.items():
        res.setdefault("folders", {})[f"{key}_{temp}K"] = str(r["dir"])
    md = markdown(res)
    (dest / "results" / "results.md").write_text(md)
    (dest / "results" / "results.json").write_text(json.dumps(_jsonable(res), indent=1) + "\n")
    if not a.no_figures:
        fig_dir = dest / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        fig_km(runs, res, fig_dir)
        fig_hist(runs, fig_dir)
        fig_observables(runs, fig_dir)
        fig_training(sc, fig_dir)
        fig_ablations(abl_runs, fig_dir, res["ablations"])
        fig_move_vs_hazard(res, fig_dir)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
