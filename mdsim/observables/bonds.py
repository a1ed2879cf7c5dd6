"""Bond lengths, bond-length deviation and intermolecular distances (spec §3 stability checks).

The geometry lives in :mod:`mdsim.geometry`; the functions are re-exported here because they
are observables too (``mdsim.observables.bond_lengths`` etc.).  Only the IMD hinge loss is
defined here."""
from __future__ import annotations

import torch

from mdsim.geometry import (bond_length_deviation, bond_lengths, intermolecular_pairs,  # noqa: F401
                            min_intermolecular_distance, reference_bond_lengths)

IMD_TARGET = 1.44  # Å, target of the IMD hinge loss (original hard-codes it)


def imd_hinge_loss(imd: torch.Tensor, target: float = IMD_TARGET) -> torch.Tensor:
    """exp(max(target − IMD, 0)) − 1 (reporting only in the original)."""
    return torch.exp(torch.clamp(target - imd, min=0.0)) - 1.0
