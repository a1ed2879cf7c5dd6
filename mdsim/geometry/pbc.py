"""Cells and the minimum-image convention.

A cell is ``None`` (no periodicity), lattice vectors as rows ``(3, 3)`` or per structure
``(..., 3, 3)``, or box lengths ``(3,)`` / ``(..., 3)`` (orthorhombic).  All functions keep
autograd and work in float32 and float64.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor


def as_cell(cell, like: Tensor) -> Optional[Tensor]:
    """``cell`` as a tensor of lattice rows ``(..., 3, 3)`` with ``like``'s dtype and device;
    box lengths ``(..., 3)`` become diagonal cells; ``None`` stays ``None``."""
    if cell is None:
        return None
    cell = torch.as_tensor(cell, dtype=like.dtype, device=like.device)
    if cell.dim() == 1 or (cell.dim() >= 2 and cell.shape[-1] == 3 and cell.shape[-2] != 3):
        cell = torch.diag_embed(cell)  # box lengths
    return cell


def flat_cell(cell, like: Tensor, batch_shape) -> Optional[Tensor]:
    """A cell as ``(3, 3)`` (shared) or ``(B, 3, 3)`` aligned with structures flattened to
    ``(B, N, 3)`` from ``batch_shape``; per-structure cells broadcast over ``batch_shape``."""
    c = as_cell(cell, like)
    if c is None or c.dim() == 2:
        return c
    c = c.expand(tuple(batch_shape) + (3, 3)) if c.shape[:-2] != tuple(batch_shape) else c
    return c.reshape(-1, 3, 3)


def cell_volume(cell, like: Tensor) -> Tensor:
    """|det(cell)| (Å³), one per cell."""
    return torch.linalg.det(as_cell(cell, like)).abs()


def perpendicular_widths(cell, like: Tensor) -> Tensor:
    """Distances between opposite faces of each cell, (..., 3) (Å): a sphere of radius r fits
    in the cell (so minimum-image distances up to r are complete) iff r ≤ min(width)/2."""
    c = as_cell(cell, like)
    areas = torch.linalg.norm(torch.cross(c[..., [1, 2, 0], :], c[..., [2, 0, 1], :], dim=-1), dim=-1)
    return cell_volume(c, like).unsqueeze(-1) / areas


#: the 27 integer image offsets (−1, 0, 1)³
_IMAGES = tuple(itertools.product((-1, 0, 1), repeat=3))


def minimum_image(disp: Tensor, cell=None, exact: bool = False) -> Tensor:
    """Minimum-image displacement vectors ``disp (..., 3)``.

    ``cell``: see the module docstring; a ``(..., 3, 3)`` cell broadcasts against ``disp``'s
    dimensions without the vector dimension (e.g. cells ``(B, 3, 3)`` with ``disp (B, P, 3)``;
    use ``cell[:, None]`` for ``disp (B, L, P, 3)``).
    Fractional rounding is exact for orthorhombic cells.  ``exact=True`` also compares the 27
    neighbouring images of the rounded vector and keeps the shortest: the true minimum image
    of a general (reduced, triclinic) cell, at 27× the cost — for host-side work."""
    cell = as_cell(cell, disp)
    if cell is None:
        return disp
    frac = disp @ torch.linalg.inv(cell)
    out = (frac - torch.round(frac)) @ cell
    if exact:
        images = torch.tensor(_IMAGES, dtype=out.dtype, device=out.device) @ cell  # (..., 27, 3)
        cand = out.unsqueeze(-2) + images.unsqueeze(-3)  # (..., P, 27, 3)
        best = (cand * cand).sum(-1).argmin(-1, keepdim=True)  # (..., P, 1)
        out = torch.gather(cand, -2, best.unsqueeze(-1).expand(*best.shape, 3)).squeeze(-2)
    return out
