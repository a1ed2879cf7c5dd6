"""Download the paper's data sets, make offline GFN2-xTB data, and write the split layout.

CLI: ``python download_stable_paper_data.py --help`` (see docs/data.md).  Library use:
:func:`download_file` (resumable streaming download), :func:`fetch_raw`, :func:`prepare`.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from mdsim.data import sources
from mdsim.data.format import DataError
from mdsim.data.sources import SYSTEMS

USER_AGENT = "stable-mlip-downloader/0.1 (python urllib)"


class DownloadError(DataError):
    """A download failed or its content did not verify."""


# --------------------------------------------------------------------------- download
def sha256_of(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for b in iter(lambda: fh.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


_CR = re.compile(r"bytes\s+(\d+|\*)(?:-(\d+))?/(\d+|\*)")


def _content_range(value):
    """'bytes a-b/total' → (a, total) with None for '*'."""
    m = _CR.match(value or "")
    if not m:
        return None, None
    start = None if m.group(1) == "*" else int(m.group(1))
    total = None if m.group(3) == "*" else int(m.group(3))
    return start, total


def download_file(url: str, dest, sha256: Optional[str] = None, expected_size: Optional[int] = None,
                  progress: bool = True, retries: int = 3, retry_wait: float = 1.0,
                  timeout: float = 60.0, chunk_size: int = 1 << 20) -> Path:
    """Stream ``url`` to ``dest``.  Data go to ``<dest>.part``; an existing ``.part`` is
    resumed with an HTTP Range request (a server answering 200 instead of 206 makes us start
    over).  Interrupted transfers are resumed up to ``retries`` times.  The file is renamed
    to ``dest`` only once its size matches Content-Length (or ``expected_size``) and its
    sha256 matches ``sha256`` (if given; a mismatching ``.part`` is deleted)."""
    from tqdm.auto import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    last_problem = ""

    def fail(msg):
        nonlocal failures, last_problem
        failures += 1
        last_problem = msg
        if failures > retries:
            raise DownloadError(f"download of {url} failed after {failures} attempts: {msg}"
                                + (f" (partial data kept in {part}; re-run to resume)" if part.exists() else ""))
        if retry_wait:
            time.sleep(retry_wait * failures)

    while True:
        offset = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = urlopen(Request(url, headers=headers), timeout=timeout)
        except HTTPError as exc:
            if exc.code == 416 and offset:
                _, total = _content_range(exc.headers.get("Content-Range"))
                total = total or expected_size
                exc.close()
                if total == offset:
                    break  # the .part is already complete
                part.unlink()
                fail("server refused the resume range; restarting")
                continue
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
        except (URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            fail(f"{type(exc).__name__}: {reason}")
            continue
        with resp:
            clen = resp.headers.get("Content-Length")
            clen = int(clen) if clen and clen.isdigit() else None
            if offset and resp.status == 206:
                start, total = _content_range(resp.headers.get("Content-Range"))
                if start != offset:
                    part.unlink()
                    fail(f"server resumed at byte {start}, expected {offset}; restarting")
                    continue
                if total is None and clen is not None:
                    total = offset + clen
                mode = "ab"
            else:
                if offset:
                    print(f"note: {url}: server ignored the Range request; restarting the download",
                          file=sys.stderr)
                offset, mode, total = 0, "wb", clen
            if total is None:
                total = expected_size
            elif expected_size is not None and total != expected_size:
                raise DownloadError(f"{url}: server reports {total} bytes, expected {expected_size}")
            problem = None
            with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                              unit_divisor=1024, desc=dest.name, disable=not progress) as bar:
                try:
                    while True:
                        chunk = resp.read(chunk_size)
                        if not chunk:
                            break
                        fh.write(chunk)
                        bar.update(len(chunk))
                except (http.client.HTTPException, OSError, socket.timeout) as exc:
                    problem = f"connection lost ({type(exc).__name__}: {exc})"
        size = part.stat().st_size
        if total is not None and size > total:
            part.unlink()
            fail(f"received {size} bytes, more than the expected {total}; restarting")
            continue
        if total is not None and size < total:
            fail(problem or f"connection closed after {size} of {total} bytes")
            continue
        if problem and total is None:
            fail(problem)
            continue
        break
    if sha256:
        got = sha256_of(part)
        if got.lower() != sha256.lower():
            part.unlink()
            raise DownloadError(f"sha256 mismatch for {dest.name} from {url}: expected {sha256.lower()}, "
                                f"got {got} (partial file deleted)")
    os.replace(part, dest)
    return dest


def fetch_raw(system: str, molecule: Optional[str], data_root, url: Optional[str] = None,
              sha256: Optional[str] = None, progress: bool = True, retries: int = 3,
              retry_wait: float = 1.0) -> Path:
    """Make sure the raw file of ``system``/``molecule`` is in ``<data_root>/<system>/``
    (download it if absent) and return its path."""
    name = sources.raw_file_name(system, molecule)
    dest = Path(data_root) / system / name
    sha = sha256 or sources.KNOWN_SHA256.get(name)
    if dest.is_file():
        if sha and sha256_of(dest).lower() != sha.lower():
            raise DownloadError(f"existing file {dest} does not match sha256 {sha}; delete it to download again")
        print(f"using existing {dest}", file=sys.stderr)
        return dest
    url = url or sources.source_url(system, molecule)
    print(f"downloading {url} -> {dest}", file=sys.stderr)
    return download_file(url, dest, sha256=sha, expected_size=sources.KNOWN_SIZES.get(name),
                         progress=progress, retries=retries, retry_wait=retry_wait)


# --------------------------------------------------------------------------- pipelines
def _check_sizes(sizes: Sequence[str], scheme: str):
    from mdsim.data.splits import nominal_split_sizes
    for s in sizes:
        nominal_split_sizes(s, 1000, scheme)  # raises DataError on an unknown tag


_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _molecule_for(system: str, molecule: Optional[str], raw: Optional[str]) -> Optional[str]:
    info = SYSTEMS[system]
    if system == "water":
        if molecule:
            raise DataError("--molecule is not used for the water data set")
        return None
    molecule = molecule or info.default_molecule
    if system in ("md17", "md22") and not raw and molecule not in info.files:
        raise DataError(f"unknown {system} molecule '{molecule}'; valid: {', '.join(sorted(info.files))}")
    if not _SAFE_NAME.match(molecule or ""):
        raise DataError(f"--molecule '{molecule}' must only contain letters, digits, '_', '-', '.'")
    return molecule


def prepare(system: str, data_root, molecule: Optional[str] = None, sizes: Optional[Sequence[str]] = None,
            layouts: Sequence[str] = ("random",), url: Optional[str] = None, sha256: Optional[str] = None,
            raw: Optional[str] = None, split_seed: int = sources.SPLIT_SEED, progress: bool = True,
            retries: int = 3, retry_wait: float = 1.0, xtb_options: Optional[dict] = None) -> List[Path]:
    """Download (or generate, for ``xtb``) one raw data set and write its splits."""
    from mdsim.data.splits import fitting_sizes, split_raw_file

    if system not in SYSTEMS:
        raise DataError(f"unknown dataset '{system}'; valid: {', '.join(SYSTEMS)}")
    info = SYSTEMS[system]
    molecule = _molecule_for(system, molecule, raw)
    if sizes is not None:
        _check_sizes(sizes, info.size_scheme)
    if system == "xtb":
        layouts = ("random", "contiguous")  # VACF references need the contiguous layout
        xo = dict(xtb_options or {})
        fallback = xo.pop("fallback_size", "1k")
        _check_sizes([fallback], "frames")
        if raw is None:
            from mdsim.data import xtb
            atoms = xtb.initial_structure(molecule, xo.pop("init", None))
            n_frames = int(xo.pop("n_frames", 20000))
            temperature = float(xo.get("temperature_K", 500.0))
            traj = xtb.generate_xtb_trajectory(atoms, n_frames, progress=progress, name=molecule, **xo)
            raw = xtb.save_raw_npz(xtb.raw_xtb_path(data_root, molecule, temperature), traj)
            print(f"wrote {raw} (mean kinetic temperature {traj['mean_kinetic_temperature_K']:.1f} K)",
                  file=sys.stderr)
            n = n_frames
        else:
            import numpy as np
            try:
                with np.load(raw) as f:
                    n = int(f["R"].shape[0])
            except Exception as exc:
                raise DataError(f"cannot read raw file {raw} ({type(exc).__name__}: {exc})") from exc
        sizes = list(sizes) if sizes is not None else fitting_sizes(n, fallback=fallback)
        return split_raw_file(raw, data_root, "xtb", molecule, sizes, layouts, "frames", split_seed,
                              frame_spacing_fs=None, temperature_K=None)
    downloaded = raw is None
    if downloaded:
        raw = fetch_raw(system, molecule, data_root, url, sha256, progress, retries, retry_wait)
    elif sha256:
        if sha256_of(raw).lower() != sha256.lower():
            raise DownloadError(f"{raw} does not match --sha256 {sha256}")
    sizes = list(sizes) if sizes is not None else list(info.default_sizes)
    try:
        return split_raw_file(raw, data_root, system, molecule, sizes, layouts, info.size_scheme, split_seed,
                              frame_spacing_fs=info.frame_spacing_fs, temperature_K=info.temperature_K)
    except DataError as exc:
        if downloaded and str(exc).startswith("cannot read raw file"):
            raise DataError(f"{exc}; delete {raw} to download it again") from exc
        raise


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_stable_paper_data.py",
        description="Download MD17/MD22/water (or generate GFN2-xTB data) and write train/val/test splits.")
    p.add_argument("--dataset", choices=["md17", "md22", "water", "xtb", "all"], default="all",
                   help="'all' = md17 aspirin, md22 ac_Ala3_NHMe and water (never xtb)")
    p.add_argument("--molecule", help="molecule name (md17/md22/xtb); default aspirin / ac_Ala3_NHMe / ethanol")
    p.add_argument("--data-dir", default="data", help="data root (default: data/)")
    p.add_argument("--url", help="override the download URL of the raw file")
    p.add_argument("--sha256", help="expected sha256 of the raw file")
    p.add_argument("--raw", help="use this existing raw file (MD17-format npz, or water.npy) instead of downloading")
    p.add_argument("--sizes", nargs="+", help="size tags (1k 10k 50k 90k, 5..100percent for md22, or an integer)")
    lay = p.add_mutually_exclusive_group()
    lay.add_argument("--contiguous", action="store_true", help="write only the contiguous layout")
    lay.add_argument("--both", action="store_true", help="write the random and the contiguous layout "
                     "(the default: StABlE needs contiguous splits for its reference VACF)")
    lay.add_argument("--random-only", action="store_true", help="write only the random layout")
    p.add_argument("--split-seed", type=int, default=sources.SPLIT_SEED, help="random split seed (default 123)")
    p.add_argument("--retries", type=int, default=3, help="download resume attempts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("xtb (offline GFN2-xTB reference data)")
    g.add_argument("--frames", type=int, default=20000, help="frames to generate (0.5 fs apart by default)")
    g.add_argument("--temperature", type=float, default=500.0, help="K")
    g.add_argument("--init", help="starting geometry file (ASE-readable)")
    g.add_argument("--seed", type=int, default=0, help="MD random seed")
    g.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs")
    g.add_argument("--timestep-fs", type=float, default=0.5)
    g.add_argument("--equilibration-fs", type=float, default=1000.0)
    g.add_argument("--size", default="1k", help="size tag used (shrunk) when no MD17 size fits the frames")
    return p


def _run(args) -> List[Path]:
    layouts = ("contiguous",) if args.contiguous else (("random",) if args.random_only else ("random", "contiguous"))
    common = dict(layouts=layouts, split_seed=args.split_seed, progress=not args.no_progress,
                  retries=args.retries)
    if args.dataset == "all":
        for opt in ("molecule", "url", "sha256", "raw", "sizes"):
            if getattr(args, opt):
                raise DataError(f"--{opt} needs a single --dataset (md17, md22, water or xtb), not 'all'")
        out = []
        for system in ("md17", "md22", "water"):
            out += prepare(system, args.data_dir, **common)
        return out
    xo = None
    if args.dataset == "xtb":
        if args.url:
            raise DataError("--url is not used for --dataset xtb (data are generated locally)")
        xo = dict(n_frames=args.frames, temperature_K=args.temperature, init=args.init, seed=args.seed,
                  friction_per_fs=args.friction, timestep_fs=args.timestep_fs,
                  equilibration_fs=args.equilibration_fs, fallback_size=args.size)
    return prepare(args.dataset, args.data_dir, molecule=args.molecule, sizes=args.sizes, url=args.url,
                   sha256=args.sha256, raw=args.raw, xtb_options=xo, **common)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.simplefilter("always", UserWarning)
        try:
            written = _run(args)
        except DataError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted (a partial download is kept as <file>.part and resumed next time)",
                  file=sys.stderr)
            return 130
    for p in written:
        print(f"wrote {p}")
    return 0
