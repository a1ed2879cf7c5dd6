"""On-disk format of dataset splits (see docs/design.md and docs/data.md).

Each split is one ``data.npz`` with positions in Å, energies in eV, forces in eV/Å and
optional velocities in Å/fs.  Files are written atomically (temporary name, then rename).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np

from mdsim.atomic import atomic_write

SPLITS = ("train", "val", "test")
_OPTIONAL = ("cell", "pbc", "V", "R_unwrapped", "molecule_index", "frame_spacing_fs", "temperature_K")


class DataError(RuntimeError):
    """A dataset file is missing or malformed."""


@dataclass
class SplitData:
    R: np.ndarray  # (n, N, 3) Å
    z: np.ndarray  # (N,)
    E: np.ndarray  # (n,) eV
    F: np.ndarray  # (n, N, 3) eV/Å
    fid: np.ndarray  # (n,) frame indices in the raw trajectory
    cell: Optional[np.ndarray] = None  # (n, 3, 3) Å
    pbc: Optional[np.ndarray] = None  # (3,) bool
    V: Optional[np.ndarray] = None  # (n, N, 3) Å/fs
    R_unwrapped: Optional[np.ndarray] = None
    molecule_index: Optional[np.ndarray] = None  # (N,)
    frame_spacing_fs: Optional[float] = None
    temperature_K: Optional[float] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.R = np.asarray(self.R, dtype=np.float64)
        self.z = np.asarray(self.z, dtype=np.int64).reshape(-1)
        self.E = np.asarray(self.E, dtype=np.float64).reshape(-1)
        self.F = np.asarray(self.F, dtype=np.float64)
        self.fid = np.asarray(self.fid, dtype=np.int64).reshape(-1)
        n, N = self.R.shape[0], self.z.shape[0]
        if self.R.shape != (n, N, 3):
            raise DataError(f"R has shape {self.R.shape}, expected (frames, {N}, 3)")
        if self.F.shape != self.R.shape:
            raise DataError(f"F has shape {self.F.shape}, expected {self.R.shape}")
        if self.E.shape != (n,) or self.fid.shape != (n,):
            raise DataError(f"E/fid have shapes {self.E.shape}/{self.fid.shape}, expected ({n},)")

    def __len__(self):
        return self.R.shape[0]

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])

    def subset(self, idx) -> "SplitData":
        idx = np.asarray(idx)
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("R", "E", "F", "fid", "cell", "V", "R_unwrapped") and v is not None:
                v = v[idx]
            kw[f.name] = v
        return SplitData(**kw)


def split_dir(data_root, name: str, molecule: Optional[str], size: str, split: Optional[str] = None,
              contiguous: bool = False) -> Path:
    """Folder of one split: ``<root>/[contiguous-]<name>/<molecule>/<size>/<split>``.

    ``molecule`` is None/empty for systems without a molecule level (water)."""
    p = Path(data_root) / (f"contiguous-{name}" if contiguous else name)
    if molecule:
        p = p / molecule
    p = p / size
    return p / split if split else p


def save_split(directory, data: SplitData) -> Path:
    directory = Path(directory)
    arrays = {"R": data.R, "z": data.z, "E": data.E, "F": data.F, "fid": data.fid}
    for k in _OPTIONAL:
        v = getattr(data, k)
        if v is not None:
            arrays[k] = np.asarray(v)
    for k, v in data.extra.items():
        arrays[k] = np.asarray(v)
    out = directory / "data.npz"

    def w(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(out, w)
    return out


def load_split(directory) -> SplitData:
    path = Path(directory) / "data.npz"
    if not path.is_file():
        raise DataError(f"missing split file {path} (run download_stable_paper_data.py first)")
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except Exception as exc:  # corrupt zip etc.
        raise DataError(f"cannot read {path}: {exc}") from exc
    for k in ("R", "z", "E", "F", "fid"):
        if k not in d:
            raise DataError(f"{path} lacks key '{k}' (has {sorted(d)})")
    kw = {k: d.pop(k) for k in ("R", "z", "E", "F", "fid")}
    for k in _OPTIONAL:
        if k in d:
            v = d.pop(k)
            kw[k] = float(v) if v.ndim == 0 and k in ("frame_spacing_fs", "temperature_K") else v
    kw["extra"] = d
    return SplitData(**kw)


def save_metadata(directory, train: SplitData, extra: Optional[dict] = None) -> dict:
    """Write ``metadata.npy`` (pickled dict, as the original) and ``metadata.json``.

    ``extra`` (JSON-serialisable) is merged into both, after the train-split statistics
    ``e_mean, e_std, f_mean, f_std, n_train`` (which it cannot override)."""
    meta = dict(extra or {})
    meta.update({
        "e_mean": float(train.E.mean()),
        "e_std": float(train.E.std()),
        "f_mean": float(train.F.mean()),
        "f_std": float(train.F.std()),
        "n_train": int(len(train)),
    })
    directory = Path(directory)

    def w_npy(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, meta, allow_pickle=True)

    atomic_write(directory / "metadata.npy", w_npy)
    atomic_write(directory / "metadata.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
    return meta


def load_metadata(directory) -> dict:
    p = Path(directory) / "metadata.json"
    if p.is_file():
        return json.loads(p.read_text())
    p = Path(directory) / "metadata.npy"
    if p.is_file():
        return dict(np.load(p, allow_pickle=True).item())
    raise DataError(f"missing metadata in {directory}")
