"""SchNet built from PyG's stock ``SchNet`` submodules, with our own forward.

Parameter names match the original implementation's checkpoints 1:1 (after stripping the
``module.`` prefix): ``embedding``, ``distance_expansion``, ``interactions.{k}.{mlp,conv,lin}``,
``lin1``, ``lin2``.  The forward pass is ours: distances are clamped at the cutoff so that the
cosine cutoff C(d) = ½(cos(πd/r_c)+1) is exactly zero for every pair at or beyond r_c (this
makes a static all-pairs graph or a padded Verlet list equivalent to a radius graph), the
filters of all interaction blocks are evaluated together and once per unordered pair (edges come
as ``[half; reversed half]``), messages are summed with ``index_add`` and the readout is a
per-structure sum of known size (no host sync).  In MD (:meth:`using_radial_table`) the filters
come from a cubic Hermite table of the current parameters (:mod:`mdsim.models.radial_table`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Optional

import torch
from torch import Tensor

from .base import PotentialModel
from .radial_table import RadialTable


class SchNetModel(PotentialModel):
    model_name = "schnet"
    #: MD may pass a padded Verlet list (PotentialModel.using_neighbors): padded slots are
    #: out-of-range pairs, which the clamped cosine cutoff zeroes with zero gradient
    supports_neighbor_list = True
    #: MD may read the continuous filters W_k(d)·C(d) from a table (using_radial_table)
    supports_radial_table = True
    _radial_table: Optional[RadialTable] = None
    _radial_table_signature = None
    _table_active = False

    def __init__(self, hidden_channels: int = 64, num_filters: int = 64, num_interactions: int = 6,
                 num_gaussians: int = 25, cutoff: float = 5.0, max_num_neighbors: int = 32):
        super().__init__(cutoff)
        from torch_geometric.nn.models import SchNet

        stock = SchNet(hidden_channels=hidden_channels, num_filters=num_filters,
                       num_interactions=num_interactions, num_gaussians=num_gaussians,
                       cutoff=cutoff, interaction_graph=_no_graph,
                       max_num_neighbors=max_num_neighbors, readout="add", dipole=False)
        # adopt the stock submodules so that parameter names are the original's
        self.embedding = stock.embedding
        self.distance_expansion = stock.distance_expansion
        self.interactions = stock.interactions
        self.lin1 = stock.lin1
        self.act = stock.act
        self.lin2 = stock.lin2
        self.hyperparameters = dict(hidden_channels=int(hidden_channels), num_filters=int(num_filters),
                                    num_interactions=int(num_interactions),
                                    num_gaussians=int(num_gaussians), cutoff=float(cutoff),
                                    max_num_neighbors=int(max_num_neighbors))

    def atomic_outputs(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                       n_structures: int, cell: Optional[Tensor] = None,
                       equal_size: Optional[bool] = None) -> Tensor:
        edge_index, vec = self.edges(positions, batch, n_structures, cell, equal_size)
        # edges are [half; reversed half] (PotentialModel.edges): the filter W(d) depends on the
        # pair distance only, so it is evaluated once per pair and used in both directions
        p = vec.shape[0] // 2
        dist = vec[:p].norm(dim=-1).clamp(max=self.cutoff)
        i, j = edge_index[0, :p], edge_index[1, :p]  # each pair once: i → j (and j → i)
        filters = self._filters(dist)  # (interactions, P, F)
        h = self.embedding(atomic_numbers)
        n = h.shape[0]
        for block, w in zip(self.interactions, filters):
            conv = block.conv
            x = conv.lin1(h)
            agg = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device)
            agg = agg.index_add(0, j, x.index_select(0, i) * w).index_add(0, i, x.index_select(0, j) * w)
            x = conv.lin2(agg)
            x = block.lin(block.act(x))
            h = h + x
        out = self.lin2(self.act(self.lin1(h)))
        return out.squeeze(-1)

    def _filters(self, dist: Tensor) -> Tensor:
        """Continuous filters W_k(d) = (ssp(rbf(d) A_k + a_k) B_k + b_k) · C(d) of all interaction
        blocks k at once, (K, P, F): from the radial table inside :meth:`using_radial_table`,
        else from the network (:meth:`_filter_network`)."""
        table = self._radial_table
        if self._table_active and table is not None:
            k, f = len(self.interactions), self.interactions[0].conv.nn[0].out_features
            return table(dist).reshape(-1, k, f).transpose(0, 1)
        return self._filter_network(dist, self._filter_parameters())

    def _filter_layers(self):
        """(first, second): the two linear layers of every block's filter network."""
        return ([blk.conv.nn[0] for blk in self.interactions], [blk.conv.nn[2] for blk in self.interactions])

    def _filter_parameters(self) -> Dict[str, Tensor]:
        """The tensors the filters depend on, stacked over the interaction blocks."""
        first, second = self._filter_layers()
        return dict(a=torch.cat([m.weight for m in first], dim=0),  # (K·F, G)
                    b=torch.cat([m.bias for m in first], dim=0),
                    w2=torch.stack([m.weight.t() for m in second]),  # (K, F, F')
                    b2=torch.stack([m.bias for m in second]).unsqueeze(1),  # (K, 1, F')
                    offset=self.distance_expansion.offset)

    def _filter_network(self, dist: Tensor, p: Dict[str, Tensor]) -> Tensor:
        """The filter network of all blocks (one GEMM for the first layers, one batched GEMM for
        the second): the same arithmetic as each block's ``conv.nn`` times the cosine cutoff,
        fewer and larger kernels.  Returns (K, P, F)."""
        gauss = torch.exp(self.distance_expansion.coeff * (dist.view(-1, 1) - p["offset"].view(1, -1)).pow(2))
        c = 0.5 * (torch.cos(dist * (math.pi / self.cutoff)) + 1.0)
        k, f = len(self.interactions), self.interactions[0].conv.nn[0].out_features
        hid = self.interactions[0].conv.nn[1](torch.addmm(p["b"], gauss, p["a"].t()))  # shifted softplus
        hid = hid.reshape(-1, k, f).transpose(0, 1)  # (K, P, F)
        return torch.baddbmm(p["b2"], hid, p["w2"]) * c.unsqueeze(-1)

    # ------------------------------------------------------------------ radial table (MD)
    @contextmanager
    def using_radial_table(self, spacing: Optional[float]):
        if spacing is None:
            yield self
            return
        self.refresh_radial_table(spacing)
        old, self._table_active = self._table_active, True
        try:
            yield self
        finally:
            self._table_active = old

    def refresh_radial_table(self, spacing: float) -> RadialTable:
        """(Re)build the filter table when the spacing, the filter parameters (storage, in-place
        version, dtype, device) or the cutoff changed since the last build; returns it."""
        params = self._filter_parameters_raw()
        ref = params[0]
        sig = (float(spacing), float(self.cutoff), ref.dtype, str(ref.device),
               tuple((t.data_ptr(), t._version) for t in params))
        if sig != self._radial_table_signature:
            old = self._radial_table_signature
            table = self._radial_table
            if table is None or old is None or old[:2] != sig[:2]:  # new spacing or cutoff: new grid
                table = RadialTable(self.cutoff, spacing, zero_at_cutoff=True)
            with torch.no_grad():
                p64 = {key: t.detach().to(torch.float64) for key, t in self._filter_parameters().items()}

                def fn(d: Tensor) -> Tensor:  # (P,) → (P, K·F), float64
                    return self._filter_network(d, p64).transpose(0, 1).reshape(d.shape[0], -1)

                table.build(fn, ref.dtype, ref.device)  # same grid: written in place
            self._radial_table, self._radial_table_signature = table, sig
        return self._radial_table

    def _filter_parameters_raw(self):
        """The unstacked tensors of :meth:`_filter_parameters` (their storage and versions sign the table)."""
        first, second = self._filter_layers()
        return [t for m in first + second for t in (m.weight, m.bias)] + [self.distance_expansion.offset]


def _no_graph(pos, batch):  # pragma: no cover - never called, our forward builds graphs
    raise RuntimeError("SchNetModel builds its own graph")
