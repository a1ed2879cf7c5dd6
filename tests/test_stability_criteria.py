"""The stability-criterion registry: each value function against a direct computation on
hand-built configurations (incl. across periodic boundaries), the rdf criterion's window
semantics and that it separates destroyed from equilibrium structures; and the geometry layer
(general-cell minimum image, the all-pairs edge cache)."""
import itertools

import numpy as np
import pytest
import torch

from mdsim import geometry as geo
from mdsim.config import StableConfig
from mdsim.md.stability import CRITERIA, RDFReference, get_criterion, rdf_reference, stability_values
from mdsim.md.system import System

DT = torch.float64
L = 5.0


def _system(criterion, tol, rdf_ref=None, cell=True):
    """Two diatomic molecules in a cubic L box (or no box): O–H, O–H, reference bond 1.0 Å."""
    return System(atomic_numbers=torch.tensor([8, 1, 8, 1]), masses=torch.tensor([16.0, 1.0, 16.0, 1.0], dtype=DT),
                  bonds=torch.tensor([[0, 1], [2, 3]]), ref_bond_lengths=torch.tensor([1.0, 1.0], dtype=DT),
                  cell=torch.eye(3, dtype=DT) * L if cell else None, pbc=cell,
                  molecule_index=torch.tensor([0, 0, 1, 1]), stability_criterion=criterion,
                  stability_tolerance=tol, rdf_reference=rdf_ref)


# molecule 0 straddles the x boundary (O at 0.2, H at 4.6 → bond 0.6 Å through the face, deviation
# 0.4; molecule 1's bond is 1.1 Å); molecule 1's H sits 0.5 Å from molecule 0's O through the y face
X = torch.tensor([[0.2, 0.1, 1.0], [4.6, 0.1, 1.0], [0.2, 3.5, 1.0], [0.2, 4.6, 1.0]], dtype=DT)


def _brute_min_image(a, b, cell):
    return min(np.linalg.norm(b - a + np.array(s) @ cell) for s in itertools.product((-1, 0, 1), repeat=3))


def test_registry_entries_are_complete_and_consistent_with_the_config():
    assert tuple(CRITERIA) == ("bond_length_deviation", "imd", "rdf")
    from mdsim.config.stable import CRITERIA as CONFIG_CRITERIA
    assert CONFIG_CRITERIA == tuple(CRITERIA)
    keys = set(StableConfig.__dataclass_fields__)
    for name, c in CRITERIA.items():
        assert c.name == name and c.tolerance_key in keys and c.label
    assert [c.label for c in CRITERIA.values()] == ["Max Bond Length Deviation", "Min Intermolecular Distances",
                                                   "RDF MAE"]
    assert get_criterion("imd").is_unstable(torch.tensor([1.19, 1.2]), 1.2).tolist() == [True, False]
    assert get_criterion("bond_length_deviation").is_unstable(torch.tensor([0.49, 0.5]), 0.5).tolist() == [False, True]
    with pytest.raises(ValueError, match="stability_criterion must be one of"):
        get_criterion("energy")
    import simulator
    with pytest.raises(SystemExit):  # rdf needs reference data the simulator CLI does not have
        simulator.parse_args(["--checkpoint", "c", "--init", "i", "--out", "o", "--stability-criterion", "rdf"])
    assert simulator.parse_args(["--checkpoint", "c", "--init", "i", "--out", "o",
                                 "--stability-criterion", "imd"]).stability_criterion == "imd"


