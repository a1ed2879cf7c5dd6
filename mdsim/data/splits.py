"""Train/val/test splits of raw trajectories and the on-disk split layout (spec §1.2-1.3).

Public entry points
-------------------
- :func:`plan_split` — frame counts of one size tag (with the shrinking rules for small data).
- :func:`random_split_indices`, :func:`contiguous_split_indices` — the index sets.
- :func:`load_md17_npz`, :func:`load_water_npy` — raw files → one :class:`SplitData` of all
  frames, converted to eV / eV/Å.
- :func:`make_splits` — write size folders (``metadata.npy``/``.json`` + train/val/test
  ``data.npz``) for a set of size tags and layouts.
- :func:`split_raw_file` — all of the above for an MD17-format npz (or ``water.npy``).

Size rules (``frames`` scheme: md17, water, xtb): a tag of S frames gives
train = int(0.95 S), val = int(0.05 S), test = 10,000.  If fewer frames exist, the test set
shrinks to what is left (warning).  If even train+val does not fit with one test frame,
the whole split shrinks: test = min(10,000, ceil(0.2 n)), train+val = n − test with train
int(0.95·(n − test)) (warning; metadata records the actual counts).  Plain integers are
accepted as tags ("200" = 200 train+val frames).  MD22's ``percent`` scheme:
train = int(n·0.7·f), val = int(n·0.1·f), test = int(n·f) − train − val.

Random split (default): the original calls sklearn's ``train_test_split(random_state=123)``
twice — test carved from all frames, then the first train+val frames of the shuffled rest
split again.  We call sklearn when it is importable; otherwise we run the same algorithm
as sklearn's ``ShuffleSplit`` (``np.random.RandomState(seed).permutation``; first n_test
entries = test, the next n_train = train).  That is believed to reproduce sklearn's indices
exactly but has not been checked against sklearn here (not installed), so treat random
splits made without sklearn as not guaranteed bit-identical to the original's.
Index order inside each split is kept (the shuffled order, as the original stores it).
"""
from __future__ import annotations

import math
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from mdsim.data.format import SPLITS, DataError, SplitData, save_metadata, save_split, split_dir
from mdsim.data.sources import FRAME_SIZES, FRAMES_TEST_SIZE, PERCENT_SIZES, SPLIT_SEED
from mdsim.units import KCAL_MOL

#: Assumed unit of ``velocities`` in water.npy, as a factor to Å/fs.  The original code never
#: states it (spec: "unsure"); the file's other units (Å, kcal/mol) are those of LAMMPS/
#: OpenMM "real" units, whose velocity unit is Å/fs, so we assume Å/fs (factor 1).
WATER_VELOCITY_TO_ANG_PER_FS = 1.0

LAYOUTS = ("random", "contiguous")


class SplitWarning(UserWarning):
    """A split had to be shrunk to fit a small data set."""


# --------------------------------------------------------------------------- sizes
@dataclass
class SplitPlan:
    size: str
    n_train: int
    n_val: int
    n_test: int
    nominal: Tuple[int, int, int]
    shrunk: str = ""  # "", "test" or "all"

    @property
    def n_used(self) -> int:
        return self.n_train + self.n_val + self.n_test


def nominal_split_sizes(size: str, n_frames: int, scheme: str) -> Tuple[int, int, int]:
    if scheme == "percent":
        if size not in PERCENT_SIZES:
            raise DataError(f"unknown size '{size}' for a percent-scheme data set; "
                            f"expected one of {', '.join(PERCENT_SIZES)}")
        f = PERCENT_SIZES[size]
        tr = int(n_frames * 0.7 * f)  # same expression order as the original
        va = int(n_frames * 0.1 * f)
        return tr, va, int(n_frames * f) - tr - va
    if scheme != "frames":
        raise ValueError(f"unknown size scheme {scheme!r}")
    if size in FRAME_SIZES:
        lim = FRAME_SIZES[size]
    elif size.isdigit() and int(size) > 0:
        lim = int(size)
    else:
        raise DataError(f"unknown size '{size}'; expected one of {', '.join(FRAME_SIZES)} "
                        "or a positive integer number of train+val frames")
    return int(0.95 * lim), int(0.05 * lim), FRAMES_TEST_SIZE


