"""DimeNet++ built from PyG's stock ``DimeNetPlusPlus`` submodules, with our own forward.

PyG 2.8.1 enumerates triplets with ``torch_sparse.SparseTensor``, which is not installable
here, so the triplet enumeration (k→j→i) is written in plain torch below; the basis layers,
embedding, interaction and output blocks are PyG's.  Periodic boxes use vesin neighbour lists
(``mdsim.geometry.periodic_edges``) and all geometry comes from shifted edge vectors, so
angles are correct across the box boundary.  Molecules use static all-pairs lists with distances
clamped at the cutoff, where the DimeNet envelope (and so every radial/spherical basis value)
is exactly zero.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from .base import PotentialModel


def triplets(edge_index: Tensor, num_nodes: int, shifts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """All triplets k→j→i of a directed edge list (source row 0, target row 1).

    Returns ``(idx_kj, idx_ji)``: for every pair of edges e1 = (k→j) and e2 = (j→i) the edge ids,
    excluding the back-tracking pair where k's image is i's image (k = i and, with periodic
    ``shifts``, opposite shifts).  Host-side counts (dynamic size)."""
    src, dst = edge_index[0], edge_index[1]
    n_edges = src.shape[0]
    device = src.device
    order = torch.argsort(dst, stable=True)  # edges grouped by target atom
    counts_in = torch.bincount(dst, minlength=num_nodes)
    ptr = torch.cumsum(counts_in, 0) - counts_in
    n_trip = counts_in[src]  # for edge j→i: number of edges arriving at j
    idx_ji = torch.repeat_interleave(torch.arange(n_edges, device=device), n_trip)
    first = torch.repeat_interleave(torch.cumsum(n_trip, 0) - n_trip, n_trip)
    local = torch.arange(idx_ji.shape[0], device=device) - first
    idx_kj = order[ptr[src[idx_ji]] + local]
    back = src[idx_kj] == dst[idx_ji]
    if shifts is not None:
        back = back & ((shifts[idx_kj] + shifts[idx_ji]).abs().amax(dim=-1) < 1e-6)
    keep = ~back
    return idx_kj[keep], idx_ji[keep]


@lru_cache(maxsize=32)
def _all_pairs_triplet_template(n_atoms: int, n_structures: int, device: str) -> Tuple[Tensor, Tensor]:
    """Triplets of ``all_pairs_edges(n_atoms, n_structures)``, cached per device (static)."""
    from mdsim.geometry import all_pairs_edges, all_pairs_global_index

    kj, ji = triplets(all_pairs_edges(n_atoms, 1), n_atoms)
    glob = lambda local: all_pairs_global_index(local, n_atoms, n_structures).reshape(-1).to(device)  # noqa: E731
    return glob(kj), glob(ji)


@lru_cache(maxsize=8)
def _spherical_basis(num_spherical: int, num_radial: int, cutoff: float, envelope_exponent: int):
    """PyG's SphericalBasisLayer (sympy-generated, seconds to build; stateless, so shared)."""
    from torch_geometric.nn.models.dimenet import SphericalBasisLayer

    return SphericalBasisLayer(num_spherical, num_radial, cutoff, envelope_exponent)