def test_bond_deviation_value_across_the_boundary():
    cell = (torch.eye(3, dtype=DT) * L).numpy()
    x = X.numpy()
    direct = max(abs(_brute_min_image(x[0], x[1], cell) - 1.0), abs(_brute_min_image(x[2], x[3], cell) - 1.0))
    sysm = _system("bond_length_deviation", 0.3)
    v = CRITERIA["bond_length_deviation"].value(X, sysm, sysm.cell)
    assert v.item() == pytest.approx(direct, abs=1e-12) and direct == pytest.approx(0.4)
    # without a box the same atoms are 4.4 Å apart
    free = _system("bond_length_deviation", 0.5, cell=False)
    assert CRITERIA["bond_length_deviation"].value(X, free, None).item() == pytest.approx(3.4)
    u, val = stability_values(X.repeat(2, 3, 1, 1), sysm)  # (T, R) frames × replicas
    assert u.shape == (2, 3) and u.all() and torch.allclose(val, torch.full((2, 3), direct, dtype=DT))


def test_imd_value_across_the_boundary_per_replica_cells():
    x = X.numpy()
    sysm = _system("imd", 1.0)
    cells = torch.stack([torch.eye(3, dtype=DT) * L, torch.eye(3, dtype=DT) * 2 * L])  # per replica
    v = CRITERIA["imd"].value(X.repeat(2, 1, 1), sysm, cells)
    for r in range(2):
        c = cells[r].numpy()
        direct = min(_brute_min_image(x[i], x[j], c) for i in (0, 1) for j in (2, 3))
        assert v[r].item() == pytest.approx(direct, abs=1e-12)
    assert v[0].item() == pytest.approx(0.5) and v[1].item() == pytest.approx(3.4)  # y face of the small box
    u, _ = stability_values(X.repeat(2, 1, 1), sysm, cell=cells)
    assert u.tolist() == [True, False]


def _numpy_pair_rdf(frames, z, cell, pair, r_max, dr):
    """Frame-mean element-pair g(r), double loop with brute-force minimum image."""
    edges = np.linspace(0, r_max, int(round(r_max / dr)) + 1)
    ia, ib = np.nonzero(z == pair[0])[0], np.nonzero(z == pair[1])[0]
    counts = np.zeros(len(edges) - 1)
    for x in frames:
        for a in ia:
            for b in ib:
                if a != b:
                    d = _brute_min_image(x[a], x[b], cell)
                    k = np.searchsorted(edges, d, side="right") - 1
                    if 0 <= k < len(counts):
                        counts[k] += 1
    rho = len(ia) * len(ib) / abs(np.linalg.det(cell))
    return counts / len(frames) / (rho * 4 * np.pi / 3 * (edges[1:] ** 3 - edges[:-1] ** 3))


def test_rdf_value_is_the_window_mae_against_the_reference():
    rng = np.random.default_rng(0)
    z = np.array([8, 1, 8, 1])
    cell = np.eye(3) * L
    r_max, dr = 2.5, 0.5
    ref_frames = rng.random((3, 4, 3)) * L
    ref = rdf_reference(ref_frames, z, cell, r_max, dr)
    assert ref.pairs == ((1, 1), (1, 8), (8, 8))
    for row, pair in zip(ref.g.numpy(), ref.pairs):
        np.testing.assert_allclose(row, _numpy_pair_rdf(ref_frames, z, cell, pair, r_max, dr), rtol=1e-12)
    sysm = _system("rdf", 3.0, rdf_ref=ref)
    win = rng.random((2, 3, 4, 3)) * L  # (F=2 frames, R=3 replicas, N, 3)
    value = CRITERIA["rdf"].value(torch.tensor(win), sysm, sysm.cell)
    assert value.shape == (3,)
    for r in range(3):
        maes = [r_max * np.abs(_numpy_pair_rdf(win[:, r], z, cell, p, r_max, dr) - g).mean()
                for p, g in zip(ref.pairs, ref.g.numpy())]
        assert value[r].item() == pytest.approx(max(maes), rel=1e-12)
    # single structures: one value each, from that structure's RDF
    single = CRITERIA["rdf"].value(torch.tensor(win[1]), sysm, sysm.cell)
    mae1 = max(r_max * np.abs(_numpy_pair_rdf(win[1, 0:1], z, cell, p, r_max, dr) - g).mean()
               for p, g in zip(ref.pairs, ref.g.numpy()))
    assert single.shape == (3,) and single[0].item() == pytest.approx(mae1, rel=1e-12)
    # stability_values repeats the window value over the frames; a NaN frame spoils its window
    win_t = torch.tensor(win)
    win_t[1, 2, 0, 0] = float("nan")
    u, v = stability_values(win_t, sysm)
    assert u.shape == (2, 3) and torch.equal(v[0, :2], v[1, :2]) and torch.isnan(v[:, 2]).all() and u[:, 2].all()
    # no cell: the molecular histogram RDF of the evaluation
    mol = rdf_reference(ref_frames, z, None, 3.0, 0.5)
    assert mol.pairs is None and mol.g.shape == (1, 6)


