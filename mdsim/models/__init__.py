"""Interatomic potentials behind one interface (see :mod:`mdsim.models.base`, docs/models.md)."""
from .base import (ModelInputError, PotentialModel, batch_from_frames, energy_and_forces)
from .checkpoint import CheckpointError, load_checkpoint_dict, load_model, save_checkpoint
from .dimenet_pp import DimeNetPPModel
from .nequip import NequIPModel, average_num_neighbors
from .nequip_pkg import NequIPPackageModel, nequip_available
from .registry import (ALIASES, MODEL_REGISTRY, ModelConfigError, build_model, canonical_name,
                       model_from_config, resolve_hyperparameters, split_model_config)
from .schnet import SchNetModel

__all__ = [
    "PotentialModel", "energy_and_forces", "batch_from_frames", "ModelInputError",
    "MODEL_REGISTRY", "ALIASES", "build_model", "canonical_name", "model_from_config",
    "resolve_hyperparameters", "split_model_config", "ModelConfigError",
    "SchNetModel", "NequIPModel", "NequIPPackageModel", "nequip_available", "DimeNetPPModel", "average_num_neighbors",
    "save_checkpoint", "load_model", "load_checkpoint_dict", "CheckpointError",
]
