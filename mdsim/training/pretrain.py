"""QM pretraining: fit a model to energies and forces of a dataset split.

Energy + force loss with the config's coefficients, Adam/AdamW/SGD, optional linear warm-up,
ReduceLROnPlateau on the validation force MAE, early stop on the minimum LR or wall time,
optional EMA of the weights and gradient clipping.  Each epoch writes ``checkpoint.pt``
(everything needed to resume: optimizer, scheduler, EMA, RNG states, history) and, when the
validation force MAE improves, ``best_checkpoint.pt`` — both atomically.  Rerunning the same
command continues where it stopped.

Under ``torchrun --nproc_per_node=N`` the model is wrapped in DistributedDataParallel and
every global batch of ``optim.batch_size`` frames (the same permutation on every rank) is split
into N disjoint contiguous slices, one per rank; each rank's loss is scaled so that DDP's
gradient average equals the gradient of the global batch's loss.  Validation frames are
sharded and the error sums all-reduced; only rank 0 writes checkpoints and logs
(docs/distributed.md).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from mdsim.config import PretrainConfig, to_dict
from mdsim.data.format import DataError, SplitData, load_metadata, load_split, split_dir
from mdsim.models import batch_from_frames, build_model, energy_and_forces, resolve_hyperparameters
from mdsim.models.checkpoint import load_model, save_checkpoint

from . import distributed
from .io import rng_state, seed_everything, set_rng_state, write_yaml


def dataset_name(name: str, molecule: Optional[str]) -> str:
    """The original's dataset tag: ``md17-aspirin``, ``water``."""
    return f"{name}-{molecule}" if molecule else name


def run_folder(cfg: PretrainConfig) -> Path:
    d = cfg.dataset
    tag = f"{dataset_name(d.name, d.molecule)}_{d.size}_{cfg.model.name}"
    if cfg.identifier:
        tag += f"_{cfg.identifier}"
    return Path(cfg.run_dir) / tag


def data_root(cfg: PretrainConfig) -> Path:
    src = Path(cfg.dataset.src)
    # accept the original's style, src pointing at a split folder: <root>/<name>/<mol>/<size>/train
    if src.name in ("train", "val", "test") and (src / "data.npz").exists():
        src = src.parents[2 if cfg.dataset.molecule else 1]
        src = src.parent if src.name in (cfg.dataset.name, f"contiguous-{cfg.dataset.name}") else src
    return src


def load_splits(cfg: PretrainConfig, splits=("train", "val")) -> Dict[str, SplitData]:
    d = cfg.dataset
    out = {}
    for s in splits:
        out[s] = load_split(split_dir(data_root(cfg), d.name, d.molecule, d.size, s, d.contiguous))
    return out


# ----------------------------------------------------------------------------- losses
def _loss(kind: str, pred: torch.Tensor, target: torch.Tensor, per_atom_vectors: bool) -> torch.Tensor:
    diff = pred - target
    if kind == "mse":
        return (diff ** 2).mean()
    if kind == "mae":
        return diff.abs().mean()
    if kind == "l2mae":
        return diff.norm(dim=-1).mean() if per_atom_vectors else diff.abs().mean()
    raise ValueError(f"unknown loss {kind!r}")


class EnergyForceLoss:
    """c_E·ℓ_E((Ê−E)/s_E) + c_F·ℓ_F((F̂−F)/s_F); scales s are 1 unless labels are normalised."""

    def __init__(self, optim, e_scale: float = 1.0, f_scale: float = 1.0, keep_energy_graph: bool = False):
        self.c_e, self.c_f = float(optim.energy_coefficient), float(optim.force_coefficient)
        self.l_e, self.l_f = optim.loss_energy, optim.loss_force
        self.e_scale, self.f_scale = float(e_scale), float(f_scale)
        # DDP: with c_E = 0 parameters that only shift the energy (a readout bias) get no
        # gradient and DDP would wait for it; a zero-weighted energy term keeps them in the graph
        self.keep_energy_graph = bool(keep_energy_graph)

    def __call__(self, model, R, z, E, F, cell=None):
        """Loss (with graph) and the batch's predictions for frames R (B,N,3)."""
        inp = batch_from_frames(R, z, cell, device=R.device, dtype=R.dtype)
        e_pred, f_pred = energy_and_forces(model, create_graph=True, **inp)
        loss = 0.0
        if self.c_e:
            loss = loss + self.c_e * _loss(self.l_e, (e_pred - E) / self.e_scale, torch.zeros_like(E), False)
        elif self.keep_energy_graph:
            loss = loss + 0.0 * e_pred.sum()
        if self.c_f:
            loss = loss + self.c_f * _loss(self.l_f, (f_pred - F.reshape(-1, 3)) / self.f_scale,
                                           torch.zeros_like(f_pred), True)
        return loss, e_pred.detach(), f_pred.detach()


