"""Observables vs slow reference implementations and known physical cases."""
import math

import numpy as np
import pytest
import torch

from mdsim import observables as ob
from mdsim.units import KB


def _np_mic(d, L):
    return d - L * np.round(d / L)


# ------------------------------------------------------------------------------------ RDF

def test_smeared_rdf_matches_double_loop_and_normalisation():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 6, 3)) * 1.5
    r_max, dr, sig = 5.0, 0.1, 0.05
    g = ob.smeared_rdf(torch.tensor(X), r_max, dr, sig)
    M = int((r_max - 1e-6) / dr) + 1
    assert g.shape == (3, M) and g.dtype == torch.float64
    c = np.linspace(1e-6, r_max, M)
    for r in range(3):
        h = np.zeros(M)
        for i in range(6):
            for j in range(6):
                if i != j:
                    d = np.linalg.norm(X[r, i] - X[r, j])
                    h += np.exp(-((d - c) ** 2) / (2 * sig ** 2))
        h = 100 * h / h.sum()
        np.testing.assert_allclose(g[r].numpy(), h, rtol=1e-10, atol=1e-12)
    # md17 default bin count from the spec
    assert ob.smeared_rdf_centers(10.0, 0.02).numel() == 500


def test_smeared_rdf_batched_float32_and_differentiable():
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    g = ob.smeared_rdf(x, 4.0, 0.1, 0.1)
    assert g.shape == (2, 4, 40)
    torch.testing.assert_close(g.sum(-1), torch.full((2, 4), 100.0, dtype=torch.float64))
    g32 = ob.smeared_rdf(x.detach().float(), 4.0, 0.1, 0.1)
    assert g32.dtype == torch.float32
    torch.testing.assert_close(g32.double(), g.detach(), rtol=1e-4, atol=1e-4)
    # chunking gives the same answer
    torch.testing.assert_close(ob.smeared_rdf(x, 4.0, 0.1, 0.1, chunk_elems=100), g)
    xs = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: ob.smeared_rdf(y, 3.0, 0.3, 0.3)[..., ::3], (xs,))


def test_histogram_rdf_matches_numpy_density():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4, 7, 3)) * 2
    r_max, dr = 6.0, 0.25
    h = ob.histogram_rdf(torch.tensor(X), r_max, dr)
    edges = np.linspace(1e-6, r_max, int(r_max / dr) + 1)
    for r in range(4):
        d = [np.linalg.norm(X[r, i] - X[r, j]) for i in range(7) for j in range(7) if i != j]
        ref, _ = np.histogram(d, edges, density=True)
        ref[0] = 0
        np.testing.assert_allclose(h[r].numpy(), ref, rtol=1e-12, atol=1e-12)


def test_reweighting_formula_and_ess():
    rng = np.random.default_rng(2)
    E = rng.normal(size=50) * 0.05
    H = rng.random((50, 8))
    g, ess = ob.reweight_reference_rdf(torch.tensor(H), torch.tensor(E), 300.0, 500.0)
    lw = -(E - E.mean()) * (1 / (KB * 300) - 1 / (KB * 500))
    w = np.exp(lw - lw.max())
    w /= w.sum()
    ref = (w[:, None] * H).sum(0)
    ref = 100 * ref / ref.sum()
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(ess, np.exp(-(w * np.log(w)).sum()), rtol=1e-10)
    assert 1 <= ess < 50
    # same temperature: uniform weights, ESS = n
    _, ess_same = ob.reweight_reference_rdf(torch.tensor(H), torch.tensor(E), 500.0, 500.0)
    assert abs(ess_same - 50) < 1e-8
    # colder simulation favours low-energy frames
    w_t, _ = ob.boltzmann_reweighting(torch.tensor(E), 300.0, 500.0)
    assert int(torch.argmax(w_t)) == int(np.argmin(E))
    g2, _ = ob.reference_rdf(torch.tensor(rng.normal(size=(20, 5, 3))), torch.zeros(20), 500.0, r_max=5, dr=0.5)
    assert abs(float(g2.sum()) - 100) < 1e-9


