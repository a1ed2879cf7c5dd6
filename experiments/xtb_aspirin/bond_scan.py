"""Energy along one stretched bond: the study's models against GFN2-xTB.

Takes one test frame, moves the fragment on one side of a bond (``--move``: the atoms that go
with the second atom) rigidly along the bond axis so that the bond length runs over
``--lengths``, and computes the energy of each model checkpoint and of GFN2-xTB (tblite) there,
relative to the unstretched frame.  A model whose curve falls below the reference's at large
stretch pulls its MD apart there.  Default: aspirin's ring–carboxyl C–C bond (atoms 9–10, the
carboxyl group C10 O11 O12 H20 moved), where most of QM(10k)'s replicas fail first.

    python experiments/xtb_aspirin/bond_scan.py --data experiments/xtb_aspirin/out/data \
        --checkpoints experiments/xtb_aspirin/checkpoints --dest experiments/xtb_aspirin

Writes ``<dest>/results/bond_scan_<i>-<j>.{json,md}`` and ``<dest>/figures/bond_scan_<i>-<j>.png``.
Energies in eV.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mdsim.data.format import DataError, load_split, split_dir  # noqa: E402

sys.path.insert(0, str(HERE))
from study_models import on_frames, present, write_results  # noqa: E402

MODELS = ["QM(1k)", "QM(10k)", "StABlE(1k), paper settings", "StABlE(1k), lr 1e-2"]


def stretched(R: np.ndarray, i: int, j: int, move: list, length: float) -> np.ndarray:
    """``R`` with the atoms ``move`` shifted along the i→j axis so that |r_j − r_i| = length."""
    d = R[j] - R[i]
    r = np.linalg.norm(d)
    out = R.copy()
    out[move] += (length - r) * d / r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="experiments/xtb_aspirin/out/data")
    ap.add_argument("--checkpoints", default="experiments/xtb_aspirin/checkpoints")
    ap.add_argument("--dest", default="experiments/xtb_aspirin")
    ap.add_argument("--molecule", default="aspirin")
    ap.add_argument("--frame", type=int, default=0, help="test frame to stretch")
    ap.add_argument("--bond", type=int, nargs=2, default=[9, 10], metavar=("I", "J"))
    ap.add_argument("--move", type=int, nargs="+", default=[10, 11, 12, 20],
                    help="atoms moved with J (the fragment on J's side; must contain J, not I)")
    ap.add_argument("--lengths", type=float, nargs=3, default=[1.2, 2.6, 29], metavar=("FROM", "TO", "N"))
    a = ap.parse_args(argv)
    i, j = a.bond
    if j not in a.move or i in a.move:
        print(f"bond_scan: --move must contain atom {j} and not atom {i}", file=sys.stderr)
        return 2
    try:
        test = load_split(split_dir(a.data, "xtb", a.molecule, "1k", "test"))
    except DataError as exc:
        print(f"bond_scan: {exc}", file=sys.stderr)
        return 2
    from ase import Atoms
    from tblite.ase import TBLite

    from mdsim.calculator import StableCalculator

    n_atoms = len(test.z)
    if not 0 <= a.frame < len(test):
        print(f"bond_scan: --frame {a.frame} is outside the test split's {len(test)} frames", file=sys.stderr)
        return 2
    bad = [k for k in (i, j, *a.move) if not 0 <= k < n_atoms]
    if bad or i == j or a.lengths[0] <= 0 or a.lengths[1] <= a.lengths[0] or a.lengths[2] < 2:
        print(f"bond_scan: expected atom indices in 0..{n_atoms - 1} with I != J (got {bad or [i, j]}) and "
              "--lengths FROM TO N with 0 < FROM < TO, N >= 2", file=sys.stderr)
        return 2
    R0 = np.asarray(test.R[a.frame], dtype=float)
    lengths = np.linspace(a.lengths[0], a.lengths[1], int(a.lengths[2]))
    r0 = float(np.linalg.norm(R0[j] - R0[i]))
    frames = [Atoms(numbers=test.z, positions=R0)] + [
        Atoms(numbers=test.z, positions=stretched(R0, i, j, a.move, L)) for L in lengths]
    curves = {}
    e = on_frames(frames, TBLite(method="GFN2-xTB", verbosity=0))
    curves["GFN2-xTB (reference)"] = (e[1:] - e[0]).tolist()
    for label, _, ck in present(a.checkpoints, MODELS, "bond_scan"):
        e = on_frames(frames, StableCalculator(checkpoint=str(ck)))
        curves[label] = (e[1:] - e[0]).tolist()
    name = f"bond_scan_{i}-{j}"
    res = {"frame": a.frame, "bond": [i, j], "moved": a.move, "length_at_frame": r0,
           "lengths": lengths.tolist(), "energy_rel_eV": curves}
    labels = list(curves)
    rows = [f"Energy (eV, relative to test frame {a.frame} with its bond {i}–{j} at {r0:.3f} Å) with the "
            f"bond stretched by moving atoms {a.move} along it.", "",
            "| bond length (Å) | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for k, L in enumerate(lengths):
        rows.append(f"| {L:.2f} | " + " | ".join(f"{curves[lab][k]:.3f}" for lab in labels) + " |")
    write_results(a.dest, name, res, "\n".join(rows))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for lab in labels:
        ax.plot(lengths, curves[lab], "k--" if lab.startswith("GFN2") else "-", label=lab)
    ax.axvline(r0, color="grey", lw=0.5)
    ax.set_xlabel(f"bond {i}–{j} length (Å)")
    ax.set_ylabel("energy relative to the frame (eV)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    (Path(a.dest) / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(a.dest) / "figures" / f"{name}.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