# ----------------------------------------------------------------------------- metrics
@torch.no_grad()
def _noop():
    pass


def evaluate(model, split: SplitData, batch_size: int, device, dtype=torch.float32,
             max_frames: Optional[int] = None, progress: bool = False,
             comm: Optional["distributed.Comm"] = None) -> Dict[str, float]:
    """Energy/force MAE and RMSE (eV, eV/Å) of ``model`` on ``split``, and the mean signed energy
    error ``energy_bias`` (prediction − reference, eV: the constant part of the energy error).

    With a distributed ``comm`` each rank evaluates a contiguous shard of the frames and the
    error sums are all-reduced (every rank returns the same metrics)."""
    n = len(split) if max_frames is None else min(len(split), max_frames)
    se = ae = sf = af = be = 0.0
    nf = 0
    model.eval()
    lo, hi = (0, n) if comm is None else comm.shard(n)
    for s in tqdm(range(lo, hi, batch_size), disable=not progress, desc="evaluate", leave=False):
        sl = slice(s, min(hi, s + batch_size))
        inp = batch_from_frames(split.R[sl], split.z, None if split.cell is None else split.cell[sl],
                                device=device, dtype=dtype)
        e, f = energy_and_forces(model, **inp)
        de = e.cpu().double().numpy() - split.E[sl]
        df = f.cpu().double().numpy().reshape(split.F[sl].shape) - split.F[sl]
        ae += np.abs(de).sum()
        se += (de ** 2).sum()
        be += de.sum()
        af += np.abs(df).sum()
        sf += (df ** 2).sum()
        nf += df.size
    if comm is not None and comm.distributed:
        ae, se, af, sf, nf, be = comm.sum_floats(ae, se, af, sf, nf, be)
    return {"energy_mae": ae / n, "energy_rmse": math.sqrt(se / n),
            "forces_mae": af / nf, "forces_rmse": math.sqrt(sf / nf), "energy_bias": be / n}


def refit_energy_offset(model, split: SplitData, batch_size: int, device, dtype=torch.float32,
                        comm: Optional["distributed.Comm"] = None) -> float:
    """Refit the model's per-structure energy constant (``target_mean``) to ``split``: shift it by
    minus the mean energy error there, the least-squares constant.  Forces, and so the dynamics,
    do not change.  Returns the shift (eV).

    A StABlE run's clipped steps can move the predicted energies by a constant (the observable's
    gradient, a covariance over configurations, cannot correct it); refitting the constant on the
    QM training data afterwards removes that part of the energy error."""
    if not hasattr(model, "set_normalization"):
        raise TypeError(f"{type(model).__name__} has no energy normalisation to refit")
    shift = -evaluate(model, split, batch_size, device, dtype, comm=comm)["energy_bias"]
    model.set_normalization(mean=float(model.target_mean) + shift)
    return shift


# ----------------------------------------------------------------------------- EMA
class EMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def model_copy(self, model):
        m = copy.deepcopy(model)
        m.load_state_dict(self.shadow)
        return m


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    run_dir: Path
    epochs: int
    best_val: Dict[str, float]
    stopped: str


