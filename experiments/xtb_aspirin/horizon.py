"""Evaluation horizon (ps) from a pilot evaluation of QM(1k) (run.sh; never from the evaluation runs).

    python experiments/xtb_aspirin/horizon.py PILOT_EVAL_DIR [--min 20] [--factor 3] [--max 100] [--epoch-ps 1]

Prints max(min, factor x the pilot's Kaplan–Meier median stability time) in ps, rounded up to a
whole number of evaluation epochs (--epoch-ps, 1 ps in configs/eval.yml) and capped at max. If fewer than half of the pilot's replicas
went unstable, the median is only known to exceed the pilot's length, which is used instead (a
warning goes to stderr). run.sh extends such a pilot (it resumes) until its median is reached or it
has run ceil(max / factor) ps, so that the horizon is 3 x a measured median or the cap
(``--pilot-length``).
"""
import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import load_eval  # noqa: E402

from mdsim import stats  # noqa: E402


def _median(pilot_dir):
    """(KM median stability time or None if not reached, simulated ps) of a pilot evaluation."""
    r = load_eval(Path(pilot_dir))
    return stats.kaplan_meier(r["times"], r["events"]).median()[0], r["simulated"]


def pilot_length(pilot_dir, longest: float) -> float:
    """How long (ps) the pilot must run: what it has run if its KM median is reached (or it ran
    ``longest``), else ``longest`` (the resumable pilot is then extended and asked again)."""
    med, simulated = _median(pilot_dir)
    return simulated if (med is not None or simulated >= longest - 1e-9) else longest


def horizon(pilot_dir, lo: float, factor: float, hi: float, epoch_ps: float = 1.0) -> float:
    med, simulated = _median(pilot_dir)
    if med is None:
        med = simulated
        print(f"horizon.py: the pilot's median is not reached within {med:g} ps; using {med:g} ps", file=sys.stderr)
    h = max(lo, factor * med)
    if h > hi:
        print(f"horizon.py: {factor:g} x median = {factor * med:g} ps capped at {hi:g} ps", file=sys.stderr)
        h = hi
    return round(math.ceil(h / epoch_ps - 1e-9) * epoch_ps, 6)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pilot_dir")
    ap.add_argument("--min", type=float, default=20.0)
    ap.add_argument("--factor", type=float, default=3.0)
    ap.add_argument("--max", type=float, default=100.0)
    ap.add_argument("--epoch-ps", type=float, default=1.0)
    ap.add_argument("--pilot-length", type=float, metavar="PS",
                    help="print instead how long the pilot must run: its length if its median is "
                         "reached, else PS (run.sh then extends the pilot to PS)")
    a = ap.parse_args()
    if a.pilot_length is not None:
        print(f"{pilot_length(a.pilot_dir, a.pilot_length):g}")
        raise SystemExit(0)
    print(f"{horizon(a.pilot_dir, a.min, a.factor, a.max, a.epoch_ps):g}")