def plan_split(n_frames: int, size: str, scheme: str = "frames", warn: bool = True) -> SplitPlan:
    """Frame counts for one size tag on a trajectory of ``n_frames`` frames (rules above)."""
    n = int(n_frames)
    tr, va, te = nominal_split_sizes(size, n, scheme)
    nominal = (tr, va, te)
    shrunk = ""
    if tr + va + te > n:
        if tr + va < n:
            te, shrunk = n - tr - va, "test"
        else:
            if n < 3:
                raise DataError(f"size '{size}': only {n} frames, need at least 3 for train/val/test")
            te = min(FRAMES_TEST_SIZE, math.ceil(0.2 * n))
            tv = n - te
            tr = max(1, int(0.95 * tv))
            va = tv - tr
            if va < 1:
                tr, va = tv - 1, 1
            shrunk = "all"
    if min(tr, va, te) < 1:
        raise DataError(f"size '{size}' on {n} frames gives train/val/test = {tr}/{va}/{te}; "
                        "every split needs at least one frame")
    plan = SplitPlan(size, tr, va, te, nominal, shrunk)
    if shrunk and warn:
        warnings.warn(f"size '{size}': only {n} frames (nominal train/val/test {nominal[0]}/"
                      f"{nominal[1]}/{nominal[2]}); using {tr}/{va}/{te}", SplitWarning, stacklevel=2)
    return plan


def fitting_sizes(n_frames: int, candidates: Sequence[str] = ("1k", "10k", "50k"),
                  fallback: str = "1k") -> List[str]:
    """Size tags (frames scheme) that fit a trajectory of ``n_frames`` frames while leaving a
    test share of at least min(10,000, ceil(0.2 n)) frames; ``[fallback]`` (which will be
    shrunk by :func:`plan_split`) when none fits.  Used for generated xTB data."""
    test_min = min(FRAMES_TEST_SIZE, math.ceil(0.2 * n_frames))
    out = [s for s in candidates if n_frames - FRAME_SIZES[s] >= test_min]
    return out or [fallback]


# --------------------------------------------------------------------------- indices
def _sklearn_split():
    try:
        from sklearn.model_selection import train_test_split  # type: ignore
    except Exception:
        return None
    return train_test_split


def random_split_indices(n_frames: int, n_train: int, n_val: int, n_test: int,
                         seed: int = SPLIT_SEED, use_sklearn: Optional[bool] = None
                         ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) frame indices of the original's random split (see module doc).

    ``use_sklearn``: None = when importable, False = always the numpy replica."""
    n = int(n_frames)
    if n_train + n_val + n_test > n or min(n_train, n_val, n_test) < 1:
        raise DataError(f"cannot split {n} frames into train/val/test = {n_train}/{n_val}/{n_test}")
    tts = _sklearn_split() if use_sklearn in (None, True) else None
    if use_sklearn and tts is None:
        raise RuntimeError("use_sklearn=True but sklearn is not importable")
    if tts is not None:
        pool, test = tts(np.arange(n), train_size=n - n_test, test_size=n_test, random_state=seed)
        train_val = pool[: n_train + n_val]
        train, val = tts(train_val, train_size=n_train, test_size=n_val, random_state=seed)
    else:
        perm = np.random.RandomState(seed).permutation(n)
        test, pool = perm[:n_test], perm[n_test:]
        train_val = pool[: n_train + n_val]
        p2 = np.random.RandomState(seed).permutation(n_train + n_val)
        val = train_val[p2[:n_val]]
        train = train_val[p2[n_val:n_val + n_train]]
    return (np.asarray(train, dtype=np.int64), np.asarray(val, dtype=np.int64),
            np.asarray(test, dtype=np.int64))


def contiguous_split_indices(n_train: int, n_val: int, n_test: int
                             ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Consecutive blocks: train [0,tr), val [tr,tr+va), test [tr+va, tr+va+te)."""
    a = np.arange(n_train + n_val + n_test, dtype=np.int64)
    return a[:n_train], a[n_train:n_train + n_val], a[n_train + n_val:]


def split_indices(plan: SplitPlan, n_frames: int, layout: str = "random", seed: int = SPLIT_SEED):
    if layout == "random":
        return random_split_indices(n_frames, plan.n_train, plan.n_val, plan.n_test, seed)
    if layout == "contiguous":
        return contiguous_split_indices(plan.n_train, plan.n_val, plan.n_test)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


# --------------------------------------------------------------------------- raw readers
_SCALAR_META = ("theory", "md_timestep_fs", "temperature_K", "thermostat", "seed",
                "mean_kinetic_temperature_K", "name", "friction_per_fs", "equilibration_fs")


def _scalar(v):
    v = np.asarray(v)
    if v.ndim != 0:
        return None
    v = v.item()
    return v if isinstance(v, (str, int, float, bool)) else str(v)


def _first_sentence(exc) -> str:
    return str(exc).split(". ")[0].strip().replace("\n", " ")[:200]


