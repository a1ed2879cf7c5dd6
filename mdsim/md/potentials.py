"""Analytic potentials, batched over replicas, for tests and benchmarks.

Every potential is a callable ``pot(positions (R,N,3), cell (R,3,3)|None) -> (energy (R,),
forces (R,N,3))`` with closed-form forces (no autograd), in eV and eV/Å.  Wrap one in
:class:`mdsim.md.forces.PotentialForceField` to use it in the simulator.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mdsim.geometry import minimum_image


class HarmonicOscillators:
    """Independent isotropic oscillators tethered to sites: E = Σ_i ½ k_i |x_i − c_i|².

    ``k``: scalar or (N,) eV/Å²; ``centers``: (N,3) or (R,N,3) Å (default: origin).
    Optional quartic term ``quartic`` λ (scalar or (N,)): + Σ_{i,α} ¼ λ_i (x_iα − c_iα)⁴.
    """

    def __init__(self, k, centers: Optional[Tensor] = None, quartic=None):
        self.k = torch.as_tensor(k)
        self.centers = centers
        self.quartic = None if quartic is None else torch.as_tensor(quartic)

    def _per_atom(self, p, x):
        p = p.to(dtype=x.dtype, device=x.device)
        return p if p.ndim == 0 else p.reshape(1, -1, 1)

    def __call__(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        d = positions if self.centers is None else positions - self.centers.to(positions)
        k = self._per_atom(self.k, d)
        e = 0.5 * k * d * d
        f = -k * d
        if self.quartic is not None:
            lam = self._per_atom(self.quartic, d)
            d3 = d * d * d
            e = e + 0.25 * lam * d3 * d
            f = f - lam * d3
        return e.sum(dim=(1, 2)), f


class HarmonicBonds:
    """Harmonic springs E = Σ_b ½ k (|r_j − r_i| − r0_b)² over bonds (B,2); minimum image when a
    cell is given.  With springs between nearest neighbours of a lattice this is a harmonic
    crystal."""

    def __init__(self, bonds: Tensor, r0: Tensor, k: float):
        self.bonds = torch.as_tensor(bonds, dtype=torch.long)
        self.r0 = torch.as_tensor(r0)
        self.k = float(k)

    def __call__(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        b = self.bonds.to(positions.device)
        vec = minimum_image(positions[:, b[:, 1]] - positions[:, b[:, 0]], cell)  # (R,B,3)
        d = vec.norm(dim=-1)
        dr = d - self.r0.to(positions)
        e = 0.5 * self.k * (dr * dr).sum(dim=1)
        fj = -(self.k * dr / d).unsqueeze(-1) * vec  # force on atom j
        f = torch.zeros_like(positions)
        f.index_add_(1, b[:, 1], fj)
        f.index_add_(1, b[:, 0], -fj)
        return e, f


class LennardJones:
    """Lennard-Jones pairs within ``rc`` (default 3σ), same convention as ASE's
    ``LennardJones(smooth=False)``: pair energy shifted by its value at rc, force truncated
    (not shifted).  All pairs with minimum image when a cell is given (needs rc < L/2)."""

    def __init__(self, epsilon: float = 1.0, sigma: float = 1.0, rc: Optional[float] = None):
        self.epsilon = float(epsilon)
        self.sigma = float(sigma)
        self.rc = 3.0 * self.sigma if rc is None else float(rc)

    def __call__(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        R, N, _ = positions.shape
        vec = positions[:, None, :, :] - positions[:, :, None, :]  # (R,N,N,3): r_j - r_i
        if cell is not None:  # per-replica cells (R,3,3)
            vec = minimum_image(vec.reshape(R, -1, 3), cell).reshape(vec.shape)
        eye = torch.eye(N, dtype=torch.bool, device=positions.device)
        r2 = (vec * vec).sum(-1).masked_fill(eye, 1.0)
        inside = (r2 <= self.rc ** 2) & ~eye
        c6 = torch.where(inside, (self.sigma ** 2 / r2) ** 3, torch.zeros_like(r2))
        c12 = c6 * c6
        e0 = 4 * self.epsilon * ((self.sigma / self.rc) ** 12 - (self.sigma / self.rc) ** 6)
        pair_e = 4 * self.epsilon * (c12 - c6) - e0 * inside.to(r2.dtype)
        energy = 0.5 * pair_e.sum(dim=(1, 2))
        pair_f = (-24 * self.epsilon * (2 * c12 - c6) / r2).unsqueeze(-1) * vec
        return energy, pair_f.sum(dim=2)
