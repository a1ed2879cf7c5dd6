"""Copy the tables that report.py generates (results/results.md) into VALIDATION.md.

VALIDATION.md marks each generated block with a pair of HTML comments, invisible when rendered:

    <!-- begin results.md: 500 K -->
    ...replaced by the body of results.md's section "## 500 K (...)"...
    <!-- end results.md: 500 K -->

(the end marker repeats the begin marker's text). The name after ``results.md:`` selects a section by heading prefix; ``A / B`` selects the
subsection ``### B…`` under ``## A…``. A section's body runs from its heading to the next heading
of any level. The suffix ``(tables)`` (``<!-- begin results.md: Ablations / 700 K (tables) -->``)
keeps only the body's table rows. Everything outside the markers is left as it is.

    python experiments/xtb_aspirin/sync_validation.py            # rewrite VALIDATION.md
    python experiments/xtb_aspirin/sync_validation.py --check    # exit 1 if it is out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BEGIN = re.compile(r"^<!-- begin results\.md: (?P<name>.+?)(?P<tables> \(tables\))? -->$")


def sections(md: str) -> dict[str, list[str]]:
    """Heading path ("A" for ``## A``, "A / B" for ``### B`` under it) -> body lines."""
    out: dict[str, list[str]] = {}
    top = None
    cur = None
    for line in md.splitlines():
        m = re.match(r"^(#{2,3}) (.+)$", line)
        if m:
            if len(m.group(1)) == 2:
                top = m.group(2).strip()
                cur = top
            else:
                cur = f"{top} / {m.group(2).strip()}" if top else m.group(2).strip()
            out[cur] = []
        elif cur is not None:
            out[cur].append(line)
    return out


def find(secs: dict[str, list[str]], name: str) -> list[str]:
    """The one section whose heading path matches ``name`` part by part (prefixes)."""
    want = [p.strip() for p in name.split("/")]
    hits = [k for k in secs
            if len(k.split(" / ")) == len(want)
            and all(h.startswith(w) for h, w in zip(k.split(" / "), want))]
    if len(hits) != 1:
        raise ValueError(f"results.md: {len(hits)} sections match {name!r} "
                         f"(headings: {', '.join(secs) or 'none'})")
    return secs[hits[0]]


def body(lines: list[str], tables_only: bool) -> list[str]:
    if tables_only:
        lines = [ln for ln in lines if ln.startswith("|")]
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def sync(validation: str, results: str) -> str:
    """VALIDATION.md's text with every marked block replaced from results.md."""
    secs = sections(results)
    out: list[str] = []
    lines = validation.splitlines()
    i = 0
    n_blocks = 0
    while i < len(lines):
        m = BEGIN.match(lines[i])
        out.append(lines[i])
        i += 1
        if not m:
            continue
        end = lines[i - 1].replace("<!-- begin ", "<!-- end ", 1)
        try:
            j = lines.index(end, i)
        except ValueError:
            raise ValueError(f"VALIDATION.md: no {end!r} after {lines[i - 1]!r}") from None
        out += body(find(secs, m.group("name")), bool(m.group("tables")))
        out.append(end)
        i = j + 1
        n_blocks += 1
    if n_blocks == 0:
        raise ValueError("VALIDATION.md: no '<!-- begin results.md: … -->' markers")
    return "\n".join(out) + ("\n" if validation.endswith("\n") else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--validation", type=Path, default=ROOT / "VALIDATION.md")
    ap.add_argument("--results", type=Path,
                    default=ROOT / "experiments" / "xtb_aspirin" / "results" / "results.md")
    ap.add_argument("--check", action="store_true", help="exit 1 if VALIDATION.md is out of date")
    a = ap.parse_args(argv)
    for p in (a.validation, a.results):
        if not p.is_file():
            sys.exit(f"sync_validation: {p} not found")
    old = a.validation.read_text()
    try:
        new = sync(old, a.results.read_text())
    except ValueError as e:
        sys.exit(f"sync_validation: {e}")
    if a.check:
        if new != old:
            print(f"{a.validation} is out of date with {a.results}: run "
                  f"python experiments/xtb_aspirin/sync_validation.py")
            return 1
        return 0
    if new != old:
        a.validation.write_text(new)
        print(f"updated {a.validation}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
