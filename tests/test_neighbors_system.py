"""Neighbour lists and System construction against ASE."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.neighborlist import NeighborList, natural_cutoffs, neighbor_list

from mdsim.data.format import SplitData
from mdsim.geometry import all_pairs_edges, batch_all_pairs_edges, bond_lengths, edge_vectors, periodic_edges
from mdsim.md.system import System, detect_bonds


def _pairs_set(ei, vec=None):
    out = {}
    for k in range(ei.shape[1]):
        key = (int(ei[0, k]), int(ei[1, k]))
        out.setdefault(key, []).append(None if vec is None else tuple(np.round(vec[k].tolist(), 6)))
    return out


def test_all_pairs_static_and_batched():
    ei = all_pairs_edges(4, 3)
    assert ei.shape == (2, 3 * 4 * 3)
    src, dst = ei
    assert torch.all(src != dst)
    assert torch.all(src // 4 == dst // 4)  # never across structures
    assert len(set(zip(src.tolist(), dst.tolist()))) == ei.shape[1]
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    eb = batch_all_pairs_edges(batch, 3)
    assert eb.shape[1] == 3 * 2 + 2 * 1 + 4 * 3
    assert torch.all(batch[eb[0]] == batch[eb[1]]) and torch.all(eb[0] != eb[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_periodic_edges_match_ase(seed):
    rng = np.random.default_rng(seed)
    # random "water box": 24 atoms in a triclinic-ish cell, two structures batched
    cells = [np.diag([7.0, 7.5, 8.0]), np.array([[7.0, 0.0, 0.0], [1.0, 7.2, 0.0], [0.5, 0.3, 7.8]])]
    pos_all, batch, cell_t = [], [], []
    for s, c in enumerate(cells):
        frac = rng.random((24, 3))
        pos_all.append(frac @ c)
        batch += [s] * 24
        cell_t.append(c)
    pos = torch.tensor(np.concatenate(pos_all), requires_grad=True)
    cell = torch.tensor(np.stack(cell_t))
    batch = torch.tensor(batch)
    cutoff = 3.3
    ei, sh = periodic_edges(pos, cell, batch, cutoff)
    vec = edge_vectors(pos, ei, sh)
    assert torch.all(vec.norm(dim=1) < cutoff)
    for s, c in enumerate(cells):
        atoms = Atoms(numbers=[8] * 24, positions=pos_all[s], cell=c, pbc=True)
        i, j, D = neighbor_list("ijD", atoms, cutoff)
        ref = _pairs_set(np.stack([i + 24 * s, j + 24 * s]), D)
        m = (ei[0] >= 24 * s) & (ei[0] < 24 * (s + 1))
        ours = _pairs_set(ei[:, m].numpy(), vec[m].detach().numpy())
        assert set(ref) == set(ours)
        for k in ref:
            assert sorted(ref[k]) == sorted(ours[k])
    # differentiable in positions
    vec.norm(dim=1).sum().backward()
    assert pos.grad is not None and torch.isfinite(pos.grad).all()


def test_detect_bonds_matches_ase_natural_cutoffs():
    from ase.build import molecule
    for name in ["CH3CH2OH", "C6H6", "CH3COOH"]:
        atoms = molecule(name)
        atoms.positions += np.random.default_rng(0).normal(scale=0.05, size=atoms.positions.shape)
        # ASE's NeighborList adds the skin to each atom's radius: d < r_i + r_j + 2*skin
        nl = NeighborList(natural_cutoffs(atoms), skin=0.3, self_interaction=False, bothways=False)
        nl.update(atoms)
        ref = set()
        for a in range(len(atoms)):
            for b in nl.get_neighbors(a)[0]:
                ref.add((min(a, b), max(a, b)))
        ours = {tuple(b) for b in detect_bonds(atoms.numbers, atoms.positions).tolist()}
        assert ours == ref, name


def test_system_from_split_bonds_and_reference_lengths():
    from ase.build import molecule
    atoms = molecule("CH3CH2OH")
    rng = np.random.default_rng(1)
    R = atoms.positions[None] + rng.normal(scale=0.02, size=(20, len(atoms), 3))
    split = SplitData(R=R, z=atoms.numbers, E=np.zeros(20), F=np.zeros_like(R), fid=np.arange(20))
    sys_ = System.from_split(split, dtype=torch.float64)
    assert sys_.bonds.shape[0] == 8  # ethanol has 8 bonds
    d = np.linalg.norm(R[:, sys_.bonds[:, 1]] - R[:, sys_.bonds[:, 0]], axis=-1).mean(0)
    np.testing.assert_allclose(sys_.ref_bond_lengths.numpy(), d, rtol=1e-12)
    assert sys_.masses[0] == pytest.approx(12.011, abs=1e-3)


def test_bond_lengths_minimum_image():
    cell = torch.eye(3, dtype=torch.float64) * 5.0
    pos = torch.tensor([[0.1, 0.0, 0.0], [4.9, 0.0, 0.0]], dtype=torch.float64)
    bonds = torch.tensor([[0, 1]])
    assert bond_lengths(pos, bonds, cell).item() == pytest.approx(0.2)
    assert bond_lengths(pos, bonds).item() == pytest.approx(4.8)


def test_system_rejects_bad_criterion():
    with pytest.raises(ValueError, match="stability_criterion"):
        System(atomic_numbers=torch.tensor([1]), masses=torch.tensor([1.0]),
               bonds=torch.zeros(0, 2, dtype=torch.long), ref_bond_lengths=torch.zeros(0),
               stability_criterion="energy")
    with pytest.raises(ValueError, match="molecule_index"):
        System(atomic_numbers=torch.tensor([1]), masses=torch.tensor([1.0]),
               bonds=torch.zeros(0, 2, dtype=torch.long), ref_bond_lengths=torch.zeros(0),
               stability_criterion="imd")
