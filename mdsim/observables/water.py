"""Water local neighbourhoods and the local observable (spec §4, §5 localized estimator).

A neighbourhood is a centre molecule plus its ``n_closest_molecules`` nearest molecules
(O–O minimum-image distance).  Neighbourhoods are returned as atom index sets of fixed size
(all molecules must have the same number of atoms, true for water); the centre molecule's atoms
come first, its O atom first of all, then the neighbours by increasing distance."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mdsim.geometry import flat_cell, flatten_batch, minimum_image


def molecule_atoms(molecule_index: torch.Tensor, atomic_numbers: torch.Tensor,
                   center_element: int = 8) -> torch.Tensor:
    """(n_molecules, atoms_per_molecule) atom indices per molecule, the ``center_element`` atom
    (O for water) first, the others in index order."""
    m = torch.as_tensor(molecule_index, dtype=torch.long).reshape(-1)
    z = torch.as_tensor(atomic_numbers, dtype=torch.long, device=m.device).reshape(-1)
    mols = torch.unique(m)
    rows = []
    for k in mols.tolist():
        idx = torch.nonzero(m == k).reshape(-1)
        is_c = z[idx] == center_element
        if int(is_c.sum()) < 1:
            raise ValueError(f"molecule {k} has no atom with Z={center_element}")
        first = idx[is_c][:1]
        rest = idx[idx != first[0]]
        rows.append(torch.cat([first, rest]))
    sizes = {r.numel() for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"molecules have different sizes {sorted(sizes)}")
    return torch.stack(rows, 0)


def choose_centers(n_molecules: int, n_local_neighborhoods: int,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``n_local_neighborhoods`` distinct random molecule ids (all molecules if equal)."""
    if n_local_neighborhoods > n_molecules:
        raise ValueError(f"{n_local_neighborhoods} neighbourhoods > {n_molecules} molecules")
    return torch.randperm(n_molecules, generator=generator)[:n_local_neighborhoods]


def local_neighborhoods(positions: torch.Tensor, molecule_index: torch.Tensor,
                        atomic_numbers: torch.Tensor, n_local_neighborhoods: int = 64,
                        n_closest_molecules: int = 0, cell=None,
                        centers: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None,
                        center_element: int = 8) -> Tuple[torch.Tensor, torch.Tensor]:
    """Atom index sets of local neighbourhoods of every structure.

    positions (..., N, 3).  Centre molecules: ``centers`` (L,) or ``n_local_neighborhoods``
    distinct random molecules (shared by all structures).  Returns
    ``(neighborhoods (..., L, (k+1)·A) long, centers (L,) long)`` with k = n_closest_molecules
    and A atoms per molecule; neighbours are ranked per structure by minimum-image O–O distance
    (the ``center_element`` atoms)."""
    x, batch_shape = flatten_batch(positions.detach(), 2)
    mol_atoms = molecule_atoms(molecule_index, atomic_numbers, center_element).to(x.device)  # (Mo, A)
    n_mol, A = mol_atoms.shape
    if centers is None:
        centers = choose_centers(n_mol, n_local_neighborhoods, generator)
    centers = torch.as_tensor(centers, dtype=torch.long, device=x.device).reshape(-1)
    k = int(n_closest_molecules)
    if k > n_mol - 1:
        raise ValueError(f"n_closest_molecules={k} but only {n_mol - 1} other molecules")
    L = centers.numel()
    if k == 0:
        nb = mol_atoms[centers].reshape(1, L, A).expand(x.shape[0], L, A)
    else:
        o = mol_atoms[:, 0]  # centre atoms of all molecules
        c = flat_cell(cell, x, batch_shape)
        d = x[:, o[centers], None, :] - x[:, None, o, :]  # (B, L, Mo, 3)
        if c is not None:
            d = minimum_image(d, c if c.dim() == 2 else c[:, None])
        dist = (d * d).sum(-1)
        dist[:, torch.arange(L, device=x.device), centers] = -1.0  # the centre itself ranks first
        order = torch.argsort(dist, dim=-1)[..., : k + 1]  # (B, L, k+1) molecule ids
        nb = mol_atoms[order].reshape(x.shape[0], L, (k + 1) * A)
    return nb.reshape(tuple(batch_shape) + (L, nb.shape[-1])), centers


def local_bond_lengths(positions: torch.Tensor, neighborhoods: torch.Tensor, cell=None,
                       n_bonds: int = 2) -> torch.Tensor:
    """Local observable: lengths of the bonds between the centre molecule's first atom (O) and its
    next ``n_bonds`` atoms (the two O–H bonds for water).

    positions (..., N, 3), neighborhoods (..., L, S) or (L, S) from :func:`local_neighborhoods`
    → (..., L, n_bonds)."""
    x, batch_shape = flatten_batch(positions, 2)
    nb = torch.as_tensor(neighborhoods, dtype=torch.long, device=x.device)
    nb = nb.reshape((-1,) + tuple(nb.shape[-2:])) if nb.dim() > 2 else nb[None]
    nb = nb.expand(x.shape[0], -1, -1)
    L = nb.shape[1]
    c = flat_cell(cell, x, batch_shape)
    center = nb[:, :, :1].expand(-1, -1, n_bonds)
    other = nb[:, :, 1:1 + n_bonds]
    bi = torch.arange(x.shape[0], device=x.device)[:, None, None]
    dvec = x[bi, other] - x[bi, center]  # (B, L, n_bonds, 3)
    if c is not None:
        dvec = minimum_image(dvec, c if c.dim() == 2 else c[:, None])
    d = torch.sqrt(torch.clamp((dvec * dvec).sum(-1), min=torch.finfo(x.dtype).tiny))
    return d.reshape(tuple(batch_shape) + (L, n_bonds))


def neighborhood_energies(atom_energies: torch.Tensor, neighborhoods: torch.Tensor) -> torch.Tensor:
    """Σ of per-atom energies over each neighbourhood's atoms.

    atom_energies (..., N), neighborhoods (..., L, S) or (L, S) → (..., L).  Differentiable."""
    e = atom_energies
    nb = torch.as_tensor(neighborhoods, dtype=torch.long, device=e.device)
    if nb.dim() == 2:
        return e[..., nb].sum(-1)
    flat_e = e.reshape(-1, e.shape[-1])
    flat_nb = nb.reshape(flat_e.shape[0], -1)
    out = torch.gather(flat_e, 1, flat_nb).reshape(flat_e.shape[0], nb.shape[-2], nb.shape[-1]).sum(-1)
    return out.reshape(tuple(e.shape[:-1]) + (nb.shape[-2],))


def oxygen_indices(atomic_numbers: torch.Tensor) -> torch.Tensor:
    """Indices of the O atoms (Z = 8)."""
    return torch.nonzero(torch.as_tensor(atomic_numbers).reshape(-1) == 8).reshape(-1)