def test_rdf_mae():
    g = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    ref = torch.tensor([1.0, 1.0, 1.0])
    torch.testing.assert_close(ob.rdf_mae(g, ref, 6.0), torch.tensor([6.0 * 3 / 3, 6.0]))
    torch.testing.assert_close(ob.rdf_mae(g[:1], ref, 6.0, match_sum=True), torch.tensor([6.0 * 2 / 3]))


def test_water_rdf_ideal_gas_is_one():
    torch.manual_seed(0)
    L = 10.0
    n = 400
    z = torch.tensor([8] * 200 + [1] * 200)
    x = torch.rand(20, n, 3, dtype=torch.float64) * L
    g = ob.element_pair_rdf(x, z, (1, 8), torch.eye(3, dtype=torch.float64) * L, r_max=5.0, dr=0.25)
    gm = g.mean(0)
    assert gm.shape == (20,)
    # beyond the smallest shells the counts are large: g ≈ 1 within a few %
    assert torch.all((gm[4:] - 1).abs() < 0.06), gm
    assert abs(float(gm[4:].mean()) - 1) < 0.01
    goo = ob.element_pair_rdf(x, z, (8, 8), torch.tensor([L, L, L]), r_max=5.0, dr=0.25).mean(0)
    assert abs(float(goo[4:].mean()) - (1 - 1 / 200)) < 0.01


def test_water_rdfs_match_double_loop_with_per_frame_cells():
    rng = np.random.default_rng(3)
    z = np.array([8, 1, 1] * 4)
    Ls = np.array([5.0, 6.0])
    X = rng.random((2, 12, 3)) * Ls[:, None, None] + 3.0  # not wrapped
    cells = torch.tensor(np.stack([np.eye(3) * L for L in Ls]))
    out = ob.water_rdfs(torch.tensor(X), torch.tensor(z), cells, r_max=3.0, dr=0.3)
    edges = np.linspace(0, 3.0, 11)
    shell = 4 * np.pi / 3 * (edges[1:] ** 3 - edges[:-1] ** 3)
    for name, (za, zb) in ob.WATER_PAIRS.items():
        for f in range(2):
            ia, ib = np.where(z == za)[0], np.where(z == zb)[0]
            d = [np.linalg.norm(_np_mic(X[f, b] - X[f, a], Ls[f])) for a in ia for b in ib if a != b]
            cnt, _ = np.histogram(d, edges)
            ref = cnt / (len(ia) * len(ib) / Ls[f] ** 3 * shell)
            np.testing.assert_allclose(out[name][f].numpy(), ref, rtol=1e-10, err_msg=name)


# ------------------------------------------------------------------------------------ ADF

def _water_molecule(angle_deg, r=0.96):
    a = math.radians(angle_deg)
    return np.array([[0, 0, 0], [r, 0, 0], [r * math.cos(a), r * math.sin(a), 0]])


def test_adf_rigid_molecule_peaks_at_its_angle():
    X = _water_molecule(104.5)
    R = torch.tensor(np.stack([X + 0.1 * k for k in range(3)]))
    tr = ob.angle_triplets(torch.tensor([[0, 1], [0, 2]]))
    assert sorted(map(tuple, tr.tolist())) == [(1, 0, 2), (2, 0, 1)]
    h = ob.adf(R, tr)
    assert h.shape == (3, 180)
    torch.testing.assert_close(h.sum(-1), torch.ones(3, dtype=torch.float64))
    centres = ob.adf_bin_centers()
    assert abs(float(centres[h[0].argmax()]) - 104.5) < 1.0


