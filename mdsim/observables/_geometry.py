"""Geometry helpers shared by the observables: minimum image, distances, angles.

Conventions: positions have shape ``(..., N, 3)`` (any number of leading batch dimensions,
e.g. replicas or (frames, replicas)); a cell is ``None`` (no periodicity) or a tensor of
lattice vectors as rows, shape ``(3, 3)`` or ``(..., 3, 3)`` broadcastable against the leading
dimensions of the positions.  All functions work for float32 and float64 and keep autograd.
"""
from __future__ import annotations

from typing import Optional

import torch


def _as_cell(cell, like: torch.Tensor) -> Optional[torch.Tensor]:
    if cell is None:
        return None
    cell = torch.as_tensor(cell, dtype=like.dtype, device=like.device)
    if cell.dim() == 1:  # box lengths
        cell = torch.diag_embed(cell)
    elif cell.dim() >= 2 and cell.shape[-1] == 3 and cell.shape[-2] != 3:  # (..., 3) box lengths
        cell = torch.diag_embed(cell)
    return cell


def minimum_image(disp: torch.Tensor, cell=None) -> torch.Tensor:
    """Apply the minimum-image convention to displacement vectors ``disp`` (..., P, 3).

    ``cell`` rows are lattice vectors, shape (3, 3), (..., 3, 3) matching the leading dims of
    ``disp`` without the pair dimension, or box lengths (3,) / (..., 3).  Exact for orthorhombic
    cells (the ones used here); for strongly skewed cells it is the usual fractional rounding.
    """
    cell = _as_cell(cell, disp)
    if cell is None:
        return disp
    inv = torch.linalg.inv(cell)
    frac = disp @ inv
    frac = frac - torch.round(frac)
    return frac @ cell


def cell_volume(cell, like: torch.Tensor) -> torch.Tensor:
    cell = _as_cell(cell, like)
    return torch.linalg.det(cell).abs()


def pair_displacements(positions: torch.Tensor, i: torch.Tensor, j: torch.Tensor, cell=None) -> torch.Tensor:
    """r_j − r_i for index pairs, minimum image if ``cell`` is given. Returns (..., P, 3)."""
    d = positions[..., j, :] - positions[..., i, :]
    return minimum_image(d, cell)


def pair_distances(positions: torch.Tensor, i: torch.Tensor, j: torch.Tensor, cell=None) -> torch.Tensor:
    """|r_j − r_i| for index pairs (minimum image with ``cell``). Returns (..., P).

    The norm is computed with a tiny floor inside the square root only where needed so that
    coincident points do not produce NaN gradients."""
    d = pair_displacements(positions, i, j, cell)
    sq = (d * d).sum(-1)
    return torch.sqrt(torch.clamp(sq, min=torch.finfo(sq.dtype).tiny))


def ordered_pairs(n: int, device=None):
    """All N(N−1) ordered pairs i != j as two long tensors."""
    idx = torch.arange(n, device=device)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    mask = i != j
    return i[mask], j[mask]


def flatten_batch(x: torch.Tensor, event_dims: int):
    """Reshape (..., *event) → (B, *event); returns the tensor and the batch shape."""
    batch_shape = x.shape[: x.dim() - event_dims]
    return x.reshape((-1,) + tuple(x.shape[x.dim() - event_dims:])), batch_shape


def gaussian_smear(values: torch.Tensor, centers: torch.Tensor, sigma: float,
                   weights: Optional[torch.Tensor] = None, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Sum of Gaussians exp(−(v − c)²/(2σ²)) over the last dimension of ``values``.

    values (B, P) → (B, M).  Chunked over B so that B·P·M never exceeds ``chunk_elems``
    elements at once (keeps memory bounded for thousands of frames)."""
    B, P = values.shape
    M = centers.shape[0]
    coeff = -0.5 / (sigma * sigma)
    step = max(1, chunk_elems // max(1, P * M))
    outs = []
    for s in range(0, B, step):
        v = values[s:s + step]
        g = torch.exp(coeff * (v.unsqueeze(-1) - centers) ** 2)  # (b, P, M)
        if weights is not None:
            g = g * weights[s:s + step].unsqueeze(-1)
        outs.append(g.sum(1))
    if not outs:
        return values.new_zeros((0, M))
    return torch.cat(outs, 0)


def flat_cell(cell, like: torch.Tensor, batch_shape) -> Optional[torch.Tensor]:
    """Bring a cell to (3, 3) (shared) or (B, 3, 3) aligned with positions flattened to (B, N, 3).

    Accepts None, (3,3), (3,) box lengths, or per-structure (*batch_shape, 3, 3) / (*batch_shape, 3)."""
    c = _as_cell(cell, like)
    if c is None or c.dim() == 2:
        return c
    c = c.expand(tuple(batch_shape) + (3, 3)) if c.shape[:-2] != tuple(batch_shape) else c
    return c.reshape(-1, 3, 3)
