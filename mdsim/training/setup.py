"""Resolve what a StABlE run needs from its config: data splits, the System, checkpoints and
the run folder.  Pure lookups, no simulation."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from mdsim.config import StableConfig
from mdsim.config.stable import EVAL_MODEL_RE
from mdsim.data.format import DataError, SplitData, load_split, split_dir
from mdsim.md.stability import RDFReference, get_criterion, rdf_reference
from mdsim.md.system import System


class SetupError(RuntimeError):
    """A file or setting needed by the run is missing or inconsistent."""


def dataset_tag(cfg) -> str:
    return f"{cfg.name}-{cfg.molecule}" if cfg.molecule else cfg.name


def run_folder(cfg: StableConfig) -> Path:
    """``<log_dir>/<results_dir>/<model>_<molecule|name>_<exp_name>_lr=<lr>_efweight=<w>``."""
    tag = f"{cfg.model}_{cfg.molecule or cfg.name}_{cfg.exp_name}_lr={cfg.lr:g}_efweight={cfg.energy_force_loss_weight:g}"
    return Path(cfg.log_dir) / cfg.results_dir / tag


def split(cfg: StableConfig, which: str, size: Optional[str] = None, contiguous: bool = False) -> SplitData:
    return load_split(split_dir(cfg.src, cfg.name, cfg.molecule, size or cfg.size, which, contiguous))


def reference_size(cfg: StableConfig) -> str:
    return cfg.max_size or cfg.size


def build_system(cfg: StableConfig, train: SplitData, dtype=torch.float32) -> System:
    crit = get_criterion(cfg.stability_criterion)
    if crit.needs_molecules and train.molecule_index is None:
        raise SetupError(f"stability_criterion '{crit.name}' needs molecule membership in the data "
                         f"(key molecule_index in {cfg.src}/{cfg.name}/.../data.npz); this dataset has none — "
                         "use bond_length_deviation")
    ref = criterion_reference(cfg, train) if crit.needs_reference else None
    return System.from_split(train, stability_criterion=crit.name, stability_tolerance=getattr(cfg, crit.tolerance_key),
                             dtype=dtype, rdf_reference=ref)


def criterion_reference(cfg: StableConfig, train: SplitData) -> RDFReference:
    """Reference RDF of the ``rdf`` criterion on the evaluation's grid (``max_rdf_dist``, ``dr``)
    from the reference split (``max_size`` train, else ``train``; ≤ 2000 evenly spaced frames),
    Boltzmann-reweighted from the data temperature to ``temperature`` like the RDF references."""
    from mdsim.observables import boltzmann_reweighting

    try:
        data = split(cfg, "train", reference_size(cfg))
    except Exception:
        data = train
    idx = np.unique(np.linspace(0, len(data) - 1, min(len(data), 2000)).round().astype(int))
    w, _ = boltzmann_reweighting(data.E[idx], cfg.temperature,
                                 cfg.data_temperature or data.temperature_K or 500.0)
    cell = None if data.cell is None or not np.any(data.pbc) else data.cell[idx]
    try:
        return rdf_reference(data.R[idx], data.z, cell, cfg.max_rdf_dist, cfg.dr, weights=w)
    except ValueError as exc:
        raise SetupError(str(exc))


def pretrained_checkpoint(cfg: StableConfig, size: Optional[str] = None) -> Path:
    """The pretrained checkpoint: ``pretrained_checkpoint`` if set, else the first existing of
    ``<model_dir>/<model>/<tag>_<size>_[lmax=<l>_]<model>/checkpoints/<file>`` and
    ``<model_dir>/<tag>_<size>_<model>/checkpoints/<file>`` (the layout pretraining.py writes)."""
    if cfg.pretrained_checkpoint and size is None:
        p = Path(cfg.pretrained_checkpoint)
        if not p.is_file():
            raise SetupError(f"pretrained_checkpoint: file not found: {p}")
        return p
    size = size or cfg.size
    fname = "best_checkpoint.pt" if cfg.checkpoint_epoch == -1 else "checkpoint.pt"
    names = [f"{dataset_tag(cfg)}_{size}_{cfg.model}"]
    if cfg.model == "nequip":
        names.insert(0, f"{dataset_tag(cfg)}_{size}_lmax={cfg.l_max}_{cfg.model}")
    cands: List[Path] = []
    for n in names:
        cands += [Path(cfg.model_dir) / cfg.model / n / "checkpoints" / fname,
                  Path(cfg.model_dir) / n / "checkpoints" / fname]
    for c in cands:
        if c.is_file():
            return c
    raise SetupError("pretrained checkpoint not found; looked for " + ", ".join(str(c) for c in cands)
                     + " (run pretraining.py first or set pretrained_checkpoint)")


def eval_checkpoint(cfg: StableConfig) -> Path:
    """Checkpoint selected by ``eval_model`` (spec §7)."""
    em = cfg.eval_model
    m = EVAL_MODEL_RE.fullmatch(em)
    if not m:
        raise SetupError(f"eval_model: unknown value {em!r}")
    if em == "pre":
        return pretrained_checkpoint(cfg)
    if em.endswith("k") or em.endswith("percent"):
        return pretrained_checkpoint(cfg, size=em)
    if em.startswith("lmax="):
        c = StableConfig(**{**cfg.__dict__, "l_max": int(em[5:])})
        return pretrained_checkpoint(c)
    folder = run_folder(cfg)
    if em == "post":
        p = folder / "ckpt.pt"
    elif m.group(2):
        p = folder / f"cycle{m.group(1)}_epoch{m.group(2)}.pt"
    else:
        p = folder / f"end_of_cycle{m.group(1)}.pt"
    if not p.is_file():
        have = sorted(x.name for x in folder.glob("*.pt")) if folder.is_dir() else []
        raise SetupError(f"eval_model {em!r}: checkpoint {p} not found"
                         + (f" (the run folder has {have})" if have else " (no StABlE run in that folder yet)"))
    return p


def vacf_stride(frame_spacing_fs: Optional[float], timestep_fs: float) -> int:
    """Simulation steps between VACF samples so they match the data's frame spacing."""
    if not frame_spacing_fs:
        return 1
    return max(1, int(math.ceil(frame_spacing_fs / timestep_fs - 1e-9)))


def check_compatible(cfg: StableConfig, data: SplitData, ckpt: dict, path: Path) -> None:
    """Fail early when the checkpoint cannot describe this config's system."""
    name = ckpt.get("model_name")
    if not name:  # the original's configs hold model: {name: ...} or model: "schnet"
        model = (ckpt.get("config") or {}).get("model") if isinstance(ckpt.get("config"), dict) else None
        name = model.get("name") if isinstance(model, dict) else model
    if name and str(name).lower().replace("++", "_pp") not in (cfg.model, cfg.model.replace("-", "_")):
        raise SetupError(f"{path} holds a '{name}' model but the config says model: {cfg.model}")
    if data.n_atoms < 2:
        raise DataError("the training split has fewer than 2 atoms per frame")
