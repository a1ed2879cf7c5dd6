"""Bond lengths, bond-length deviation and intermolecular distances (spec §3 stability checks)."""
from __future__ import annotations

import math

import torch

from ._geometry import flat_cell, flatten_batch, pair_distances

IMD_TARGET = 1.44  # Å, target of the IMD hinge loss (original hard-codes it)


def bond_lengths(positions: torch.Tensor, bonds: torch.Tensor, cell=None) -> torch.Tensor:
    """|r_j − r_i| for bonds (B, 2) (minimum image with ``cell``). (..., N, 3) → (..., B)."""
    x, batch_shape = flatten_batch(positions, 2)
    bonds = torch.as_tensor(bonds, dtype=torch.long, device=x.device).reshape(-1, 2)
    d = pair_distances(x, bonds[:, 0], bonds[:, 1], flat_cell(cell, x, batch_shape))
    return d.reshape(tuple(batch_shape) + (bonds.shape[0],))


def reference_bond_lengths(frames: torch.Tensor, bonds: torch.Tensor, cell=None) -> torch.Tensor:
    """Mean bond lengths d̄_b over frames (T, N, 3) → (B,)."""
    d = bond_lengths(frames, bonds, cell)
    return d.reshape(-1, d.shape[-1]).mean(0)


def bond_length_deviation(positions: torch.Tensor, bonds: torch.Tensor, ref_lengths: torch.Tensor,
                          cell=None) -> torch.Tensor:
    """max_b |d_b − d̄_b| of every structure. (..., N, 3) → (...)."""
    d = bond_lengths(positions, bonds, cell)
    ref = torch.as_tensor(ref_lengths, dtype=d.dtype, device=d.device)
    if d.shape[-1] == 0:
        return d.new_zeros(d.shape[:-1])
    return (d - ref).abs().amax(-1)


def intermolecular_pairs(molecule_index: torch.Tensor):
    """Unordered atom pairs (i < j) belonging to different molecules."""
    m = torch.as_tensor(molecule_index, dtype=torch.long).reshape(-1)
    n = m.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=m.device)
    keep = m[i] != m[j]
    return i[keep], j[keep]


def min_intermolecular_distance(positions: torch.Tensor, molecule_index: torch.Tensor, cell=None,
                                chunk_pairs: int = 1 << 22) -> torch.Tensor:
    """Minimum over pairs of atoms in different molecules of the (minimum-image) distance.

    positions (..., N, 3), molecule_index (N,) → (...).  +inf if there is only one molecule."""
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


def imd_hinge_loss(imd: torch.Tensor, target: float = IMD_TARGET) -> torch.Tensor:
    """exp(max(target − IMD, 0)) − 1 (reporting only in the original)."""
    return torch.exp(torch.clamp(target - imd, min=0.0)) - 1.0
