"""Pair displacements and distances, bond lengths and intermolecular distances.

Positions are ``(..., N, 3)`` with any leading batch dimensions (replicas, frames); cells as
in :mod:`mdsim.geometry.pbc` (shared, per structure, or box lengths).  Everything keeps
autograd and propagates NaN (a blown-up structure gives NaN, never a finite value).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .pbc import flat_cell, minimum_image


def flatten_batch(x: Tensor, event_dims: int):
    """Reshape (..., *event) → (B, *event); returns the tensor and the batch shape."""
    batch_shape = x.shape[: x.dim() - event_dims]
    return x.reshape((-1,) + tuple(x.shape[x.dim() - event_dims:])), batch_shape


def ordered_pairs(n: int, device=None):
    """All N(N−1) ordered pairs i ≠ j as two long tensors (row-major in i)."""
    idx = torch.arange(n, device=device)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    mask = i != j
    return i[mask], j[mask]


def pair_displacements(positions: Tensor, i: Tensor, j: Tensor, cell=None) -> Tensor:
    """r_j − r_i for index pairs, minimum image if ``cell`` is given. Returns (..., P, 3)."""
    return minimum_image(positions[..., j, :] - positions[..., i, :], cell)


def pair_distances(positions: Tensor, i: Tensor, j: Tensor, cell=None) -> Tensor:
    """|r_j − r_i| for index pairs (minimum image with ``cell``). Returns (..., P).

    A tiny floor inside the square root keeps the gradient of coincident points finite."""
    d = pair_displacements(positions, i, j, cell)
    sq = (d * d).sum(-1)
    return torch.sqrt(torch.clamp(sq, min=torch.finfo(sq.dtype).tiny))


def bond_lengths(positions: Tensor, bonds: Tensor, cell=None) -> Tensor:
    """Lengths of bonds (B, 2) (minimum image with ``cell``): (..., N, 3) → (..., B)."""
    x, batch_shape = flatten_batch(positions, 2)
    bonds = torch.as_tensor(bonds, dtype=torch.long, device=x.device).reshape(-1, 2)
    d = pair_distances(x, bonds[:, 0], bonds[:, 1], flat_cell(cell, x, batch_shape))
    return d.reshape(tuple(batch_shape) + (bonds.shape[0],))


def reference_bond_lengths(frames: Tensor, bonds: Tensor, cell=None) -> Tensor:
    """Mean bond lengths d̄_b over frames (T, N, 3) → (B,)."""
    d = bond_lengths(frames, bonds, cell)
    return d.reshape(math.prod(d.shape[:-1]), d.shape[-1]).mean(0)


def bond_length_deviation(positions: Tensor, bonds: Tensor, ref_lengths: Tensor, cell=None) -> Tensor:
    """max_b |d_b − d̄_b| of every structure, (..., N, 3) → (...); 0 without bonds."""
    d = bond_lengths(positions, bonds, cell)
    if d.shape[-1] == 0:
        return d.new_zeros(d.shape[:-1])
    ref = torch.as_tensor(ref_lengths, dtype=d.dtype, device=d.device)
    return (d - ref).abs().amax(-1)  # amax propagates NaN


def intermolecular_pairs(molecule_index: Tensor):
    """Unordered atom pairs (i < j) of atoms in different molecules, as two long tensors."""
    m = torch.as_tensor(molecule_index, dtype=torch.long).reshape(-1)
    n = m.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=m.device)
    keep = m[i] != m[j]
    return i[keep], j[keep]


def min_intermolecular_distance(positions: Tensor, molecule_index: Tensor, cell=None,
                                chunk_pairs: int = 1 << 22) -> Tensor:
    """Minimum over pairs of atoms in different molecules of the (minimum-image) distance.

    positions (..., N, 3), molecule_index (N,) → (...); +inf with a single molecule.  Chunked
    over structures so that at most ~``chunk_pairs`` pair distances exist at once."""
    x, batch_shape = flatten_batch(positions, 2)
    i, j = intermolecular_pairs(torch.as_tensor(molecule_index, device=x.device))
    if i.numel() == 0:
        return torch.full(tuple(batch_shape), math.inf, dtype=x.dtype, device=x.device)
    c = flat_cell(cell, x, batch_shape)
    step = max(1, chunk_pairs // max(1, i.numel()))
    outs = []
    for s in range(0, x.shape[0], step):
        cc = c[s:s + step] if (c is not None and c.dim() == 3) else c
        outs.append(pair_distances(x[s:s + step], i, j, cc).amin(-1))
    return torch.cat(outs).reshape(tuple(batch_shape))
