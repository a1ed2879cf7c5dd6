"""Neighbour lists, batched over structures.

Conventions: ``edge_index[0]`` is the source atom j, ``edge_index[1]`` the target atom i
(PyG's ``source_to_target`` flow), and the edge vector is
``positions[edge_index[1]] - positions[edge_index[0]] + shift``.

Every edge list here is *symmetric*: ``[half; reversed half]``, i.e. edge ``p`` and edge
``p + E/2`` are the same unordered pair in opposite directions (with opposite shifts).  A model
with a pairwise-symmetric filter (SchNet) evaluates it once per pair; other models see an ordinary
directed list.

* Molecules (no cell): static all-pairs lists.  Models clamp distances at their cutoff so
  out-of-range pairs contribute nothing; shapes never depend on positions, which keeps the
  MD step free of host synchronisation (capture/compile friendly).
* Molecules in MD: :class:`VerletList`, a padded half list within ``cutoff + skin`` rebuilt only
  when an atom has moved more than ``skin/2`` (static capacity; see its docstring).
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
    return torch.triu_indices(n_atoms, n_atoms, 1)  # (2, N(N-1)/2) half: source i < target j


def _symmetric(half: Tensor) -> Tensor:
    """``[half; reversed half]`` from a half list (2, P)."""
    return torch.cat([half, half.flip(0)], dim=1)


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
        edge_index = _symmetric(t.repeat(1, key[1]) + offsets).to(key[2])
        unpinned = [k for k in _ALL_PAIRS if k not in _PINNED]
        if len(unpinned) >= _MAX_UNPINNED:
            del _ALL_PAIRS[unpinned[0]]
        _ALL_PAIRS[key] = edge_index
    if pin:
        _PINNED.add(key)
    return edge_index


def all_pairs_global_index(local: Tensor, n_atoms: int, n_structures: int) -> Tensor:
    """Global edge ids in ``all_pairs_edges(n_atoms, n_structures)`` of the local edge ids
    ``local`` (L,) of ``all_pairs_edges(n_atoms, 1)``, for every structure: (S, L).  The list is
    ``[halves of all structures; their reverses]``, so local edge l of structure s is global
    ``s·h + l`` (l < h) or ``S·h + s·h + l − h`` with h = N(N−1)/2.  Lets models build per-edge
    index templates (triplets, reverse edges) once from one structure."""
    h = n_atoms * (n_atoms - 1) // 2
    s = torch.arange(n_structures, device=local.device).unsqueeze(1)
    loc = local.unsqueeze(0)
    return torch.where(loc < h, s * h + loc, n_structures * h + s * h + loc - h)


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
    return _symmetric(torch.cat(parts, dim=1))


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
    cell = cell.reshape(-1, 3, 3)
    counts = torch.bincount(batch, minlength=cell.shape[0]).tolist()
    periodic = True if pbc is None else pbc.detach().cpu().bool()
    i, j, S, struct = vesin_half_pairs(positions, cell, counts, cutoff, periodic)
    # vesin's vector is r_j - r_i + S @ box: edge (source=i, target=j) with shift S @ cell
    sh = torch.bmm(S.to(cell.dtype).unsqueeze(1), cell.index_select(0, struct)).squeeze(1)
    return _symmetric(torch.stack([i, j])), torch.cat([sh, -sh], dim=0)


def vesin_half_pairs(positions: Tensor, cell: Tensor, counts, cutoff: float, periodic=True):
    """Half pair list (each pair once) within ``cutoff`` of consecutive structures (vesin cell
    list, any positions, also unwrapped ones): positions (A, 3), cell (S, 3, 3), ``counts`` atoms
    per structure.  Returns global atom indices ``i``, ``j`` (P,), integer cell shifts ``S``
    (P, 3) with vector r_j − r_i + S @ cell, and the structure of each pair (P,), on the
    positions' device."""
    from vesin_torch import NeighborList

    nl = NeighborList(cutoff=float(cutoff), full_list=False)
    Is, Js, Ss, Ks, start = [], [], [], [], 0
    for s, n in enumerate(counts):
        pos_s = positions[start:start + n].detach().to(torch.float64).cpu()
        box = cell[s].detach().to(torch.float64).cpu()
        i, j, S = nl.compute(points=pos_s, box=box, periodic=periodic, quantities="ijS")
        Is.append(i.long() + start)
        Js.append(j.long() + start)
        Ss.append(S.long())
        Ks.append(torch.full((i.shape[0],), s, dtype=torch.long))
        start += n
    dev = positions.device
    return (torch.cat(Is).to(dev), torch.cat(Js).to(dev), torch.cat(Ss).to(dev), torch.cat(Ks).to(dev))


