"""Checkpoints: our format, and loading the original implementation's SchNet checkpoints.

Our checkpoint is a ``torch.save``'d dict::

    {"format": "mdsim-checkpoint", "format_version": 1,
     "model_name": "schnet", "hyperparameters": {...},
     "state_dict": {...},                # includes target_mean/target_std/atom_ref buffers
     "normalizers": {"target": {"mean", "std"}, "grad_target": {...}},
     ...extra: optimizer, scheduler, epoch, step, config, val_metrics, ema_state_dict, ...}

The original's (MDsim/OCP trainer) checkpoints hold ``state_dict`` (keys prefixed ``module.``),
``normalizers`` and ``config`` (``model``/``model_attributes`` and ``dataset.target_mean``);
:func:`load_model` converts them (SchNet only).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from mdsim.atomic import atomic_torch_save

from .base import PotentialModel
from .nequip_pkg import is_nequip_file, model_from_nequip_file
from .registry import INERT_KEYS, build_model, canonical_name

FORMAT = "mdsim-checkpoint"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "model_name", "hyperparameters", "state_dict", "normalizers")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model it claims."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    pass


def save_checkpoint(path, model: PotentialModel, extra: Optional[Dict] = None) -> Path:
    """Write ``model`` (name, hyperparameters, state dict, normalisers) plus ``extra`` atomically
    (temporary file in the same folder, then ``os.replace``).  Returns the path."""
    if not isinstance(model, PotentialModel):
        raise CheckpointError(f"save_checkpoint: expected a PotentialModel, got {type(model).__name__}")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise CheckpointError(f"save_checkpoint: extra keys {clash} are reserved")
    ckpt = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model.model_name,
        "hyperparameters": dict(model.hyperparameters),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "normalizers": model.normalizers(),
    }
    ckpt.update(extra)
    return atomic_torch_save(ckpt, path)


def load_checkpoint_dict(path, map_location="cpu") -> Dict:
    """The raw checkpoint dict (clear errors for a missing or unreadable file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            # the original's checkpoints may pickle other objects (numpy scalars in configs)
            ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def _is_ours(ckpt: Dict) -> bool:
    return ckpt.get("format") == FORMAT and "model_name" in ckpt


def _model_name(ckpt: Dict) -> str:
    """Registry name of one of our checkpoints; our e3nn NequIP-style model was registered as
    ``nequip`` before ``nequip`` meant the nequip package (its weights have no ``net.`` prefix)."""
    name = ckpt["model_name"]
    if str(name).lower() == "nequip" and not any(k.startswith("net.") for k in ckpt["state_dict"]):
        return "nequip_e3nn"
    return name


def _read_yaml(path: Path) -> Dict:
    import yaml

    try:
        with open(path) as fh:
            cfg = yaml.safe_load(fh)
    except Exception as exc:
        raise CheckpointError(f"cannot read config {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config {path} is not a mapping")
    return cfg


def _original_model_spec(config: Dict, state_dict: Dict, source: str) -> Tuple[str, Dict]:
    """Model name and hyperparameters from an original (OCP-style) config."""
    model = config.get("model")
    if isinstance(model, str):
        name, attrs = model, dict(config.get("model_attributes") or {})
    elif isinstance(model, dict):
        attrs = dict(model)
        name = attrs.pop("name", None)
    else:
        raise CheckpointError(f"{source}: config has no 'model' section")
    if name is None:  # the StABlE-trained checkpoints' config lacks the model name
        if any(k.endswith("interactions.0.conv.lin1.weight") for k in state_dict):
            name = "schnet"
        else:
            raise CheckpointError(f"{source}: config 'model' section has no 'name'")
    name = str(name).lower()
    if name != "schnet":
        raise CheckpointError(f"{source}: original checkpoints of model {name!r} are not supported "
                              "(only 'schnet'; NequIP/GemNet checkpoints of the original cannot be loaded)")
    hp = {k: v for k, v in attrs.items() if k not in INERT_KEYS}
    return "schnet", hp


def _original_target(ckpt: Dict, config: Dict) -> Tuple[float, float]:
    """(mean, std) of the energy normaliser: the config's float64 dataset.target_mean if present
    (the normaliser tensors are its float32 rounding), else ``normalizers['target']``."""
    ds = config.get("dataset")
    if isinstance(ds, list):
        ds = ds[0] if ds else {}
    ds = ds or {}
    norm = (ckpt.get("normalizers") or {}).get("target") or {}
    mean = ds.get("target_mean", norm.get("mean"))
    std = ds.get("target_std", norm.get("std"))
    mean = 0.0 if mean is None else float(mean)
    std = 1.0 if std is None else float(std)
    return mean, std


def _check_state_dict(model: PotentialModel, state: Dict, source: str):
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shape:
            parts.append(f"shape mismatch {shape[:3]}{' ...' if len(shape) > 3 else ''}")
        raise CheckpointError(f"{source} does not fit model {model.model_name!r} "
                              f"{model.hyperparameters}: " + "; ".join(parts))


def convert_original_checkpoint(ckpt: Dict, source: str = "checkpoint",
                                config: Optional[Dict] = None) -> Tuple[str, Dict, Dict]:
    """(model name, hyperparameters, our state dict) from an original SchNet checkpoint dict."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: no 'state_dict' entry")
    config = config if config is not None else ckpt.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: no 'config' entry and no config.yml beside it")
    name, hp = _original_model_spec(config, state, source)
    out = {}
    for k, v in state.items():
        k = k[len("module."):] if k.startswith("module.") else k
        if k == "atomic_mass":  # buffer of older PyG SchNet versions, unused (no dipole)
            continue
        out[k] = v
    mean, std = _original_target(ckpt, config)
    out["target_mean"] = torch.tensor(mean, dtype=torch.float64)
    out["target_std"] = torch.tensor(std, dtype=torch.float64)
    out.setdefault("atom_ref", torch.zeros(119, dtype=torch.float64))
    return name, hp, out


def load_weights(model: PotentialModel, source, strict_name: bool = True) -> Dict:
    """Load a checkpoint (path or dict, ours or the original's) into an existing model; raises
    :class:`CheckpointError` naming the model and the first offending keys on mismatch."""
    if isinstance(source, (str, os.PathLike)):
        label = f"checkpoint {source}"
        ckpt = load_checkpoint_dict(source)
    else:
        label, ckpt = "checkpoint", source
    if _is_ours(ckpt):
        name, state = _model_name(ckpt), ckpt["state_dict"]
    else:
        name, _, state = convert_original_checkpoint(ckpt, label)
    if strict_name and canonical_name(name) != model.model_name:
        raise CheckpointError(f"{label} holds model {name!r}, not {model.model_name!r}")
    _check_state_dict(model, state, label)
    model.load_state_dict(state)
    return ckpt


def load_model(path, device="cpu", expected_model: Optional[str] = None,
               config_path=None) -> Tuple[PotentialModel, Dict]:
    """Rebuild a model from a checkpoint file (ours, the original's SchNet checkpoints, or a
    ``.ckpt``/``.nequip.zip`` of nequip's own tools as ``model: nequip``).

    For the original's checkpoints the hyperparameters come from the checkpoint's ``config``
    entry, else from ``config_path`` or a ``config.yml`` beside the file; energy normalisation
    from ``config.dataset.target_mean/target_std`` or ``normalizers['target']``.
    ``expected_model``: raise if the checkpoint holds another model.  Returns (model in eval
    mode on ``device``, checkpoint dict)."""
    path = Path(path)
    if is_nequip_file(path):  # a file of nequip's own tools (.ckpt, .nequip.zip)
        model, ckpt = model_from_nequip_file(path, device)
        if expected_model is not None and canonical_name(expected_model) != model.model_name:
            raise CheckpointError(f"{path} is a nequip file, expected model {expected_model!r}")
        return model, ckpt
    ckpt = load_checkpoint_dict(path)
    label = f"checkpoint {path}"
    if _is_ours(ckpt):
        name, hp, state = _model_name(ckpt), dict(ckpt.get("hyperparameters") or {}), ckpt["state_dict"]
    elif isinstance(ckpt.get("state_dict"), dict):
        config = ckpt.get("config")
        if not isinstance(config, dict):
            cfg_file = Path(config_path) if config_path else path.parent / "config.yml"
            if not cfg_file.is_file():
                raise CheckpointError(f"{label} has no 'config' entry and {cfg_file} does not exist")
            config = _read_yaml(cfg_file)
        name, hp, state = convert_original_checkpoint(ckpt, label, config)
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CheckpointError(f"{label} is a bare state dict (e.g. NequIP's best_model.pth) without "
                              "model name/hyperparameters; not loadable")
    else:
        raise CheckpointError(f"{label} is not a model checkpoint (keys {sorted(ckpt)[:8]})")
    if expected_model is not None and canonical_name(expected_model) != canonical_name(name):
        raise CheckpointError(f"{label} holds model {name!r}, expected {expected_model!r}")
    try:
        model = build_model(name, **hp)
    except Exception as exc:
        raise CheckpointError(f"{label}: cannot build model {name!r} from {hp}: {exc}") from exc
    _check_state_dict(model, state, label)
    dtypes = {v.dtype for k, v in state.items()
              if k not in ("target_mean", "target_std", "atom_ref") and v.is_floating_point()}
    if dtypes == {torch.float64}:
        model.double()
    model.load_state_dict(state)
    model.to(device)
    model.eval()
    return model, ckpt
