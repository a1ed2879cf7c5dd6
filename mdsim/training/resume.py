"""``resume.pt``: everything a StABlE run needs to continue bit-exactly after an interruption.

Written atomically by rank 0 after every epoch.  Format version 1 (the key ``version``; files
without it, written before the key existed, have the same layout and load as version 1):

    config          the run's config (dict); a resumed run must have the same settings except
                    the keys in :data:`RESUMABLE_CHANGES`
    model           model state dict
    state           global MD state (all replicas) to continue from
    learn_start     global MD state the current learning cycle restarts from, or None
    saved_starts    earlier start states for random resets (global, oldest first)
    flagged         (R,) bool: replicas unstable since the last learning phase
    gen, shuffle_gen  torch.Generator states (MD/velocities/resets; estimator sample order)
    ef_gen          torch.Generator state of the energy/force frame subsets
                    (``energy_force_frames_per_epoch``); absent in files written before it
                    existed, whose runs cannot have set that key (a fresh generator is used)
    optimizer, scheduler  state dicts
    world_size      number of processes that wrote it (informational: any world size resumes)
    phase           {learning, cycle, learn_epoch, epoch (epochs done), lr}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from mdsim.md.state import MDState

from .phases import Phase
from .setup import SetupError

RESUME_VERSION = 1
#: config keys that may differ between the run that wrote resume.pt and the run resuming it: the
#: run length, display, the evaluated model, how the MD steps run (backend, neighbour-list skin:
#: the same dynamics to float rounding), and the run's name (a run folder copied under another
#: exp_name continues as that run, e.g. a longer variant of a finished run)
RESUMABLE_CHANGES = frozenset({"n_epochs", "progress", "eval_model", "md_backend", "neighbor_skin",
                               "radial_table_spacing", "exp_name"})


def state_to_dict(s: MDState) -> dict:
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in s.__dict__.items()}


def state_from_dict(d: dict, device) -> MDState:
    return MDState(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in d.items()})


@dataclass
class ResumeState:
    """The content of ``resume.pt`` (MD states held as :class:`MDState`, all replicas)."""
    config: dict
    model: dict
    state: MDState
    learn_start: Optional[MDState]
    saved_starts: List[MDState]
    flagged: torch.Tensor
    gen: torch.Tensor
    shuffle_gen: torch.Tensor
    optimizer: dict
    scheduler: dict
    phase: Phase
    epoch: int
    lr: float
    world_size: int = 1
    ef_gen: Optional[torch.Tensor] = None
    version: int = field(default=RESUME_VERSION)

    def to_dict(self) -> dict:
        return {"version": self.version, "config": self.config, "model": self.model,
                "state": state_to_dict(self.state),
                "learn_start": state_to_dict(self.learn_start) if self.learn_start is not None else None,
                "saved_starts": [state_to_dict(s) for s in self.saved_starts], "gen": self.gen,
                "flagged": self.flagged.cpu(), "shuffle_gen": self.shuffle_gen, "ef_gen": self.ef_gen, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "world_size": self.world_size,
                "phase": {"learning": self.phase.learning, "cycle": self.phase.cycle,
                          "learn_epoch": self.phase.learn_epoch, "epoch": self.epoch, "lr": self.lr}}

    @classmethod
    def from_dict(cls, d: dict, device="cpu") -> "ResumeState":
        version = d.get("version", 1)
        if version != RESUME_VERSION:
            raise SetupError(f"resume.pt format version {version} is not supported (this code reads "
                             f"version {RESUME_VERSION})")
        p = d["phase"]
        return cls(config=d["config"], model=d["model"], state=state_from_dict(d["state"], device),
                   learn_start=state_from_dict(d["learn_start"], device) if d["learn_start"] else None,
                   saved_starts=[state_from_dict(s, device) for s in d["saved_starts"]],
                   flagged=d["flagged"].to(device), gen=d["gen"], shuffle_gen=d["shuffle_gen"],
                   optimizer=d["optimizer"], scheduler=d["scheduler"],
                   phase=Phase(p["learning"], p["cycle"], p["learn_epoch"]), epoch=p["epoch"], lr=p["lr"],
                   world_size=d.get("world_size", 1), ef_gen=d.get("ef_gen"), version=version)

    def save(self, path: Path) -> None:
        from mdsim.atomic import atomic_torch_save
        atomic_torch_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: Path, device="cpu") -> "ResumeState":
        return cls.from_dict(torch.load(path, map_location="cpu", weights_only=False), device)


def check_resumable(saved: dict, current: dict, default: dict, path: Path) -> None:
    """Raise :class:`SetupError` if the run that wrote ``path`` had other settings than
    ``current`` (keys missing from an older run's config count as their ``default``)."""
    if saved == current:
        return
    old = {**default, **saved}
    changed = sorted(k for k in set(old) | set(current) if old.get(k) != current.get(k))
    if set(changed) - RESUMABLE_CHANGES:
        raise SetupError(f"{path} belongs to a run with other settings ({changed}); "
                         "use another exp_name or delete the folder")
