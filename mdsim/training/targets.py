"""Observables of a StABlE run: reference values from data, per-replica monitoring values, and
the training observable matched by the Boltzmann estimator.

Everything is configured by :class:`mdsim.config.StableConfig` and the :class:`System`; no
system names are tested.  Reference RDFs use the same functions as the simulated ones (the
smeared RDF for the loss, the histogram RDF for metrics), so the loss compares like with like.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from mdsim import observables as obs
from mdsim.data.format import DataError, SplitData
from mdsim.estimator import squared_error_loss
from mdsim.md.system import System

#: frames of the reference split used for the reference RDF (evenly subsampled)
MAX_REFERENCE_FRAMES = 2000


@dataclass
class References:
    rdf_smeared: Tensor  # (M,) sums to 100
    rdf_hist: Tensor  # (H,) histogram RDF (density), reweighted
    adf: Tensor  # (n_bins,)
    vacf: Optional[Tensor]  # (W,) or None when no contiguous data
    bond_lengths: Tensor  # (B,)
    ess: float  # effective sample size of the RDF reweighting
    data_temperature: float

    def as_numpy(self) -> dict:
        out = {"gt_rdf": self.rdf_hist.cpu().numpy(), "gt_rdf_smeared": self.rdf_smeared.cpu().numpy(),
               "gt_adf": self.adf.cpu().numpy(), "gt_bond_lengths": self.bond_lengths.cpu().numpy()}
        if self.vacf is not None:
            out["gt_vacf"] = self.vacf.cpu().numpy()
        return out


class ObservableSet:
    """Observable functions bound to one run's settings."""

    def __init__(self, cfg, system: System, vacf_stride: int = 1):
        self.cfg = cfg
        self.system = system
        self.r_max, self.dr, self.sigma = float(cfg.max_rdf_dist), float(cfg.dr), float(cfg.gaussian_width)
        self.triplets = obs.angle_triplets(system.bonds)
        self.adf_cutoff = obs.default_adf_bond_cutoff(system.n_atoms)
        self.angle_range = tuple(cfg.angle_range)
        self.vacf_window = int(cfg.vacf_window)
        self.vacf_stride = int(vacf_stride)
        self.cell = system.cell if system.pbc else None

    # ---- per-structure observables (..., N, 3) -> (..., K)
    def rdf_smeared(self, pos: Tensor) -> Tensor:
        return obs.smeared_rdf(pos, self.r_max, self.dr, self.sigma, cell=self._cell(pos))

    def rdf_hist(self, pos: Tensor) -> Tensor:
        return obs.histogram_rdf(pos, self.r_max, self.dr, cell=self._cell(pos))

    def adf(self, pos: Tensor) -> Tensor:
        return obs.adf(pos, self.triplets, cell=self._cell(pos), bond_cutoff=self.adf_cutoff,
                       angle_range=self.angle_range)

    def bond_lengths(self, pos: Tensor) -> Tensor:
        return obs.bond_lengths(pos, self.system.bonds.to(pos.device), cell=self._cell(pos))

    def min_imd(self, pos: Tensor) -> Tensor:
        return obs.min_intermolecular_distance(pos, self.system.molecule_index.to(pos.device),
                                               cell=self._cell(pos))

    def _cell(self, pos):
        return None if self.cell is None else self.cell.to(pos)

    # ---- time series
    def vacf(self, velocities: Tensor) -> Tensor:
        """velocities (T, R, N, 3) sampled every ``vacf_stride`` steps → (R, W), averaged over
        windows of W samples (every ``n_dump_vacf``-th window)."""
        return obs.windowed_vacf(velocities, self.vacf_window, self.cfg.n_dump_vacf)

    # ---- references
    def references(self, ref_split: SplitData, temperature: float, contiguous: Optional[SplitData],
                   data_temperature: Optional[float], adf_frames: int = 50) -> References:
        t_data = data_temperature or ref_split.temperature_K or 500.0
        n = len(ref_split)
        idx = np.unique(np.linspace(0, n - 1, min(n, MAX_REFERENCE_FRAMES)).round().astype(int))
        R = torch.as_tensor(ref_split.R[idx], dtype=torch.float64)
        E = torch.as_tensor(ref_split.E[idx], dtype=torch.float64)
        w, ess = obs.boltzmann_reweighting(E, temperature, t_data)
        rdf_s = (w[:, None] * self.rdf_smeared(R)).sum(0)
        rdf_h = (w[:, None] * self.rdf_hist(R)).sum(0)
        adf = self.adf(torch.as_tensor(ref_split.R[:adf_frames], dtype=torch.float64)).mean(0)
        vacf = None
        if contiguous is not None:
            T = len(contiguous)
            if T > self.vacf_window + 1:
                frames = torch.as_tensor(contiguous.R, dtype=torch.float64)[:, None]
                vacf = obs.vacf_from_positions(frames, self.vacf_window).reshape(-1)
            else:
                warnings.warn(f"contiguous split has {T} frames, fewer than vacf_window+2; no reference VACF")
        return References(rdf_smeared=rdf_s, rdf_hist=rdf_h, adf=adf, vacf=vacf,
                          bond_lengths=self.system.ref_bond_lengths.to(torch.float64), ess=ess,
                          data_temperature=float(t_data))


@dataclass
class TrainingObservable:
    """What the Boltzmann estimator matches: per-sample values and a loss of their mean."""
    name: str
    samples: Callable[[Tensor], Tensor]  # (S, N, 3) -> (S, K)
    loss: Callable[[Tensor], Tensor]  # mean (K,) -> scalar


def training_observable(name: str, oset: ObservableSet, refs: References) -> TrainingObservable:
    sq = squared_error_loss
    if name == "rdf":
        return TrainingObservable(name, oset.rdf_smeared, sq(refs.rdf_smeared))
    if name == "adf":
        return TrainingObservable(name, oset.adf, sq(refs.adf))
    if name == "bond_length_dev":
        return TrainingObservable(name, oset.bond_lengths, sq(refs.bond_lengths))
    if name == "imd":
        if oset.system.molecule_index is None:
            raise DataError("training_observable 'imd' needs molecule membership (molecule_index) in the data")
        return TrainingObservable(name, lambda p: oset.min_imd(p)[..., None],
                                  lambda m: obs.imd_hinge_loss(m).sum())
    raise ValueError(f"training_observable {name!r} cannot be matched by the Boltzmann estimator "
                     "(it must be a function of positions: rdf, adf, bond_length_dev or imd)")