def load_md17_npz(path) -> Tuple[SplitData, dict]:
    """Read an MD17-format npz (``z``, ``R`` Å, ``E`` kcal/mol, ``F`` kcal/mol/Å; optional
    ``V`` Å/fs and scalar metadata) → (all frames in eV units, scalar metadata dict)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"raw file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("z", "R", "E", "F") if k not in f.files]
            if missing:
                raise DataError(f"{path}: not an MD17-format npz, missing keys {missing} (has {sorted(f.files)})")
            z, R, E, F = (np.asarray(f[k]) for k in ("z", "R", "E", "F"))
            V = np.asarray(f["V"], dtype=np.float64) if "V" in f.files else None
            meta = {}
            for k in _SCALAR_META:
                if k in f.files:
                    s = _scalar(f[k])
                    if s is not None:
                        meta[k] = s
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read raw file {path}: not a valid MD17-format npz "
                        f"({type(exc).__name__}: {_first_sentence(exc)})") from exc
    z = z.reshape(-1)
    if R.ndim != 3 or R.shape[1:] != (z.size, 3):
        raise DataError(f"{path}: R has shape {R.shape}, expected (frames, {z.size}, 3)")
    T = R.shape[0]
    if E.size != T or F.shape != R.shape:
        raise DataError(f"{path}: E {E.shape} / F {F.shape} do not match R {R.shape}")
    if V is not None and V.shape != R.shape:
        raise DataError(f"{path}: V has shape {V.shape}, expected {R.shape}")
    if not (np.isfinite(R).all() and np.isfinite(E).all() and np.isfinite(F).all()):
        raise DataError(f"{path}: contains non-finite values in R/E/F")
    data = SplitData(R=R.astype(np.float64), z=z.astype(np.int64),
                     E=E.reshape(-1).astype(np.float64) * KCAL_MOL,
                     F=F.astype(np.float64) * KCAL_MOL, fid=np.arange(T), V=V)
    return data, meta


def load_water_npy(path) -> SplitData:
    """Read the pickled water.npy dict (spec §1.1) → all frames: R = wrapped coords,
    R_unwrapped, V (× :data:`WATER_VELOCITY_TO_ANG_PER_FS`), cell, pbc, molecule_index,
    E/F converted from kcal/mol.  Needs ``allow_pickle`` (trusted file)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"raw file {path} does not exist")
    try:
        obj = np.load(path, allow_pickle=True)
        d = obj.item() if isinstance(obj, np.ndarray) and obj.dtype == object and obj.ndim == 0 else obj
    except Exception as exc:
        raise DataError(f"cannot read raw file {path}: not a valid water.npy "
                        f"({type(exc).__name__}: {_first_sentence(exc)})") from exc
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    need = ("wrapped_coords", "unwrapped_coords", "velocities", "atom_types", "lengths", "energy", "forces")
    missing = [k for k in need if k not in d]
    if missing:
        raise DataError(f"{path}: water file lacks keys {missing} (has {sorted(d)})")
    R = np.asarray(d["wrapped_coords"], dtype=np.float64)
    if R.ndim != 3 or R.shape[2] != 3:
        raise DataError(f"{path}: wrapped_coords has shape {R.shape}, expected (frames, atoms, 3)")
    T, N = R.shape[:2]
    z = np.asarray(d["atom_types"]).reshape(-1).astype(np.int64)
    if z.size != N:
        raise DataError(f"{path}: atom_types has {z.size} entries, expected {N}")
    if N % 3 or not (np.all(z[0::3] == 8) and np.all(z[1::3] == 1) and np.all(z[2::3] == 1)):
        raise DataError(f"{path}: atom_types do not follow the O,H,H per-molecule ordering")
    arrs = {}
    for k in ("unwrapped_coords", "velocities", "forces"):
        arrs[k] = np.asarray(d[k], dtype=np.float64)
        if arrs[k].shape != R.shape:
            raise DataError(f"{path}: {k} has shape {arrs[k].shape}, expected {R.shape}")
    E = np.asarray(d["energy"], dtype=np.float64).reshape(-1)
    if E.size != T:
        raise DataError(f"{path}: energy has {E.size} values, expected {T}")
    lengths = np.broadcast_to(np.asarray(d["lengths"], dtype=np.float64), (T, 3))
    angles = np.broadcast_to(np.asarray(d.get("angles", np.full(3, 90.0)), dtype=np.float64), (T, 3))
    if np.allclose(angles, 90.0):
        cell = lengths[:, :, None] * np.eye(3)[None]
    else:
        from ase.geometry import cellpar_to_cell
        cell = np.stack([cellpar_to_cell(np.concatenate([l, a])) for l, a in zip(lengths, angles)])
    for name, a in (("wrapped_coords", R), ("energy", E), ("forces", arrs["forces"]), ("lengths", lengths)):
        if not np.isfinite(a).all():
            raise DataError(f"{path}: {name} contains non-finite values")
    return SplitData(R=R, z=z, E=E * KCAL_MOL, F=arrs["forces"] * KCAL_MOL, fid=np.arange(T),
                     cell=np.ascontiguousarray(cell), pbc=np.ones(3, dtype=bool),
                     V=arrs["velocities"] * WATER_VELOCITY_TO_ANG_PER_FS,
                     R_unwrapped=arrs["unwrapped_coords"], molecule_index=np.arange(N) // 3)


# --------------------------------------------------------------------------- writing
def write_size_folder(folder, splits: Dict[str, SplitData], meta_extra: Optional[dict] = None) -> Path:
    """Write one size folder atomically: everything goes to a hidden staging folder that is
    renamed into place at the end (an existing folder is replaced)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = folder.parent / f".{folder.name}.staging-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        save_metadata(stage, splits["train"], meta_extra)
        for name in SPLITS:
            save_split(stage / name, splits[name])
        if folder.exists():
            os.replace(folder, old)
        os.replace(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def make_splits(data: SplitData, data_root, name: str, molecule: Optional[str],
                sizes: Iterable[str], layouts: Sequence[str] = ("random",), scheme: str = "frames",
                seed: int = SPLIT_SEED, meta_extra: Optional[dict] = None) -> List[Path]:
    """Write ``<data_root>/[contiguous-]<name>/[<molecule>/]<size>/`` for every size tag and
    layout.  ``data`` holds all frames (eV units).  All plans are checked before anything is
    written; each size folder appears complete or not at all.  Returns the folders written."""
    n = len(data)
    sizes = list(sizes)
    for lay in layouts:
        if lay not in LAYOUTS:
            raise DataError(f"unknown layout '{lay}'; expected one of {', '.join(LAYOUTS)}")
    plans = [plan_split(n, s, scheme) for s in sizes]
    method = ("sklearn.model_selection.train_test_split" if _sklearn_split() is not None
              else "numpy RandomState permutation (sklearn ShuffleSplit algorithm; sklearn absent)")
    out = []
    for plan in plans:
        for lay in layouts:
            idx = split_indices(plan, n, lay, seed)
            parts = {s: data.subset(i) for s, i in zip(SPLITS, idx)}
            meta = dict(meta_extra or {})
            meta.update({
                "system": name, "molecule": molecule, "size": plan.size, "layout": lay,
                "n_frames_raw": n, "n_val": plan.n_val, "n_test": plan.n_test,
                "nominal_train_val_test": list(plan.nominal), "shrunk": plan.shrunk,
                "split_seed": seed if lay == "random" else None,
                "split_method": method if lay == "random" else "contiguous blocks",
                "frame_spacing_fs": data.frame_spacing_fs, "temperature_K": data.temperature_K,
                "units": {"R": "Angstrom", "E": "eV", "F": "eV/Angstrom", "V": "Angstrom/fs"},
            })
            folder = split_dir(data_root, name, molecule, plan.size, contiguous=(lay == "contiguous"))
            out.append(write_size_folder(folder, parts, meta))
    return out


def split_raw_file(raw_path, data_root, name: str = "md17", molecule: Optional[str] = None,
                   sizes: Optional[Iterable[str]] = None, layouts: Sequence[str] = ("random",),
                   scheme: str = "frames", seed: int = SPLIT_SEED,
                   frame_spacing_fs: Optional[float] = None, temperature_K: Optional[float] = None
                   ) -> List[Path]:
    """Split a raw MD17-format npz (or ``water.npy`` when ``name == 'water'``) into the
    layout of docs/data.md.  ``sizes`` None: every MD17 size that fits (:func:`fitting_sizes`).
    Frame spacing / temperature default to the file's ``md_timestep_fs`` / ``temperature_K``."""
    meta_extra = {"source_file": str(raw_path)}
    if name == "water":
        data = load_water_npy(raw_path)
    else:
        data, raw_meta = load_md17_npz(raw_path)
        meta_extra.update({f"raw_{k}": v for k, v in raw_meta.items()})
        if frame_spacing_fs is None and "md_timestep_fs" in raw_meta:
            frame_spacing_fs = float(raw_meta["md_timestep_fs"])
        if temperature_K is None and "temperature_K" in raw_meta:
            temperature_K = float(raw_meta["temperature_K"])
    data.frame_spacing_fs = None if frame_spacing_fs is None else float(frame_spacing_fs)
    data.temperature_K = None if temperature_K is None else float(temperature_K)
    if sizes is None:
        sizes = fitting_sizes(len(data)) if scheme == "frames" else ["100percent"]
    return make_splits(data, data_root, name, molecule, sizes, layouts, scheme, seed, meta_extra)
