"""Angular distribution function over bonded triplets (spec §4)."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from mdsim.geometry import flat_cell, flatten_batch, pair_distances

from .rdf import gaussian_smear


def default_adf_bond_cutoff(n_atoms: int) -> float:
    """The original's bond-length cutoff for counting an angle: 3.0 Å, 1.25 Å above 100 atoms."""
    return 1.25 if n_atoms > 100 else 3.0


def angle_triplets(bonds: torch.Tensor) -> torch.Tensor:
    """All angle triplets (i, j, k), vertex j, from an undirected bond list (B, 2).

    For every atom j and every ordered pair of distinct bonded neighbours (i, k) of j one triplet
    is produced, so each angle appears in both orders (i, j, k) and (k, j, i).  Returns (A, 3) long."""
    bonds = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
    if bonds.numel() == 0:
        return torch.zeros(0, 3, dtype=torch.long, device=bonds.device)
    # directed edges (j -> neighbour) both ways
    src = torch.cat([bonds[:, 0], bonds[:, 1]])
    dst = torch.cat([bonds[:, 1], bonds[:, 0]])
    out = []
    for j in torch.unique(src).tolist():
        nb = torch.unique(dst[src == j])
        if nb.numel() < 2:
            continue
        I, K = torch.meshgrid(nb, nb, indexing="ij")
        m = I != K
        I, K = I[m], K[m]
        out.append(torch.stack([I, torch.full_like(I, j), K], 1))
    if not out:
        return torch.zeros(0, 3, dtype=torch.long, device=bonds.device)
    return torch.cat(out, 0)


def triplet_angles(positions: torch.Tensor, triplets: torch.Tensor) -> torch.Tensor:
    """Angles i–j–k (degrees) at vertex j from raw coordinate differences. (..., N, 3) → (..., A)."""
    i, j, k = triplets[:, 0], triplets[:, 1], triplets[:, 2]
    a = positions[..., i, :] - positions[..., j, :]
    b = positions[..., k, :] - positions[..., j, :]
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=torch.finfo(a.dtype).tiny)
    eps = 1e-7 if a.dtype == torch.float64 else 1e-6
    return torch.rad2deg(torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps)))


def adf(positions: torch.Tensor, triplets: torch.Tensor, cell=None, bond_cutoff: float = 3.0,
        n_bins: int = 180, sigma: float = 1.0, angle_range: Sequence[float] = (0.0, 180.0)) -> torch.Tensor:
    """Smeared angular distribution of every structure.

    positions (..., N, 3), triplets (A, 3) from :func:`angle_triplets`.  A triplet counts in a
    structure when both its bonds (i, j) and (j, k) are shorter than ``bond_cutoff`` (minimum
    image if ``cell`` is given); the angle itself uses raw coordinate differences.  Each angle
    (degrees) contributes a Gaussian of width ``sigma`` degrees at ``n_bins`` centres
    linspace(angle_range[0], angle_range[1], n_bins); the result (..., n_bins) sums to 1
    (all zeros if no triplet counts)."""
    x, batch_shape = flatten_batch(positions, 2)
    triplets = torch.as_tensor(triplets, dtype=torch.long, device=x.device).reshape(-1, 3)
    c = flat_cell(cell, x, batch_shape)
    d1 = pair_distances(x, triplets[:, 0], triplets[:, 1], c)
    d2 = pair_distances(x, triplets[:, 1], triplets[:, 2], c)
    w = ((d1 < bond_cutoff) & (d2 < bond_cutoff)).to(x.dtype)
    ang = triplet_angles(x, triplets)
    centers = torch.linspace(float(angle_range[0]), float(angle_range[1]), n_bins, dtype=x.dtype, device=x.device)
    h = gaussian_smear(ang, centers, sigma, weights=w)
    h = h / h.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    return h.reshape(tuple(batch_shape) + (n_bins,))


def adf_bin_centers(n_bins: int = 180, angle_range: Tuple[float, float] = (0.0, 180.0)) -> torch.Tensor:
    return torch.linspace(float(angle_range[0]), float(angle_range[1]), n_bins, dtype=torch.float64)


def adf_mae(h: torch.Tensor, h_ref: torch.Tensor) -> torch.Tensor:
    """mean_k |h − h*| over the last dimension."""
    return (h - torch.as_tensor(h_ref, dtype=h.dtype, device=h.device)).abs().mean(-1)
