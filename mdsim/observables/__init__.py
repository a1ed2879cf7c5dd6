"""Observables: pure functions of position / velocity tensors (see docs/observables.md).

Conventions: structures are ``(..., N, 3)`` with any leading batch dims (replicas, frames);
time series put time FIRST, ``(T, ..., N, 3)``.  Cells are None, (3, 3) lattice rows, box
lengths (3,), or per-structure (..., 3, 3).  Units: Å, degrees for angles.
"""
from mdsim.geometry import minimum_image, ordered_pairs, pair_distances
from .adf import adf, adf_bin_centers, adf_mae, angle_triplets, default_adf_bond_cutoff, triplet_angles
from .bonds import (IMD_TARGET, bond_length_deviation, bond_lengths, imd_hinge_loss, intermolecular_pairs,
                    min_intermolecular_distance, reference_bond_lengths)
from .diffusion import ANG2_PER_PS_TO_1E9_M2_PER_S, diffusivity, msd
from .rdf import (WATER_PAIRS, boltzmann_reweighting, element_pair_rdf, histogram_rdf, histogram_rdf_edges,
                  rdf_bin_centers, rdf_mae, reference_rdf, reweight_reference_rdf, smeared_rdf,
                  smeared_rdf_centers, water_rdfs)
from .vacf import vacf, vacf_from_positions, vacf_mae, velocities_from_positions, windowed_vacf
from .water import (choose_centers, local_bond_lengths, local_neighborhoods, molecule_atoms,
                    neighborhood_energies, oxygen_indices)

__all__ = [
    "minimum_image", "ordered_pairs", "pair_distances",
    "adf", "adf_bin_centers", "adf_mae", "angle_triplets", "default_adf_bond_cutoff", "triplet_angles",
    "IMD_TARGET", "bond_length_deviation", "bond_lengths", "imd_hinge_loss", "intermolecular_pairs",
    "min_intermolecular_distance", "reference_bond_lengths",
    "ANG2_PER_PS_TO_1E9_M2_PER_S", "diffusivity", "msd",
    "WATER_PAIRS", "boltzmann_reweighting", "element_pair_rdf", "histogram_rdf", "histogram_rdf_edges",
    "rdf_bin_centers", "rdf_mae", "reference_rdf", "reweight_reference_rdf", "smeared_rdf",
    "smeared_rdf_centers", "water_rdfs",
    "vacf", "vacf_from_positions", "vacf_mae", "velocities_from_positions", "windowed_vacf",
    "choose_centers", "local_bond_lengths", "local_neighborhoods", "molecule_atoms",
    "neighborhood_energies", "oxygen_indices",
]