def test_adf_matches_double_loop_and_cutoff():
    rng = np.random.default_rng(4)
    bonds = np.array([[0, 1], [1, 2], [2, 3], [1, 4], [4, 5]])
    X = rng.normal(size=(2, 6, 3))
    X[1, 3] = X[1, 2] + np.array([5.0, 0, 0])  # bond (2,3) longer than the cutoff in frame 1
    tr = ob.angle_triplets(torch.tensor(bonds))
    # brute force triplets
    nbr = {i: set() for i in range(6)}
    for a, b in bonds:
        nbr[a].add(b)
        nbr[b].add(a)
    bf = sorted((i, j, k) for j in range(6) for i in nbr[j] for k in nbr[j] if i != k)
    assert sorted(map(tuple, tr.tolist())) == bf
    h = ob.adf(torch.tensor(X), tr, bond_cutoff=3.0)
    c = np.linspace(0, 180, 180)
    for f in range(2):
        ref = np.zeros(180)
        for i, j, k in bf:
            a, b = X[f, i] - X[f, j], X[f, k] - X[f, j]
            if np.linalg.norm(a) < 3 and np.linalg.norm(b) < 3:
                ang = np.degrees(np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
                ref += np.exp(-((ang - c) ** 2) / 2)
        np.testing.assert_allclose(h[f].numpy(), ref / ref.sum(), rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------ VACF

def test_vacf_harmonic_oscillator_is_cosine():
    torch.manual_seed(0)
    T, n, w, dt = 400, 500, 60, 0.05
    phase = torch.rand(n, 3, dtype=torch.float64) * 2 * math.pi
    t = torch.arange(T, dtype=torch.float64)[:, None, None] * dt
    v = 3.0 * torch.cos(w * 0 + 2.0 * t + phase)  # ω = 2
    c = ob.vacf(v[:, None], window=w)  # one replica
    assert c.shape == (1, w)
    tau = torch.arange(w, dtype=torch.float64) * dt
    torch.testing.assert_close(c[0], torch.cos(2.0 * tau), atol=0.03, rtol=0)
    assert float(c[0, 0]) == 1.0


def test_vacf_matches_double_loop_and_positions_version():
    rng = np.random.default_rng(5)
    V = rng.normal(size=(30, 2, 4, 3))
    c = ob.vacf(torch.tensor(V), 10)
    for r in range(2):
        v = V[:, r]
        norm = (v ** 2).mean() + 1e-6
        ref = [1.0] + [np.mean([(v[t] * v[t + k]).mean() for t in range(30 - k)]) / norm for k in range(1, 10)]
        np.testing.assert_allclose(c[r].numpy(), ref, rtol=1e-10)
    X = np.cumsum(V, axis=0) * 0.5
    cp = ob.vacf_from_positions(torch.tensor(X), 10, dt=0.5)
    torch.testing.assert_close(cp, ob.vacf(torch.tensor(V[1:]), 10))
    cw = ob.windowed_vacf(torch.tensor(V), 10, stride=2)  # windows 0 and 2
    torch.testing.assert_close(cw, 0.5 * (ob.vacf(torch.tensor(V[:10]), 10) + ob.vacf(torch.tensor(V[20:30]), 10)))


# -------------------------------------------------------------------------------- diffusion

def test_diffusivity_of_random_walk():
    torch.manual_seed(1)
    T, n, s = 200, 400, 0.3
    steps = torch.randn(T, n, 3, dtype=torch.float64) * s
    x = torch.cumsum(steps, 0)
    D = ob.diffusivity(x, frame_spacing=2.0, max_lag=20)
    # MSD = 3 s² τ (1 − 1/n) after removing the centroid; D = MSD/(6 τ·2)
    expect = 3 * s * s * (1 - 1 / n) / 12.0
    assert D.shape == (20,)
    assert torch.all((D / expect - 1).abs() < 0.05), D / expect


def test_msd_matches_double_loop_with_atom_selection():
    rng = np.random.default_rng(6)
    X = rng.normal(size=(15, 6, 3)).cumsum(0)
    idx = [0, 3]
    m = ob.msd(torch.tensor(X), 5, atom_indices=idx)
    Y = X[:, idx] - X[:, idx].mean(1, keepdims=True)
    ref = [0.0] + [np.mean([((Y[t + k] - Y[t]) ** 2).sum(-1).mean() for t in range(15 - k)]) for k in range(1, 6)]
    np.testing.assert_allclose(m.numpy(), ref, rtol=1e-10)


# ------------------------------------------------------------------------- bonds and IMD

def test_bond_length_deviation_and_imd_vs_loops():
    rng = np.random.default_rng(7)
    L = 4.0
    X = rng.random((3, 9, 3)) * L
    bonds = np.array([[0, 1], [0, 2], [3, 4], [3, 5], [6, 7], [6, 8]])
    ref = rng.random(6) + 0.5
    cell = torch.eye(3, dtype=torch.float64) * L
    dev = ob.bond_length_deviation(torch.tensor(X), torch.tensor(bonds), torch.tensor(ref), cell)
    mol = np.repeat(np.arange(3), 3)
    imd = ob.min_intermolecular_distance(torch.tensor(X), torch.tensor(mol), cell)
    for f in range(3):
        d = [np.linalg.norm(_np_mic(X[f, j] - X[f, i], L)) for i, j in bonds]
        assert abs(float(dev[f]) - np.max(np.abs(np.array(d) - ref))) < 1e-12
        dd = [np.linalg.norm(_np_mic(X[f, j] - X[f, i], L)) for i in range(9) for j in range(9) if mol[i] != mol[j]]
        assert abs(float(imd[f]) - min(dd)) < 1e-12
    # no cell: plain distances; chunking over frames
    imd0 = ob.min_intermolecular_distance(torch.tensor(X), torch.tensor(mol), chunk_pairs=1)
    assert torch.all(imd0 >= imd - 1e-12)
    np.testing.assert_allclose(ob.reference_bond_lengths(torch.tensor(X), torch.tensor(bonds)).numpy(),
                               np.linalg.norm(X[:, bonds[:, 1]] - X[:, bonds[:, 0]], axis=-1).mean(0))


def test_imd_hinge_loss():
    v = ob.imd_hinge_loss(torch.tensor([2.0, 1.44, 1.0]))
    torch.testing.assert_close(v, torch.tensor([0.0, 0.0, math.exp(0.44) - 1]))


# ------------------------------------------------------------------- water neighbourhoods

def _water_box(n_mol, L, rng):
    O = rng.random((n_mol, 3)) * L
    X = []
    for o in O:
        X += [o, o + [0.96, 0, 0], o + [-0.24, 0.93, 0]]
    return np.array(X)


def test_local_neighborhoods_vs_brute_force():
    rng = np.random.default_rng(8)
    L, nm = 6.0, 10
    X = np.stack([_water_box(nm, L, rng) for _ in range(2)])
    z = torch.tensor([8, 1, 1] * nm)
    mol = torch.arange(nm).repeat_interleave(3)
    nb, centers = ob.local_neighborhoods(torch.tensor(X), mol, z, n_local_neighborhoods=4,
                                         n_closest_molecules=3, cell=torch.tensor([L, L, L]),
                                         generator=torch.Generator().manual_seed(0))
    assert nb.shape == (2, 4, 12) and len(set(centers.tolist())) == 4
    for f in range(2):
        for l, c in enumerate(centers.tolist()):
            dO = [np.linalg.norm(_np_mic(X[f, 3 * m] - X[f, 3 * c], L)) for m in range(nm)]
            order = [c] + [m for m in np.argsort(dO) if m != c][:3]
            expect = [a for m in order for a in (3 * m, 3 * m + 1, 3 * m + 2)]
            assert nb[f, l].tolist() == expect
    # local observable: the centre molecule's two O–H lengths
    oh = ob.local_bond_lengths(torch.tensor(X), nb, cell=torch.tensor([L, L, L]))
    assert oh.shape == (2, 4, 2)
    torch.testing.assert_close(oh, torch.tensor([0.96, math.hypot(0.24, 0.93)], dtype=torch.float64).expand(2, 4, 2))
    # k = 0: just the centre molecule; energies summed over neighbourhood atoms
    nb0, _ = ob.local_neighborhoods(torch.tensor(X), mol, z, 10, 0)
    assert nb0.shape == (2, 10, 3)
    e = torch.arange(30, dtype=torch.float64).expand(2, 30)
    torch.testing.assert_close(ob.neighborhood_energies(e, nb[..., :]), e[0][nb].sum(-1))
    torch.testing.assert_close(ob.neighborhood_energies(e, nb[0]), e[0][nb[0]].sum(-1).expand(2, 4))
