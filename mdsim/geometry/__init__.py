"""The geometry layer: cells and the minimum image, pair distances, bonds, intermolecular
distances and neighbour lists.  Everything above it (``mdsim.md``, ``mdsim.models``,
``mdsim.observables``) takes these from here; this package imports nothing from ``mdsim``.

Shapes: positions ``(..., N, 3)`` with any leading batch dimensions; cells ``None``,
``(3, 3)`` lattice rows, per structure ``(..., 3, 3)``, or box lengths ``(3,)`` / ``(..., 3)``.
"""
from .distances import (bond_length_deviation, bond_lengths, flatten_batch, intermolecular_pairs,
                        min_intermolecular_distance, ordered_pairs, pair_displacements, pair_distances,
                        reference_bond_lengths)
from .neighbors import VerletList, all_pairs_edges, all_pairs_global_index, batch_all_pairs_edges, edge_vectors, periodic_edges
from .pbc import as_cell, cell_volume, flat_cell, minimum_image, perpendicular_widths

__all__ = [
    "as_cell", "cell_volume", "flat_cell", "minimum_image", "perpendicular_widths",
    "bond_length_deviation", "bond_lengths", "flatten_batch", "intermolecular_pairs",
    "min_intermolecular_distance", "ordered_pairs", "pair_displacements", "pair_distances",
    "reference_bond_lengths",
    "VerletList", "all_pairs_edges", "all_pairs_global_index", "batch_all_pairs_edges", "edge_vectors", "periodic_edges",
]
