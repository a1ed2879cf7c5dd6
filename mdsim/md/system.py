"""A ``System``: everything that differs between simulated systems, as data.

Built from a dataset split (atomic numbers, a reference frame, cell, molecule membership) plus
the stability criterion named in the config.  Code never branches on a system's name: water's
periodic box, its molecules and its intermolecular-distance criterion are all fields here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch
from torch import Tensor

STABILITY_CRITERIA = ("bond_length_deviation", "imd", "rdf")

#: skin added to the sum of covalent radii when detecting bonds (Å); spec §3.
BOND_SKIN = 0.6


def detect_bonds(atomic_numbers, positions, cell=None, pbc=False, skin: float = BOND_SKIN,
                 molecule_index=None) -> np.ndarray:
    """Bonds (i<j) with d_ij < r_cov,i + r_cov,j + skin (ASE covalent radii, minimum image if
    periodic).  With ``molecule_index``, only pairs inside one molecule are bonds."""
    from ase.data import covalent_radii

    z = np.asarray(atomic_numbers)
    pos = np.asarray(positions, dtype=np.float64)
    diff = pos[None, :, :] - pos[:, None, :]
    if pbc and cell is not None:
        cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
        frac = diff @ np.linalg.inv(cell)
        frac -= np.round(frac)
        diff = frac @ cell
    d = np.linalg.norm(diff, axis=-1)
    r = covalent_radii[z]
    bonded = d < (r[:, None] + r[None, :] + skin)
    iu = np.triu(np.ones_like(bonded, dtype=bool), k=1)
    bonded &= iu
    if molecule_index is not None:
        m = np.asarray(molecule_index)
        bonded &= m[:, None] == m[None, :]
    i, j = np.nonzero(bonded)
    return np.stack([i, j], axis=1).astype(np.int64)


def bond_lengths(positions: Tensor, bonds: Tensor, cell: Optional[Tensor] = None) -> Tensor:
    """Bond lengths (..., B) for positions (..., N, 3); minimum image when ``cell`` is given."""
    vec = positions[..., bonds[:, 1], :] - positions[..., bonds[:, 0], :]
    if cell is not None:
        inv = torch.linalg.inv(cell)
        frac = vec @ inv
        frac = frac - torch.round(frac)
        vec = frac @ cell
    return vec.norm(dim=-1)


@dataclass
class System:
    """Static description of one simulated system (shared by all replicas)."""

    atomic_numbers: Tensor  # (N,) long
    masses: Tensor  # (N,) amu
    bonds: Tensor  # (B, 2) long
    ref_bond_lengths: Tensor  # (B,) Å, mean over the reference frames
    cell: Optional[Tensor] = None  # (3, 3) Å, rows are cell vectors
    pbc: bool = False
    molecule_index: Optional[Tensor] = None  # (N,) long
    stability_criterion: str = "bond_length_deviation"
    stability_tolerance: float = 0.5

    def __post_init__(self):
        if self.stability_criterion not in STABILITY_CRITERIA:
            raise ValueError(f"stability_criterion must be one of {STABILITY_CRITERIA}, "
                             f"got {self.stability_criterion!r}")
        if self.stability_criterion in ("imd", "rdf") and self.molecule_index is None:
            raise ValueError(f"stability_criterion {self.stability_criterion!r} needs molecule_index "
                             "(which molecule each atom belongs to) in the data")
        if self.pbc and self.cell is None:
            raise ValueError("a periodic system needs a cell")

    @property
    def n_atoms(self) -> int:
        return int(self.atomic_numbers.shape[0])

    @property
    def n_dof(self) -> int:
        return 3 * self.n_atoms

    def to(self, device=None, dtype=None) -> "System":
        def cv(x):
            if x is None:
                return None
            if x.is_floating_point():
                return x.to(device=device, dtype=dtype or x.dtype)
            return x.to(device=device)
        return replace(self, atomic_numbers=cv(self.atomic_numbers), masses=cv(self.masses),
                       bonds=cv(self.bonds), ref_bond_lengths=cv(self.ref_bond_lengths),
                       cell=cv(self.cell), molecule_index=cv(self.molecule_index))

    @classmethod
    def from_split(cls, split, stability_criterion: str = "bond_length_deviation",
                   stability_tolerance: float = 0.5, bond_frame: int = 10,
                   dtype=torch.float32) -> "System":
        """Build from a :class:`mdsim.data.format.SplitData` (usually the train split).

        Bonds are detected on frame ``bond_frame`` (as the original, frame 10) and their
        reference lengths are the mean over all frames of the split."""
        from ase.data import atomic_masses

        n = len(split)
        f = min(bond_frame, n - 1)
        cell = None if split.cell is None else np.asarray(split.cell[f])
        pbc = bool(np.any(split.pbc)) if split.pbc is not None else False
        bonds = detect_bonds(split.z, split.R[f], cell, pbc, molecule_index=split.molecule_index)
        bonds_t = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
        cell_t = None if cell is None else torch.as_tensor(cell, dtype=dtype)
        ref = bond_lengths(torch.as_tensor(split.R, dtype=torch.float64), bonds_t,
                           None if cell is None else torch.as_tensor(cell, dtype=torch.float64))
        mol = None if split.molecule_index is None else torch.as_tensor(split.molecule_index, dtype=torch.long)
        return cls(
            atomic_numbers=torch.as_tensor(split.z, dtype=torch.long),
            masses=torch.as_tensor(atomic_masses[split.z], dtype=dtype),
            bonds=bonds_t,
            ref_bond_lengths=ref.mean(dim=0).to(dtype),
            cell=cell_t,
            pbc=pbc,
            molecule_index=mol,
            stability_criterion=stability_criterion,
            stability_tolerance=float(stability_tolerance),
        )
