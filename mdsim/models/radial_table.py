"""Tabulated radial functions: a smooth function of the pair distance, f: [0, r_c] → R^C,
replaced in MD by a piecewise cubic Hermite interpolant on a uniform grid.

Why: SchNet's continuous filters W_k(d)·C(d) depend on the pair distance only, yet cost two
dense layers per pair and interaction block (~70 % of an MD step's arithmetic, and as much
again in the force backward pass).  Between parameter updates they are a fixed function of one
scalar, so MD can read them from a table: per pair a gather of one row of 4·C coefficients and
a Horner evaluation, differentiable in d (forces), instead of two matrix products.

Accuracy: the interpolant matches values and first derivatives at the grid points (computed
exactly, in float64, by forward-mode differentiation of ``fn``), so its error is
O(h⁴·f⁗) in value and O(h³·f⁗) in slope.  For SchNet's Gaussian basis (width ≈ 0.2 Å) and
the default spacing h = 0.005 Å both are at the level of float32 rounding (tests compare the
forces with the float64 network).  Parameter gradients do not flow through a table: it is for
MD with fixed parameters only; training and the Boltzmann estimator always evaluate the network.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

#: default grid spacing (Å) of the tables MD uses (config ``radial_table_spacing``)
DEFAULT_SPACING = 0.005


class RadialTable:
    """Cubic Hermite table of ``fn`` on [0, ``cutoff``] with spacing ≤ ``spacing`` (Å).

    ``build(fn, dtype, device)`` (re)fills it: ``fn`` maps distances (P,) float64 → (P, C)
    float64 with each row depending on its own distance only.  Distances are clamped to
    [0, cutoff]; with ``zero_at_cutoff`` the value and slope at the cutoff are set to exactly 0
    (functions that vanish smoothly there, like SchNet's cosine cutoff), so that padded or
    out-of-range pairs contribute nothing, as with the network.  Calling the table on
    distances (P,) gives (P, C), differentiable with respect to the distances.

    Rebuilding with the same shape, dtype and device writes into the same storage, so compiled
    code and captured CUDA graphs that read the table see the new values."""

    def __init__(self, cutoff: float, spacing: float = DEFAULT_SPACING, zero_at_cutoff: bool = True):
        if not (spacing > 0 and math.isfinite(spacing)):
            raise ValueError(f"radial_table_spacing: expected a positive spacing in Å, got {spacing!r}")
        if spacing > cutoff / 4:
            raise ValueError(f"radial_table_spacing: {spacing} Å is too coarse for a cutoff of {cutoff} Å "
                             f"(at most {cutoff / 4:g} Å)")
        self.cutoff = float(cutoff)
        self.intervals = int(math.ceil(self.cutoff / float(spacing)))
        self.h = self.cutoff / self.intervals
        self.zero_at_cutoff = bool(zero_at_cutoff)
        self.coeffs: Optional[Tensor] = None  # (intervals, 4, C): c0 + c1 u + c2 u² + c3 u³

    @property
    def spacing(self) -> float:
        return self.h

    def build(self, fn: Callable[[Tensor], Tensor], dtype: torch.dtype, device) -> "RadialTable":
        grid = torch.linspace(0.0, self.cutoff, self.intervals + 1, dtype=torch.float64, device=device)
        # values and slopes at the grid points in one forward-mode pass (rows are independent)
        value, slope = torch.func.jvp(fn, (grid,), (torch.ones_like(grid),))
        value, slope = value.detach().clone(), slope.detach().clone()
        if value.dim() != 2 or value.shape[0] != grid.shape[0]:
            raise ValueError(f"radial table: fn must map (P,) distances to (P, C), got {tuple(value.shape)}")
        if self.zero_at_cutoff:
            value[-1] = 0.0
            slope[-1] = 0.0
        v0, v1 = value[:-1], value[1:]
        d0, d1 = slope[:-1] * self.h, slope[1:] * self.h  # slopes per unit of u = (d - d_i)/h
        coeffs = torch.stack([v0, d0, 3.0 * (v1 - v0) - 2.0 * d0 - d1, 2.0 * (v0 - v1) + d0 + d1], dim=1)
        coeffs = coeffs.to(dtype).contiguous()
        if (self.coeffs is not None and self.coeffs.shape == coeffs.shape and self.coeffs.dtype == coeffs.dtype
                and self.coeffs.device == coeffs.device):
            self.coeffs.copy_(coeffs)
        else:
            self.coeffs = coeffs
        return self

    def __call__(self, dist: Tensor) -> Tensor:
        if self.coeffs is None:
            raise RuntimeError("radial table used before build()")
        t = dist.clamp(0.0, self.cutoff) * (1.0 / self.h)
        i = t.detach().floor().clamp(max=self.intervals - 1)
        u = (t - i).unsqueeze(-1)  # the gradient reaches the distances through u
        c = self.coeffs.index_select(0, i.long())  # (P, 4, C)
        return ((c[:, 3] * u + c[:, 2]) * u + c[:, 1]) * u + c[:, 0]
