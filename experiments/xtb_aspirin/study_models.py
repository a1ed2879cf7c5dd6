"""The study's checkpoints by label, and small helpers shared by the diagnostic scripts
(``energy_offset.py``, ``bond_scan.py``, ``prefailure_errors.py``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator, Sequence, Tuple

import numpy as np

# label → checkpoint path relative to the study's checkpoints/ folder
CHECKPOINTS = {"QM(1k)": "qm_1k.pt",
               "QM(10k)": "qm_10k.pt",
               "StABlE(1k), paper settings": "stable_1k.pt",
               "StABlE(1k), lr 1e-2": "ablations/lr1e-2.pt",
               "efonly (energy-force term alone, lr 1e-2)": "ablations/efonly.pt"}


def present(directory, labels: Sequence[str], prog: str) -> Iterator[Tuple[str, str, Path]]:
    """(label, relative path, path) of each of ``labels`` whose checkpoint exists under
    ``directory``; the missing ones are named on stderr and skipped."""
    for label in labels:
        rel = CHECKPOINTS[label]
        path = Path(directory) / rel
        if not path.is_file():
            print(f"{prog}: {path} not found, skipped", file=sys.stderr)
            continue
        yield label, rel, path


def on_frames(atoms_list, calc, what: str = "energy") -> np.ndarray:
    """``calc``'s energies (``what="energy"``, eV) or forces (``"forces"``, eV/Å) on each of
    ``atoms_list`` (copies: the frames keep no calculator)."""
    if what not in ("energy", "forces"):
        raise ValueError(f"on_frames: what must be 'energy' or 'forces', got {what!r}")
    out = []
    for a in atoms_list:
        a = a.copy()
        a.calc = calc
        out.append(a.get_potential_energy() if what == "energy" else a.get_forces())
    return np.array(out)


def write_results(dest, name: str, data: dict, markdown: str) -> None:
    """``<dest>/results/<name>.json`` (``data``) and ``<name>.md`` (``markdown``, also printed)."""
    out = Path(dest) / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    text = markdown.rstrip("\n") + "\n"
    (out / f"{name}.md").write_text(text)
    print(text, end="")