def build_from_config(cfg: PretrainConfig, meta: dict, train_split: SplitData):
    hp = resolve_hyperparameters(cfg.model.name, dict(cfg.model.extra), train_split)
    model = build_model(cfg.model.name, **hp)
    if cfg.dataset.normalize_labels:
        model.set_normalization(mean=meta["e_mean"], std=meta["f_std"])
    else:
        model.set_normalization(mean=meta["e_mean"], std=1.0)
    return model


def train(cfg: PretrainConfig, fresh: bool = False, log=print) -> TrainResult:
    comm = distributed.setup(cfg.device)
    device = comm.device
    main = comm.is_main
    W = comm.world_size
    if not main:
        log = _quiet
    dtype = torch.float32
    out = run_folder(cfg)
    ckdir = out / "checkpoints"
    splits = load_splits(cfg)
    train_s, val_s = splits["train"], splits["val"]
    if len(train_s) == 0 or len(val_s) == 0:
        raise DataError("train and val splits must be non-empty")
    meta = load_metadata(split_dir(data_root(cfg), cfg.dataset.name, cfg.dataset.molecule, cfg.dataset.size,
                                   None, cfg.dataset.contiguous))
    seed_everything(cfg.seed)
    model = build_from_config(cfg, meta, train_s).to(device)
    o = cfg.optim
    opt_cls = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD}[o.optimizer]
    optimizer = opt_cls(model.parameters(), lr=o.lr_initial, **o.optimizer_params)
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=o.factor,
                                                            patience=o.patience, min_lr=o.min_lr)
                 if o.scheduler == "ReduceLROnPlateau" else None)
    ema = EMA(model, o.ema_decay) if o.ema_decay else None
    loss_fn = EnergyForceLoss(o, e_scale=meta["e_std"] if cfg.dataset.normalize_labels else 1.0,
                              f_scale=meta["f_std"] if cfg.dataset.normalize_labels else 1.0,
                              keep_energy_graph=comm.distributed)
    state = {"epoch": 0, "step": 0, "best_forces_mae": math.inf, "history": [], "elapsed": 0.0}

    resume = ckdir / "checkpoint.pt"
    if resume.exists() and not fresh:
        ck = torch.load(resume, map_location=device, weights_only=False)
        if ck.get("model_name") != cfg.model.name or ck.get("hyperparameters") != model.hyperparameters:
            raise RuntimeError(f"{resume} was written for model {ck.get('model_name')} "
                               f"{ck.get('hyperparameters')}, not this config's {cfg.model.name} "
                               f"{model.hyperparameters}; use --fresh or another run_dir")
        model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and ck.get("scheduler"):
            scheduler.load_state_dict(ck["scheduler"])
        if ema is not None and ck.get("ema"):
            ema.shadow = {k: v.to(device) for k, v in ck["ema"].items()}
        state = ck["trainer_state"]
        set_rng_state(ck["rng"])
        log(f"resuming from {resume} at epoch {state['epoch']}")
    if main:
        write_yaml(ckdir / "config.yml", to_dict(cfg))
    # every rank built the same model from the same seed (or checkpoint); DDP also broadcasts
    # rank 0's parameters when it wraps the model
    net = distributed.wrap_ddp(model, comm)
    if comm.distributed:
        log(f"distributed pretraining: {W} processes ({device.type}), global batch {o.batch_size} frames")

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out / "logs")) if (cfg.logger.name != "none" and main) else None

    R = torch.as_tensor(train_s.R, dtype=dtype, device=device)
    E = torch.as_tensor(train_s.E, dtype=torch.float64, device=device)
    F = torch.as_tensor(train_s.F, dtype=dtype, device=device)
    cell = None if train_s.cell is None else torch.as_tensor(train_s.cell, dtype=dtype, device=device)
    z = torch.as_tensor(train_s.z, device=device)
    n = len(train_s)
    stopped = "max_epochs"
    t_start = time.time() - state["elapsed"]
    bar = tqdm(total=o.max_epochs, initial=state["epoch"], desc="pretraining", disable=not (cfg.progress and main))
    while state["epoch"] < o.max_epochs:
        model.train()
        perm = torch.randperm(n)  # same on every rank (same seed / restored RNG state)
        tot, nb = 0.0, 0
        for s in range(0, n, o.batch_size):
            idx = perm[s:s + o.batch_size]
            scale = None
            if comm.distributed:  # this rank's contiguous slice of the global batch
                a, b = comm.shard(idx.numel())
                scale = W * (b - a) / idx.numel()  # DDP averages over ranks: weight by frames
                idx = idx[a:b] if b > a else idx[:1]  # an empty slice still takes part (weight 0)
            idx = idx.to(device)
            if o.warmup_steps and state["step"] < o.warmup_steps:
                frac = o.warmup_factor + (1 - o.warmup_factor) * state["step"] / o.warmup_steps
                for g in optimizer.param_groups:
                    g["lr"] = o.lr_initial * frac
            loss, _, _ = loss_fn(net, R[idx], z, E[idx], F[idx], None if cell is None else cell[idx])
            optimizer.zero_grad(set_to_none=True)
            if scale is None:
                loss.backward()
            else:
                (loss * scale).backward()
            if o.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad_norm)
            optimizer.step()
            if ema is not None:
                ema.update(model)
            tot += float(loss.detach()) if scale is None else float(loss.detach()) * scale / W
            nb += 1
            state["step"] += 1
        if comm.distributed:
            (tot,) = comm.sum_floats(tot)  # sum over ranks of the weighted shard losses
        state["epoch"] += 1
        eval_model = ema.model_copy(model) if ema is not None else model
        val = evaluate(eval_model, val_s, o.eval_batch_size, device, dtype, comm=comm)
        if scheduler is not None and not (o.warmup_steps and state["step"] < o.warmup_steps):
            scheduler.step(val["forces_mae"])
        lr = optimizer.param_groups[0]["lr"]
        rec = {"epoch": state["epoch"], "train_loss": tot / max(nb, 1), "lr": lr,
               **{f"val_{k}": v for k, v in val.items()}}
        state["history"].append(rec)
        if writer is not None:
            for k, v in rec.items():
                if k != "epoch":
                    writer.add_scalar(k, v, state["epoch"])
            writer.flush()
        bar.update(1)
        bar.set_postfix(loss=f"{rec['train_loss']:.4g}", val_f_mae=f"{val['forces_mae']:.4g}", lr=f"{lr:.2g}")
        # rank 0's clock decides the wall-time stop for everyone
        state["elapsed"] = comm.broadcast_float(time.time() - t_start)
        extra = {"config": to_dict(cfg), "val_metrics": val,
                 "epoch": state["epoch"], "step": state["step"]}
        if val["forces_mae"] < state["best_forces_mae"]:
            state["best_forces_mae"] = val["forces_mae"]
            state["best_val"] = val
            if main:
                save_checkpoint(ckdir / "best_checkpoint.pt", eval_model, extra)
        if main and (state["epoch"] % o.checkpoint_every == 0 or state["epoch"] >= o.max_epochs):
            save_checkpoint(ckdir / "checkpoint.pt", model, {
                **extra, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "ema": ema.shadow if ema is not None else None, "trainer_state": state, "rng": rng_state()})
        if lr <= o.early_stopping_lr:
            stopped = "min_lr"
            break
        if state["elapsed"] > o.early_stopping_time:
            stopped = "wall_time"
            break
    bar.close()
    if writer is not None:
        writer.close()
    comm.check_same(model)
    return TrainResult(out, state["epoch"], state.get("best_val", {}), stopped)


def _quiet(*args, **kwargs):
    pass


def evaluate_checkpoint(cfg: PretrainConfig, checkpoint: Path, split: str, max_frames=None) -> Dict[str, float]:
    """Errors of ``checkpoint`` on ``split`` (frames sharded over ranks under torchrun)."""
    comm = distributed.setup(cfg.device)
    model, _ = load_model(checkpoint, device=comm.device)
    data = load_splits(cfg, (split,))[split]
    return evaluate(model, data, cfg.optim.eval_batch_size, comm.device, max_frames=max_frames,
                    progress=cfg.progress and comm.is_main, comm=comm)
