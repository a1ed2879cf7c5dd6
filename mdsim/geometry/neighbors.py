"""Neighbour lists, batched over structures.

Conventions: ``edge_index[0]`` is the source atom j, ``edge_index[1]`` the target atom i
(PyG's ``source_to_target`` flow), and the edge vector is
``positions[edge_index[1]] - positions[edge_index[0]] + shift``.

* Molecules (no cell): static all-pairs lists.  Models clamp distances at their cutoff so
  out-of-range pairs contribute nothing; shapes never depend on positions, which keeps the
  MD step free of host synchronisation (capture/compile friendly).
* Periodic boxes: a cell list from vesin (minimum image not assumed, any cutoff), computed on
  the host per structure; shifts returned as Cartesian vectors so autograd flows through
  positions and cell.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

_ALL_PAIRS: Dict[tuple, Tensor] = {}
_PINNED: set = set()
_MAX_UNPINNED = 32


@lru_cache(maxsize=64)
def _pair_template(n_atoms: int) -> Tensor:
    ii, jj = torch.meshgrid(torch.arange(n_atoms), torch.arange(n_atoms), indexing="ij")
    mask = ii != jj
    return torch.stack([jj[mask], ii[mask]])  # (2, N(N-1)) source, target


def all_pairs_edges(n_atoms: int, n_structures: int, device=None, pin: bool = False) -> Tensor:
    """All ordered pairs i≠j inside each of ``n_structures`` structures of ``n_atoms`` atoms,
    atoms numbered consecutively structure by structure.  Shape (2, S·N·(N−1)).  Do not modify
    the result: it is cached.

    The cache is a plain dict keyed by (N, S, device): every call returns the same device
    tensor (no host-to-device copy, CUDA-graph safe), and ``torch.compile`` reads an existing
    entry as a graph input instead of tracing its construction (boolean indexing, a graph
    break); adding entries later does not recompile.  ``pin=True`` (used before compiling an
    MD step) exempts the entry from eviction; at most 32 unpinned entries are kept."""
    key = (int(n_atoms), int(n_structures), str(torch.device(device) if device is not None else "cpu"))
    edge_index = _ALL_PAIRS.get(key)
    if edge_index is None:
        t = _pair_template(key[0])
        offsets = (torch.arange(key[1]) * key[0]).repeat_interleave(t.shape[1])
        edge_index = (t.repeat(1, key[1]) + offsets).to(key[2])
        unpinned = [k for k in _ALL_PAIRS if k not in _PINNED]
        if len(unpinned) >= _MAX_UNPINNED:
            del _ALL_PAIRS[unpinned[0]]
        _ALL_PAIRS[key] = edge_index
    if pin:
        _PINNED.add(key)
    return edge_index


def batch_all_pairs_edges(batch: Tensor, n_structures: int) -> Tensor:
    """All ordered pairs inside each structure for structures of different sizes.

    Host-side (uses the counts); meant for training batches, not for the MD hot path."""
    counts = torch.bincount(batch, minlength=n_structures).tolist()
    if len(set(counts)) == 1:
        return all_pairs_edges(counts[0], n_structures, device=batch.device)
    parts, start = [], 0
    for n in counts:
        if n > 1:
            parts.append(_pair_template(n).to(batch.device) + start)
        start += n
    if not parts:
        return torch.zeros(2, 0, dtype=torch.long, device=batch.device)
    return torch.cat(parts, dim=1)


def edge_vectors(positions: Tensor, edge_index: Tensor, shifts: Optional[Tensor] = None) -> Tensor:
    """Vectors from source to target atom, plus the periodic shift if given."""
    vec = positions[edge_index[1]] - positions[edge_index[0]]
    if shifts is not None:
        vec = vec + shifts
    return vec


def periodic_edges(positions: Tensor, cell: Tensor, batch: Tensor, cutoff: float,
                   pbc: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Periodic neighbour pairs within ``cutoff`` for each structure (vesin cell list).

    positions (A,3), cell (S,3,3) with cell vectors as rows, batch (A,) structure index.
    Returns ``edge_index`` (2,E) and Cartesian ``shifts`` (E,3) = S_int @ cell (differentiable
    in ``cell``), such that ``edge_vectors`` gives the minimum-distance vectors of each pair.
    """
    from vesin_torch import NeighborList

    cell = cell.reshape(-1, 3, 3)
    n_structures = cell.shape[0]
    counts = torch.bincount(batch, minlength=n_structures).tolist()
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    periodic = True if pbc is None else pbc.detach().cpu().bool()
    idx, shifts, start = [], [], 0
    for s, n in enumerate(counts):
        pos_s = positions[start:start + n].detach().to(torch.float64).cpu()
        box = cell[s].detach().to(torch.float64).cpu()
        i, j, S = nl.compute(points=pos_s, box=box, periodic=periodic, quantities="ijS")
        # vesin's vector is r_j - r_i + S @ box: edge (source=i, target=j) with shift S @ cell
        idx.append(torch.stack([i.long(), j.long()]).to(positions.device) + start)
        shifts.append(S.to(positions.device, cell.dtype) @ cell[s])
        start += n
    return torch.cat(idx, dim=1), torch.cat(shifts, dim=0)