class DimeNetPPModel(PotentialModel):
    model_name = "dimenet_pp"

    def __init__(self, hidden_channels: int = 128, num_blocks: int = 4, int_emb_size: int = 64,
                 basis_emb_size: int = 8, out_emb_channels: int = 256, num_spherical: int = 7,
                 num_radial: int = 6, cutoff: float = 5.0, envelope_exponent: int = 5,
                 num_before_skip: int = 1, num_after_skip: int = 2, num_output_layers: int = 3,
                 output_initializer: str = "zeros"):
        super().__init__(cutoff)
        from torch_geometric.nn.models.dimenet import (BesselBasisLayer, EmbeddingBlock,
                                                       InteractionPPBlock, OutputPPBlock)
        from torch_geometric.nn.resolver import activation_resolver

        if num_spherical < 2:
            raise ValueError(f"dimenet_pp: num_spherical must be >= 2, got {num_spherical}")
        act = activation_resolver("swish")
        # the same blocks (and parameter names) as PyG's DimeNetPlusPlus
        self.rbf = BesselBasisLayer(num_radial, cutoff, envelope_exponent)
        self.sbf = _spherical_basis(int(num_spherical), int(num_radial), float(cutoff), int(envelope_exponent))
        self.emb = EmbeddingBlock(num_radial, hidden_channels, act)
        self.output_blocks = torch.nn.ModuleList([
            OutputPPBlock(num_radial, hidden_channels, out_emb_channels, 1, num_output_layers, act,
                          output_initializer) for _ in range(num_blocks + 1)])
        self.interaction_blocks = torch.nn.ModuleList([
            InteractionPPBlock(hidden_channels, int_emb_size, basis_emb_size, num_spherical,
                               num_radial, num_before_skip, num_after_skip, act)
            for _ in range(num_blocks)])
        self.hyperparameters = dict(hidden_channels=int(hidden_channels), num_blocks=int(num_blocks),
                                    int_emb_size=int(int_emb_size), basis_emb_size=int(basis_emb_size),
                                    out_emb_channels=int(out_emb_channels),
                                    num_spherical=int(num_spherical), num_radial=int(num_radial),
                                    cutoff=float(cutoff), envelope_exponent=int(envelope_exponent),
                                    num_before_skip=int(num_before_skip),
                                    num_after_skip=int(num_after_skip),
                                    num_output_layers=int(num_output_layers),
                                    output_initializer=str(output_initializer))

    def _graph(self, positions, batch, n_structures, cell, equal_size):
        if cell is not None:
            from mdsim.geometry import edge_vectors, periodic_edges

            edge_index, shifts = periodic_edges(positions, cell.reshape(-1, 3, 3), batch, self.cutoff)
            vec = edge_vectors(positions, edge_index, shifts)
            idx_kj, idx_ji = triplets(edge_index, positions.shape[0], shifts)
            return edge_index, vec, idx_kj, idx_ji
        edge_index, vec = self.edges(positions, batch, n_structures, cell, equal_size)
        if equal_size:
            idx_kj, idx_ji = _all_pairs_triplet_template(positions.shape[0] // n_structures, n_structures,
                                                         str(positions.device))
        else:
            idx_kj, idx_ji = triplets(edge_index, positions.shape[0])
        return edge_index, vec, idx_kj, idx_ji

    def atomic_outputs(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                       n_structures: int, cell: Optional[Tensor] = None,
                       equal_size: Optional[bool] = None) -> Tensor:
        edge_index, vec, idx_kj, idx_ji = self._graph(positions, batch, n_structures, cell, equal_size)
        j, i = edge_index[0], edge_index[1]  # edge j→i, vec = r_i − r_j (+ shift)
        dist = vec.norm(dim=-1).clamp(max=self.cutoff)
        v_ji, v_kj = vec[idx_ji], vec[idx_kj]
        a = (v_ji * v_kj).sum(dim=-1)
        b = torch.linalg.cross(v_ji, v_kj, dim=-1).norm(dim=-1)
        angle = torch.atan2(b, a)
        rbf = self.rbf(dist)
        sbf = self.sbf(dist, angle, idx_kj)
        n_atoms = positions.shape[0]
        x = self.emb(atomic_numbers, rbf, i, j)
        p = self.output_blocks[0](x, rbf, i, num_nodes=n_atoms)
        for block, out in zip(self.interaction_blocks, self.output_blocks[1:]):
            x = block(x, rbf, sbf, idx_kj, idx_ji)
            p = p + out(x, rbf, i, num_nodes=n_atoms)
        return p.squeeze(-1)
