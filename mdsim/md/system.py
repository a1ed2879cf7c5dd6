"""A ``System``: everything that differs between simulated systems, as data.

Built from a dataset split (atomic numbers, a reference frame, cell, molecule membership) plus
the stability criterion named in the config.  Code never branches on a system's name: water's
periodic box, its molecules, its stability criterion (one of
:data:`mdsim.md.stability.CRITERIA`) and that criterion's reference are all fields here.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor

from mdsim.geometry import minimum_image, reference_bond_lengths

if TYPE_CHECKING:  # pragma: no cover
    from mdsim.md.stability import RDFReference

#: skin added to the sum of covalent radii when detecting bonds (Å); spec §3.
BOND_SKIN = 0.6


def detect_bonds(atomic_numbers, positions, cell=None, pbc=False, skin: float = BOND_SKIN,
                 molecule_index=None) -> np.ndarray:
    """Bonds (i<j) with d_ij < r_cov,i + r_cov,j + skin (ASE covalent radii; exact minimum
    image if periodic, any cell shape).  With ``molecule_index``, only pairs inside one
    molecule are bonds.  Returns (B, 2) int64, sorted by i then j."""
    from ase.data import covalent_radii

    pos = torch.as_tensor(np.asarray(positions), dtype=torch.float64)
    i, j = torch.triu_indices(pos.shape[0], pos.shape[0], offset=1)
    disp = pos[j] - pos[i]
    if pbc and cell is not None:
        disp = minimum_image(disp, torch.as_tensor(np.asarray(cell), dtype=torch.float64).reshape(3, 3),
                             exact=True)
    d = disp.norm(dim=-1).numpy()
    i, j = i.numpy(), j.numpy()
    r = covalent_radii[np.asarray(atomic_numbers)]
    bonded = d < r[i] + r[j] + skin
    if molecule_index is not None:
        m = np.asarray(molecule_index)
        bonded &= m[i] == m[j]
    return np.stack([i[bonded], j[bonded]], axis=1).astype(np.int64)


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
    rdf_reference: Optional["RDFReference"] = None  # reference g(r) of the ``rdf`` criterion

    def __post_init__(self):
        from mdsim.md.stability import CRITERIA

        crit = CRITERIA.get(self.stability_criterion)
        if crit is None:
            raise ValueError(f"stability_criterion must be one of {tuple(CRITERIA)}, "
                             f"got {self.stability_criterion!r}")
        if crit.needs_molecules and self.molecule_index is None:
            raise ValueError(f"stability_criterion {self.stability_criterion!r} needs molecule_index "
                             "(which molecule each atom belongs to) in the data")
        if crit.needs_reference and self.rdf_reference is None:
            raise ValueError(f"stability_criterion {self.stability_criterion!r} needs a reference RDF "
                             "(System.rdf_reference, from mdsim.md.stability.rdf_reference)")
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
        ref = None if self.rdf_reference is None else self.rdf_reference.to(device)
        return replace(self, atomic_numbers=cv(self.atomic_numbers), masses=cv(self.masses),
                       bonds=cv(self.bonds), ref_bond_lengths=cv(self.ref_bond_lengths),
                       cell=cv(self.cell), molecule_index=cv(self.molecule_index), rdf_reference=ref)

    @classmethod
    def from_split(cls, split, stability_criterion: str = "bond_length_deviation",
                   stability_tolerance: float = 0.5, bond_frame: int = 10,
                   dtype=torch.float32, rdf_reference: Optional["RDFReference"] = None) -> "System":
        """Build from a :class:`mdsim.data.format.SplitData` (usually the train split).

        Bonds are detected on frame ``bond_frame`` (as the original, frame 10) and their
        reference lengths are the mean over all frames of the split.  ``rdf_reference``: the
        reference of the ``rdf`` criterion (:func:`mdsim.md.stability.rdf_reference`)."""
        from ase.data import atomic_masses

        n = len(split)
        f = min(bond_frame, n - 1)
        cell = None if split.cell is None else np.asarray(split.cell[f])
        pbc = bool(np.any(split.pbc)) if split.pbc is not None else False
        bonds = detect_bonds(split.z, split.R[f], cell, pbc, molecule_index=split.molecule_index)
        bonds_t = torch.as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
        ref = reference_bond_lengths(torch.as_tensor(split.R, dtype=torch.float64), bonds_t,
                                     None if cell is None else torch.as_tensor(cell, dtype=torch.float64))
        mol = None if split.molecule_index is None else torch.as_tensor(split.molecule_index, dtype=torch.long)
        return cls(
            atomic_numbers=torch.as_tensor(split.z, dtype=torch.long),
            masses=torch.as_tensor(atomic_masses[split.z], dtype=dtype),
            bonds=bonds_t,
            ref_bond_lengths=ref.to(dtype),
            cell=None if cell is None else torch.as_tensor(cell, dtype=dtype),
            pbc=pbc,
            molecule_index=mol,
            stability_criterion=stability_criterion,
            stability_tolerance=float(stability_tolerance),
            rdf_reference=rdf_reference,
        )
