"""Schema of QM pretraining configs (``configs/pretraining/**``), spec §8.2."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from .core import ConfigError, option


@dataclass
class DatasetConfig:
    src: str = option("data", "Data root written by download_stable_paper_data.py (original: a "
                      "split folder; a path ending in /train is accepted and its root used).")
    name: str = option("md17", "Dataset family: md17, md22, water or xtb.")
    molecule: Optional[str] = option("aspirin", "Molecule (null for water).")
    size: str = option("1k", "Size tag: 1k, 10k, 50k (md17/xtb), 25percent (md22), ...")
    contiguous: bool = option(False, "(new) Use the contiguous splits.")
    normalize_labels: bool = option(False, "True: energies (E−mean)/std and forces /std (water); False: "
                                    "subtract the mean energy only.")


@dataclass
class LoggerConfig:
    name: str = option("tensorboard", "Logger: tensorboard (wandb is accepted and mapped to tensorboard).",
                       choices=("tensorboard", "wandb", "none"))
    project: str = option("mdbench", "Project tag (kept in the logs).")


@dataclass
class TaskConfig:
    dataset: str = option("lmdb", "Compatibility (no effect).", compat=True)
    type: str = option("regression", "Compatibility (no effect).", compat=True)
    metric: str = option("mae", "Compatibility (no effect).", compat=True)
    labels: List[str] = option(default_factory=lambda: ["potential energy"], doc="Compatibility.", compat=True)
    grad_input: str = option("atomic forces", "Compatibility (no effect).", compat=True)
    description: str = option("", "Compatibility (no effect).", compat=True)
    train_on_free_atoms: bool = option(True, "Compatibility (no effect).", compat=True)
    eval_on_free_atoms: bool = option(True, "Compatibility (no effect).", compat=True)


@dataclass
class OptimConfig:
    batch_size: int = option(100, "Training batch size (frames).", min=1)
    eval_batch_size: int = option(100, "Validation batch size.", min=1)
    num_workers: int = option(0, "Compatibility (no effect: data live in memory).", compat=True)
    lr_initial: float = option(1e-3, "Initial learning rate.", min=0.0)
    optimizer: str = option("Adam", "Optimizer.", choices=("Adam", "AdamW", "SGD"))
    optimizer_params: Dict = option(default_factory=dict, doc="Extra optimizer kwargs (amsgrad, eps, "
                                    "weight_decay, ...).")
    scheduler: str = option("ReduceLROnPlateau", "LR scheduler.", choices=("ReduceLROnPlateau", "none"))
    patience: int = option(5, "Plateau patience (epochs).", min=0)
    factor: float = option(0.8, "Plateau factor.", min=0.0, max=1.0)
    min_lr: float = option(1e-6, "Plateau minimum LR.", min=0.0)
    lr_gamma: float = option(0.1, "Compatibility (no effect).", compat=True)
    warmup_steps: int = option(0, "Linear LR warm-up steps (the original's warm-up keys were inert; "
                               "0 = off).", min=0)
    warmup_factor: float = option(0.2, "Warm-up starts at warmup_factor·lr_initial.", min=0.0, max=1.0)
    max_epochs: int = option(10000, "Epoch limit.", min=1)
    energy_coefficient: float = option(0.05, "Energy loss coefficient c_E.", min=0.0)
    force_coefficient: float = option(0.95, "Force loss coefficient c_F.", min=0.0)
    loss_energy: str = option("mse", "Energy loss.", choices=("mse", "mae", "l2mae"))
    loss_force: str = option("mse", "Force loss.", choices=("mse", "mae", "l2mae"))
    ema_decay: Optional[float] = option(None, "EMA decay of the weights (null = off).", min=0.0, max=1.0)
    clip_grad_norm: Optional[float] = option(None, "Gradient-norm clip (null = off).", min=0.0)
    early_stopping_time: float = option(604800.0, "Wall-time limit (s).", min=0.0)
    early_stopping_lr: float = option(1e-6, "Stop once LR ≤ this.", min=0.0)
    checkpoint_every: int = option(1, "Write checkpoint.pt every this many epochs.", min=1)


@dataclass
class ModelConfig:
    """``name`` plus the model's hyperparameters (checked against the model's signature)."""
    __allow_extra__ = True
    name: str = option("schnet", "Model name (schnet, nequip, dimenet_pp, gemnet_t).")

    def validate(self, where=""):
        from mdsim.models.registry import INERT_KEYS, ModelConfigError, model_hyperparameter_names

        from .core import closest_key
        try:
            allowed = model_hyperparameter_names(self.name)
        except ModelConfigError as exc:
            raise ConfigError(str(exc)) from None
        for k in self.extra:
            if k not in allowed and k not in INERT_KEYS:
                raise ConfigError(f"unknown key '{where}.{k}' for model '{self.name}'"
                                  f"{closest_key(k, list(allowed))}")


@dataclass
class PretrainConfig:
    trainer: str = option("trainer", "Compatibility (single trainer).", compat=True)
    dataset: DatasetConfig = option(default_factory=DatasetConfig, doc="Training data.")
    logger: LoggerConfig = option(default_factory=LoggerConfig, doc="Logging.")
    task: TaskConfig = option(default_factory=TaskConfig, doc="Compatibility section.")
    optim: OptimConfig = option(default_factory=OptimConfig, doc="Optimisation.")
    model: ModelConfig = option(default_factory=ModelConfig, doc="Model architecture.")
    seed: int = option(0, "Random seed.")
    run_dir: str = option("MODELPATH", "Output root; runs go to <run_dir>/<dsname>_<size>_<model>/.")
    identifier: str = option("", "Extra tag appended to the run folder name.")
    device: str = option("auto", "(new) cpu, cuda, cuda:N or auto.")
    amp: bool = option(False, "Compatibility (no effect).", compat=True)
    print_every: int = option(200, "Compatibility (progress shown by tqdm).", compat=True)
    progress: bool = option(True, "(new) tqdm progress bars.")
