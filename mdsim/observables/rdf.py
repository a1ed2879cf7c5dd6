"""Radial distribution functions (spec §4).

* :func:`smeared_rdf` — differentiable molecular RDF (the estimator's observable): Gaussian
  smearing of all N(N−1) ordered distances, normalised to 1, ×100.
* :func:`histogram_rdf` — histogram molecular RDF (reference / evaluation), numpy
  ``density=True`` convention, first bin zeroed.
* :func:`reweight_reference_rdf` / :func:`reference_rdf` — Boltzmann reweighting of per-frame
  reference histograms from the data temperature to the simulation temperature.
* :func:`element_pair_rdf` / :func:`water_rdfs` — periodic element-pair g(r) (OO, HH, HO).
* :func:`rdf_mae` — r_max · mean |g − g*|.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

from mdsim.units import KB

from mdsim.geometry import cell_volume, flat_cell, flatten_batch, ordered_pairs, pair_distances

RDF_START = 1e-6


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


def smeared_rdf_centers(r_max: float, dr: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """Centres of the smeared RDF: M = int((r_max − 1e-6)/dr) + 1 points on linspace(1e-6, r_max, M)."""
    m = int((r_max - RDF_START) / dr) + 1
    return torch.linspace(RDF_START, r_max, m, dtype=dtype, device=device)


def histogram_rdf_edges(r_max: float, dr: float, dtype=torch.float64, device=None) -> torch.Tensor:
    """Edges of the histogram RDF: linspace(1e-6, r_max, int(r_max/dr) + 1)."""
    return torch.linspace(RDF_START, r_max, int(r_max / dr) + 1, dtype=dtype, device=device)


def smeared_rdf(positions: torch.Tensor, r_max: float = 10.0, dr: float = 0.02,
                sigma: float = 0.01, cell=None, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """Differentiable molecular RDF.

    positions (..., N, 3) → (..., M): for every structure, the sum over all ordered pairs i≠j of
    Gaussians exp(−(d_ij − c_m)²/(2σ²)) at the centres of :func:`smeared_rdf_centers`,
    normalised to sum 1 and multiplied by 100.  No r² (shell volume) normalisation.
    ``cell`` optionally applies the minimum image (not used for isolated molecules)."""
    x, batch_shape = flatten_batch(positions, 2)
    n = x.shape[-2]
    i, j = ordered_pairs(n, device=x.device)
    d = pair_distances(x, i, j, flat_cell(cell, x, batch_shape))  # (B, P)
    centers = smeared_rdf_centers(r_max, dr, dtype=x.dtype, device=x.device)
    counts = gaussian_smear(d, centers, sigma, chunk_elems=chunk_elems)
    norm = counts.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
    g = 100.0 * counts / norm
    return g.reshape(tuple(batch_shape) + (centers.shape[0],))


def _histogram_rows(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Row-wise histogram counts of values (B, P) over ``edges`` (numpy convention: bins
    [e_k, e_{k+1}), last bin closed; values outside the range are dropped)."""
    nb = edges.shape[0] - 1
    v = values.detach().to(edges.dtype)
    idx = torch.bucketize(v, edges, right=True) - 1
    idx = torch.where(v == edges[-1], torch.full_like(idx, nb - 1), idx)
    valid = (idx >= 0) & (idx < nb)
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    counts = torch.zeros(v.shape[0], nb, dtype=edges.dtype, device=v.device)
    counts.scatter_add_(1, idx, valid.to(edges.dtype))
    return counts


def histogram_rdf(positions: torch.Tensor, r_max: float = 10.0, dr: float = 0.02, cell=None,
                  zero_first_bin: bool = True) -> torch.Tensor:
    """Histogram molecular RDF of every structure (not differentiable).

    positions (..., N, 3) → (..., int(r_max/dr)) in float64: histogram of all pairwise distances
    on :func:`histogram_rdf_edges` normalised as numpy ``density=True`` (counts divided by the
    number of in-range distances times the bin width), then the first bin set to 0."""
    x, batch_shape = flatten_batch(positions.detach(), 2)
    i, j = ordered_pairs(x.shape[-2], device=x.device)
    d = pair_distances(x, i, j, flat_cell(cell, x, batch_shape))
    edges = histogram_rdf_edges(r_max, dr, device=x.device)
    counts = _histogram_rows(d, edges)
    widths = edges[1:] - edges[:-1]
    total = counts.sum(-1, keepdim=True).clamp(min=1.0)
    h = counts / (total * widths)
    if zero_first_bin:
        h[:, 0] = 0.0
    return h.reshape(tuple(batch_shape) + (h.shape[-1],))


def boltzmann_reweighting(energies: torch.Tensor, temperature_sim: float,
                          temperature_data: float = 500.0) -> Tuple[torch.Tensor, float]:
    """Normalised weights w_i ∝ exp(−(E_i − Ē)(1/kT_sim − 1/kT_data)) (energies in eV) and
    the effective sample size exp(−Σ w ln w)."""
    e = torch.as_tensor(energies, dtype=torch.float64).reshape(-1)
    beta_diff = 1.0 / (KB * temperature_sim) - 1.0 / (KB * temperature_data)
    logw = -(e - e.mean()) * beta_diff
    logw = logw - torch.logsumexp(logw, 0)
    w = torch.exp(logw)
    ess = float(torch.exp(-(w * logw).sum()))
    return w, ess


