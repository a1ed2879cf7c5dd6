"""Model registry: names → classes, hyperparameter validation, config translation."""
from __future__ import annotations

import inspect
from typing import Dict, Tuple

from .base import PotentialModel
from .dimenet_pp import DimeNetPPModel
from .gemnet_t import GemNetTModel, fit_scale_factors_on_split
from .nequip import NequIPModel, average_num_neighbors
from .nequip_pkg import NequIPPackageModel, forces_rms
from .schnet import SchNetModel

MODEL_REGISTRY: Dict[str, type] = {
    "schnet": SchNetModel,
    "nequip": NequIPPackageModel,      # the nequip package (extra [nequip])
    "nequip_e3nn": NequIPModel,        # our NequIP-style e3nn model (no extra dependency)
    "dimenet_pp": DimeNetPPModel,
    "gemnet_t": GemNetTModel,
}

ALIASES = {"dimenetplusplus": "dimenet_pp", "dimenet++": "dimenet_pp", "dimenet_plus_plus": "dimenet_pp",
           "gemnet-t": "gemnet_t", "gemnett": "gemnet_t", "nequip-e3nn": "nequip_e3nn"}

#: keys of the original's ``model:`` config sections that have no effect here (graphs are always
#: built on the fly, PBC follows the presence of a cell, forces are always −∂E/∂r) — unless the
#: model's own signature takes the key (GemNet-T: ``scale_file``, ``max_neighbors``, ...).
INERT_KEYS = frozenset({"name", "otf_graph", "use_pbc", "regress_forces", "direct_forces",
                        "extensive", "scale_file", "max_neighbors"})


class ModelConfigError(ValueError):
    """Unknown model name or hyperparameter."""


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in MODEL_REGISTRY:
        raise ModelConfigError(f"model.name: unknown model {name!r}; expected one of "
                               f"{sorted(MODEL_REGISTRY)} (aliases {sorted(ALIASES)})")
    return key


def model_hyperparameter_names(name: str):
    cls = MODEL_REGISTRY[canonical_name(name)]
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_model(name: str, **hyperparameters) -> PotentialModel:
    """Build a model by registry name; unknown hyperparameters raise :class:`ModelConfigError`
    (inert keys of the original's configs, ``INERT_KEYS``, are dropped)."""
    key = canonical_name(name)
    allowed = model_hyperparameter_names(key)
    hp = {k: v for k, v in hyperparameters.items() if k not in INERT_KEYS or k in allowed}
    unknown = sorted(set(hp) - set(allowed))
    if unknown:
        raise ModelConfigError(f"model: unknown hyperparameter(s) {unknown} for {key!r}; "
                               f"expected some of {allowed}")
    return MODEL_REGISTRY[key](**hp)


def split_model_config(model_cfg: Dict) -> Tuple[str, Dict]:
    """``{'name': 'schnet', 'cutoff': 5, ...}`` → ('schnet', {'cutoff': 5, ...})."""
    if not isinstance(model_cfg, dict) or "name" not in model_cfg:
        raise ModelConfigError(f"model: expected a mapping with a 'name' key, got {model_cfg!r}")
    name = canonical_name(model_cfg["name"])
    allowed = set(model_hyperparameter_names(name))
    hp = {k: v for k, v in model_cfg.items() if k not in INERT_KEYS or k in allowed}
    return name, hp


def resolve_hyperparameters(name: str, hyperparameters: Dict, data=None) -> Dict:
    """Replace data-dependent ``"auto"`` values using a training split
    (:class:`mdsim.data.format.SplitData`): NequIP's ``avg_num_neighbors`` (mean neighbour count
    within r_max over up to 100 frames), ``species`` (sorted atomic numbers present) and, for
    ``nequip``, ``per_type_energy_scales`` (RMS of the training forces); GemNet-T's ``scale_file`` (scale factors fitted on up to 16 frames, see
    :func:`mdsim.models.gemnet_t.fit_scale_factors_on_split`)."""
    key = canonical_name(name)
    hp = dict(hyperparameters)
    if key == "gemnet_t" and hp.get("scale_file") == "auto":
        if data is None:
            raise ModelConfigError("model: scale_file set to 'auto' needs training data to fit the scale factors")
        hp["scale_file"] = fit_scale_factors_on_split(hp, data)
    if key not in ("nequip", "nequip_e3nn"):
        return hp
    needs = [k for k in ("avg_num_neighbors", "species", "per_type_energy_scales") if hp.get(k) == "auto"]
    if needs and data is None:
        raise ModelConfigError(f"model: {needs} set to 'auto' need training data to resolve")
    if hp.get("species") == "auto":
        hp["species"] = sorted(int(z) for z in set(data.z.tolist()))
    if hp.get("avg_num_neighbors") == "auto":
        idx = slice(0, min(len(data), 100))
        cell = None if data.cell is None else data.cell[idx]
        hp["avg_num_neighbors"] = average_num_neighbors(data.R[idx], float(hp.get("r_max", 5.0)), cell)
    if hp.get("per_type_energy_scales") == "auto":
        hp["per_type_energy_scales"] = forces_rms(data.F)
    return hp


def model_from_config(model_cfg: Dict, data=None) -> PotentialModel:
    """Build from a ``model:`` config section (resolving ``"auto"`` values from ``data``)."""
    name, hp = split_model_config(model_cfg)
    hp.pop("name", None)
    return build_model(name, **resolve_hyperparameters(name, hp, data))