class VerletList:
    """Half Verlet list for R structures of N atoms each (molecules, or periodic boxes).

    Holds each unordered pair closer than ``cutoff + skin`` at the last build once, in
    fixed-capacity buffers (``pairs`` (2, C), integer cell ``shifts`` (C, 3), ``mask`` (C,)).
    Between builds only the vectors are recomputed from the current positions, so a step's
    shapes never depend on the positions (``torch.compile``/CUDA-graph friendly).  The list
    holds every pair within ``cutoff`` as long as no atom has moved more than ``skin/2`` since
    the build; :meth:`update` checks that on the host (between steps or blocks) and rebuilds.
    Rebuilds write into the same buffers while the capacity suffices (tensor identity kept: no
    recompilation, CUDA graphs stay valid) and grow them by ``headroom`` otherwise.  Padded
    slots get an edge vector longer than any cutoff, so models treat them as out-of-range pairs
    (the contract the all-pairs graph relies on) and no gradient flows through them.  Periodic
    lists are built from the unwrapped positions (vesin accepts points outside the cell), so the
    stored shifts stay valid while atoms cross the boundary: do not wrap positions between
    builds.

    ``cutoff``: the model's interaction cutoff (Å); ``skin``: extra radius (Å); rebuilt when some
    atom has moved more than ``skin/2`` since the last build.  ``headroom``: capacity growth factor
    when a build needs more slots than allocated."""

    def __init__(self, cutoff: float, skin: float = 0.5, headroom: float = 1.15):
        if cutoff <= 0:
            raise ValueError(f"neighbour list cutoff: expected > 0, got {cutoff}")
        if skin < 0:
            raise ValueError(f"neighbor_skin: expected >= 0, got {skin}")
        self.cutoff, self.skin, self.headroom = float(cutoff), float(skin), float(headroom)
        self.pairs: Optional[Tensor] = None   # (2, C) long, global atom indices
        self.shifts: Optional[Tensor] = None  # (C, 3) integer shifts (as the float dtype), periodic only
        self.mask: Optional[Tensor] = None    # (C,) bool, real pair
        self.ref_positions: Optional[Tensor] = None  # (R, N, 3) positions at the last build
        self.ref_cell: Optional[Tensor] = None
        self.n_pairs = 0
        self.builds = 0
        #: molecules only: the list holds every pair of every replica, so no pair can be missing
        #: however far atoms move (small molecules: all pairs within cutoff + skin) and
        #: the displacement check (a host synchronisation per step) is skipped
        self.complete = False

    @property
    def capacity(self) -> int:
        return 0 if self.pairs is None else int(self.pairs.shape[1])

    # ------------------------------------------------------------------ host side
    def needs_rebuild(self, positions: Tensor, cell: Optional[Tensor] = None, margin: float = 0.0) -> bool:
        """True if the list is missing, the shape/cell changed, or an atom moved more than
        ``skin/2 − margin`` since the build."""
        if self.ref_positions is None or self.ref_positions.shape != positions.shape:
            return True
        if (cell is None) != (self.ref_cell is None):
            return True
        if cell is not None and not torch.equal(cell.detach(), self.ref_cell):
            return True
        if self.complete:
            return False
        disp = (positions.detach() - self.ref_positions.to(positions.dtype)).norm(dim=-1).max()
        return bool(disp > 0.5 * self.skin - margin)

    def update(self, positions: Tensor, cell: Optional[Tensor] = None, margin: float = 0.0) -> bool:
        """Rebuild if needed (host decision).  positions (R, N, 3); cell (R, 3, 3) or None.
        Returns True if it rebuilt."""
        if not self.needs_rebuild(positions, cell, margin):
            return False
        self.build(positions, cell)
        return True

    def build(self, positions: Tensor, cell: Optional[Tensor] = None) -> None:
        pos = positions.detach()
        R, N, _ = pos.shape
        rc = self.cutoff + self.skin
        if cell is None:
            i, j = torch.triu_indices(N, N, 1, device=pos.device)
            d = (pos[:, j] - pos[:, i]).norm(dim=-1)  # (R, P)
            s, p = torch.nonzero(d < rc, as_tuple=True)
            I, J = i[p] + s * N, j[p] + s * N
            S = None
        else:
            c = cell.detach().reshape(-1, 3, 3).expand(R, 3, 3)
            I, J, S, _ = vesin_half_pairs(pos.reshape(R * N, 3), c, [N] * R, rc)
        n = int(I.numel())
        if n > self.capacity:
            cap = max(n + 1, int(n * self.headroom) + 1)
            self.pairs = torch.zeros(2, cap, dtype=torch.long, device=pos.device)
            self.mask = torch.zeros(cap, dtype=torch.bool, device=pos.device)
            self.shifts = None if cell is None else torch.zeros(cap, 3, dtype=pos.dtype, device=pos.device)
        elif (cell is None) != (self.shifts is None):
            self.shifts = None if cell is None else torch.zeros(self.capacity, 3, dtype=pos.dtype,
                                                                device=pos.device)
        # fill in place (tensor identity kept); padded slots point at the pair (0, 1)
        self.pairs[0].fill_(0)
        self.pairs[1].fill_(min(1, R * N - 1))
        self.pairs[0, :n] = I
        self.pairs[1, :n] = J
        self.mask.zero_()
        self.mask[:n] = True
        if S is not None:
            self.shifts.zero_()
            self.shifts[:n] = S.to(self.shifts.dtype)
        self.ref_positions = pos.clone()
        self.ref_cell = None if cell is None else cell.detach().clone()
        self.n_pairs = n
        self.complete = cell is None and n == R * (N * (N - 1) // 2)
        self.builds += 1

    # ------------------------------------------------------------------ device side
    def edges(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Directed ``edge_index`` (2, 2C) as ``[half; reversed half]`` (source, target) and edge
        vectors (target − source [+ shift]) (2C, 3) for flat positions (R·N, 3).  Padded slots get
        a vector of length ``far`` (beyond any cutoff).  No host synchronisation."""
        I, J = self.pairs[0], self.pairs[1]
        vec = positions.index_select(0, J) - positions.index_select(0, I)
        if self.shifts is not None:
            if cell is None:
                raise ValueError("this neighbour list was built for a periodic cell; pass the cell")
            n_atoms = self.ref_positions.shape[1]
            c = cell.reshape(-1, 3, 3).index_select(0, torch.div(I, n_atoms, rounding_mode="floor"))
            vec = vec + torch.bmm(self.shifts.to(c.dtype).unsqueeze(1), c).squeeze(1)
        far = torch.tensor([2.0 * self.cutoff + 10.0, 0.0, 0.0], dtype=vec.dtype, device=vec.device)
        vec = torch.where(self.mask.unsqueeze(-1), vec, far)
        return _symmetric(self.pairs), torch.cat([vec, -vec], dim=0)