def reweight_reference_rdf(histograms: torch.Tensor, energies: torch.Tensor, temperature_sim: float,
                           temperature_data: float = 500.0) -> Tuple[torch.Tensor, float]:
    """Reference RDF Σ_i w_i h_i rescaled to sum 100, from per-frame histograms (n, M)."""
    w, ess = boltzmann_reweighting(energies, temperature_sim, temperature_data)
    h = torch.as_tensor(histograms, dtype=torch.float64)
    g = (w[:, None] * h).sum(0)
    g = 100.0 * g / g.sum().clamp(min=torch.finfo(g.dtype).tiny)
    return g, ess


def reference_rdf(frames: torch.Tensor, energies: torch.Tensor, temperature_sim: float,
                  temperature_data: float = 500.0, r_max: float = 10.0, dr: float = 0.02,
                  batch_size: int = 2000) -> Tuple[torch.Tensor, float]:
    """Reweighted reference RDF from data frames (n, N, 3) and their energies (n,) in eV."""
    frames = torch.as_tensor(frames)
    hs = [histogram_rdf(frames[s:s + batch_size], r_max, dr) for s in range(0, frames.shape[0], batch_size)]
    return reweight_reference_rdf(torch.cat(hs, 0), energies, temperature_sim, temperature_data)


def rdf_mae(g: torch.Tensor, g_ref: torch.Tensor, r_max: float, match_sum: bool = False) -> torch.Tensor:
    """r_max · mean_k |g − g*| over the last dimension (batched over leading dims of ``g``).

    With ``match_sum`` the reference is first rescaled to the sum of ``g`` (the original's md
    evaluation rescales to replica 0's histogram sum; pass that row's sum by slicing)."""
    g_ref = torch.as_tensor(g_ref, dtype=g.dtype, device=g.device)
    if match_sum:
        g_ref = g_ref * (g.sum(-1, keepdim=True) / g_ref.sum(-1, keepdim=True))
    return r_max * (g - g_ref).abs().mean(-1)


# ----------------------------------------------------------------------------- periodic (water)

def element_pair_rdf(positions: torch.Tensor, atomic_numbers: torch.Tensor, pair: Tuple[int, int],
                     cell, r_max: float = 6.0, dr: float = 0.24) -> torch.Tensor:
    """Periodic element-pair g(r) of every structure.

    positions (..., N, 3) (wrapped or unwrapped: the minimum image is applied), atomic_numbers
    (N,), ``pair`` = (Z_a, Z_b), cell (3,3)/(...,3,3) or box lengths.  Bins: edges
    linspace(0, r_max, round(r_max/dr)+1).  All ordered pairs (a, b) with a of type Z_a, b of type
    Z_b, a ≠ b; g_k = count_k / (ρ · 4π/3 (r_{k+1}³ − r_k³)), ρ = #a·#b / V.  Average the result
    over the frame dimension yourself (g is linear in the counts, so this is the frame-mean).
    An ideal gas gives g → 1 for distinct species and 1 − 1/#a for a species with itself."""
    x, batch_shape = flatten_batch(positions.detach(), 2)
    z = torch.as_tensor(atomic_numbers, device=x.device).reshape(-1)
    ia = torch.nonzero(z == pair[0]).reshape(-1)
    ib = torch.nonzero(z == pair[1]).reshape(-1)
    I, J = torch.meshgrid(ia, ib, indexing="ij")
    keep = I != J
    I, J = I[keep], J[keep]
    cell_t = flat_cell(cell, x, batch_shape)
    d = pair_distances(x, I, J, cell_t)
    nb = int(round(r_max / dr))
    edges = torch.linspace(0.0, r_max, nb + 1, dtype=torch.float64, device=x.device)
    counts = _histogram_rows(d, edges)
    vol = cell_volume(cell_t, x).to(torch.float64)
    vol = vol.reshape(-1, 1) if vol.dim() > 0 else vol
    rho = ia.numel() * ib.numel() / vol
    shell = 4.0 * math.pi / 3.0 * (edges[1:] ** 3 - edges[:-1] ** 3)
    g = counts / (rho * shell)
    return g.reshape(tuple(batch_shape) + (nb,))


WATER_PAIRS: Dict[str, Tuple[int, int]] = {"OO": (8, 8), "HH": (1, 1), "HO": (1, 8)}


def water_rdfs(positions: torch.Tensor, atomic_numbers: torch.Tensor, cell, r_max: float = 6.0,
               dr: float = 0.24, pairs: Sequence[str] = ("OO", "HH", "HO")) -> Dict[str, torch.Tensor]:
    """OO, HH, HO g(r) of every structure: dict name → (..., M). See :func:`element_pair_rdf`."""
    return {name: element_pair_rdf(positions, atomic_numbers, WATER_PAIRS[name], cell, r_max, dr)
            for name in pairs}


def rdf_bin_centers(r_max: float, dr: float, periodic: bool = False) -> torch.Tensor:
    """Bin centres of :func:`histogram_rdf` (periodic=False) or :func:`element_pair_rdf`."""
    edges = (torch.linspace(0.0, r_max, int(round(r_max / dr)) + 1, dtype=torch.float64) if periodic
             else histogram_rdf_edges(r_max, dr))
    return 0.5 * (edges[1:] + edges[:-1])