def test_rdf_reference_and_system_errors():
    with pytest.raises(ValueError, match="needs a reference RDF"):
        _system("rdf", 3.0)
    with pytest.raises(ValueError, match="exceeds half the periodic box"):
        rdf_reference(np.zeros((1, 4, 3)), [8, 1, 8, 1], np.eye(3) * L, r_max=3.0, dr=0.1)
    with pytest.raises(ValueError, match="shape"):
        RDFReference(g=torch.zeros(2, 5), r_max=1.0, dr=0.2, pairs=((8, 8),))


def test_rdf_criterion_flags_destroyed_structures_not_equilibrium():
    """Water box: reference from 200 thermal frames; a window of 10 other equilibrium frames
    stays well below the original's tolerance 3.0, uniformly random atoms and a collapsed box
    exceed it (in every frame of their window)."""
    from test_water_local import L_BOX, water_frames

    data = water_frames(260, seed=0)
    ref = rdf_reference(data.R[:200], data.z, data.cell[:200], r_max=3.0, dr=0.1)
    sysm = System.from_split(data, "rdf", 3.0, dtype=DT, rdf_reference=ref)
    rng = np.random.default_rng(5)
    eq = torch.tensor(data.R[200:210])
    rand = torch.tensor(rng.random((10, 24, 3)) * L_BOX)
    collapsed = (eq - L_BOX / 2) * 0.3 + L_BOX / 2
    unstable, value = stability_values(torch.stack([eq, rand, collapsed], 1), sysm)
    assert unstable.tolist() == [[False, True, True]] * 10
    assert value[0, 0] < 1.0 and value[0, 1] > 3.0 and value[0, 2] > 10.0


def test_general_cell_minimum_image_matches_ase():
    from ase import Atoms
    cell = np.array([[5.0, 0.0, 0.0], [3.8, 4.0, 0.0], [1.5, 2.0, 4.5]])  # strongly skewed
    pos = np.random.default_rng(2).random((12, 3)) @ cell
    ref = Atoms("X12", positions=pos, cell=cell, pbc=True).get_all_distances(mic=True)
    i, j = torch.triu_indices(12, 12, 1)
    p = torch.tensor(pos)
    d = geo.minimum_image(p[j] - p[i], torch.tensor(cell), exact=True).norm(dim=-1)
    np.testing.assert_allclose(d.numpy(), ref[i.numpy(), j.numpy()], atol=1e-12)
    rounded = geo.minimum_image(p[j] - p[i], torch.tensor(cell)).norm(dim=-1)
    assert (rounded >= d - 1e-12).all() and (rounded > d + 1e-6).any()  # plain rounding is not exact here


def test_all_pairs_cache_returns_the_same_tensor_and_keeps_pinned_entries():
    a = geo.all_pairs_edges(5, 2, "cpu", pin=True)
    assert geo.all_pairs_edges(5, 2, torch.device("cpu")) is a
    for n in range(6, 6 + 40):  # more than the unpinned capacity
        geo.all_pairs_edges(n, 1)
    assert geo.all_pairs_edges(5, 2) is a
