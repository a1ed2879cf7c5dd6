"""Which bond breaks first? Failure modes of the study's evaluations.

For every evaluation folder under ``<out>/evals/*/inference/pre`` that still holds its trajectory
(``full_traj.npy``: every replica's positions at each stability check), finds, for each replica
that went unstable, the first saved frame whose largest bond-length deviation exceeds the
tolerance and the bond responsible there, and counts the failures by bond type (C–H, O–H, C–O,
C–C, ...) and by bond.  Bonds and their reference lengths are those of the evaluation (detected
on the 1k train split, mean length over it: ``System.from_split``), so the first flagged frame
should agree with ``replicas_stable_time.npy``; the agreement is reported.

Results are merged into ``<dest>/results/failure_modes.json`` (trajectories are not committed,
so entries outlive ``out/``) and tabulated in ``<dest>/results/failure_modes.md``.

    python experiments/xtb_aspirin/failure_modes.py --out experiments/xtb_aspirin/out \
        --dest experiments/xtb_aspirin
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdsim.data.format import load_split, split_dir  # noqa: E402
from mdsim.geometry.distances import bond_lengths  # noqa: E402
from mdsim.md.system import System  # noqa: E402


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols
    return chemical_symbols[int(z)]


def bond_label(system: System, b: int) -> str:
    i, j = (int(x) for x in system.bonds[b])
    si, sj = sorted((_symbol(system.atomic_numbers[i]), _symbol(system.atomic_numbers[j])),
                    key=lambda s: (s != "C", s != "O", s))  # C first, then O, then H: C–H, O–H, C–O
    return f"{si}–{sj}"


def first_failures(traj: np.ndarray, system: System, tol: float, chunk: int = 256):
    """For each replica: (first frame index with max |d_b − d̄_b| > tol, the bond index there), or
    (None, None) if no frame exceeds it.  ``traj``: (R, F, N, 3)."""
    ref = system.ref_bond_lengths.double()
    out = []
    for r in range(traj.shape[0]):
        hit = (None, None)
        for f0 in range(0, traj.shape[1], chunk):
            pos = torch.from_numpy(np.array(traj[r, f0:f0 + chunk], dtype=np.float64))
            dev = (bond_lengths(pos, system.bonds) - ref).abs()  # (frames, B)
            over = (dev > tol).any(dim=1).nonzero()
            if over.numel():
                f = int(over[0])
                hit = (f0 + f, int(dev[f].argmax()))
                break
        out.append(hit)
    return out


class FolderFailures(NamedTuple):
    """One evaluation folder's trajectory and, per replica, its first bond beyond the tolerance."""
    cfg: dict  # simulate_config.yml
    system: System  # bonds and reference lengths of the evaluation (1k train split)
    traj: np.ndarray  # (R, F, N, 3) saved frames, memory-mapped
    stable: np.ndarray  # (R,) bool: stable to the end
    dt_frame: float  # ps between saved frames
    hits: list  # first_failures(traj, system, tol)


def folder_failures(d: Path, systems: Optional[dict] = None) -> FolderFailures:
    """Load an evaluation folder (``inference/pre`` with ``full_traj.npy``) and find each replica's
    first bond beyond the tolerance.  ``systems`` caches the System per data split."""
    systems = {} if systems is None else systems
    cfg = yaml.safe_load((d / "simulate_config.yml").read_text())
    key = (cfg["src"], cfg["name"], cfg["molecule"], cfg["size"])
    if key not in systems:
        train = load_split(split_dir(cfg["src"], cfg["name"], cfg["molecule"], cfg["size"], "train"))
        systems[key] = System.from_split(train, stability_tolerance=cfg["bond_dev_tol"], dtype=torch.float64)
    system = systems[key]
    traj = np.load(d / "full_traj.npy", mmap_mode="r")
    stable = np.load(d / "replicas_stable.npy").astype(bool)
    dt_frame = float(cfg["timestep"]) * int(cfg["n_dump"]) / 1000.0
    return FolderFailures(cfg, system, traj, stable, dt_frame,
                          first_failures(traj, system, float(cfg["bond_dev_tol"])))


def analyse_folder(d: Path, systems: dict) -> dict:
    cfg, system, _, stable, dt_frame, hits = folder_failures(d, systems)
    tol = float(cfg["bond_dev_tol"])
    times = np.load(d / "replicas_stable_time.npy")
    by_type, by_bond, agree, failed = Counter(), Counter(), 0, 0
    for r, (f, b) in enumerate(hits):
        if stable[r]:
            continue
        failed += 1
        if f is None:
            continue
        lab = bond_label(system, b)
        i, j = (int(x) for x in system.bonds[b])
        by_type[lab] += 1
        by_bond[f"{lab} {i}-{j}"] += 1
        agree += bool(np.isclose(f * dt_frame, times[r], atol=dt_frame + 1e-9))
    return {"exp_name": cfg["exp_name"], "n_replicas": int(len(hits)), "failed": failed,
            "tolerance_A": tol, "by_type": dict(by_type.most_common()),
            "top_bonds": dict(by_bond.most_common(5)),
            "first_frame_agrees_with_stability_time": agree,
            "found_in_trajectory": int(sum(by_type.values()))}


def markdown(res: dict) -> str:
    types = sorted({t for r in res.values() for t in r["by_type"]})
    lines = ["# Failure modes: the first bond beyond the tolerance", "",
             "Each replica that went unstable, counted by the type of the bond whose length deviation first "
             "exceeded the tolerance (bond_dev_tol, against the mean length over the 1k train split). "
             "`agrees`: the first such saved frame matches the recorded stability time (± one check).", "",
             "| evaluation | failed / replicas | " + " | ".join(types) + " | most frequent bonds (atom indices) | agrees |",
             "|" + "---|" * (len(types) + 4)]
    for name in sorted(res):
        r = res[name]
        cells = [name, f"{r['failed']}/{r['n_replicas']}"] + [str(r["by_type"].get(t, 0)) for t in types]
        cells += [", ".join(f"{k} ×{v}" for k, v in r["top_bonds"].items()) or "—",
                  f"{r['first_frame_agrees_with_stability_time']}/{r['found_in_trajectory']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "out"), help="the study's output folder")
    ap.add_argument("--dest", default=str(HERE), help="writes <dest>/results/failure_modes.{json,md}")
    a = ap.parse_args(argv)
    dest = Path(a.dest) / "results"
    dest.mkdir(parents=True, exist_ok=True)
    cache = dest / "failure_modes.json"
    res = json.loads(cache.read_text()) if cache.is_file() else {}
    systems = {}
    for h in sorted(glob.glob(str(Path(a.out) / "evals" / "*" / "inference" / "pre"))):
        d = Path(h)
        if (d / "full_traj.npy").is_file() and (d / "replicas_stable.npy").is_file():
            r = analyse_folder(d, systems)
            res[r.pop("exp_name")] = r
    if not res:
        print(f"failure_modes: no evaluation with full_traj.npy under {a.out}/evals and no saved "
              f"results in {cache}: nothing to tabulate", file=sys.stderr)
        return 0
    cache.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (dest / "failure_modes.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
