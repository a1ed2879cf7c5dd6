"""Model interface: forces = −∇E, symmetries, batching, periodic images, cutoffs, errors."""
import math

import numpy as np
import pytest
import torch

from mdsim.models import (MODEL_REGISTRY, ModelConfigError, ModelInputError, batch_from_frames,
                          build_model, energy_and_forces, resolve_hyperparameters)
from mdsim.models.dimenet_pp import triplets

CUTOFF = 3.5
SMALL = {
    "schnet": dict(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=10,
                   cutoff=CUTOFF),
    "nequip_e3nn": dict(r_max=CUTOFF, num_layers=2, l_max=2, num_features=6, radial_mlp_neurons=16,
                   avg_num_neighbors=4.0),
    "dimenet_pp": dict(hidden_channels=16, num_blocks=2, int_emb_size=8, basis_emb_size=4,
                       out_emb_channels=16, num_spherical=4, num_radial=4, cutoff=CUTOFF,
                       output_initializer="glorot_orthogonal"),
    "gemnet_t": dict(num_spherical=4, num_radial=4, num_blocks=2, emb_size_atom=16, emb_size_edge=16,
                     emb_size_trip=8, emb_size_rbf=4, emb_size_cbf=4, emb_size_bil_trip=8, cutoff=CUTOFF),
}
NAMES = sorted(SMALL)


def make_model(name, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = build_model(name, **SMALL[name]).to(dtype)
    # non-trivial normalisation so that it is exercised everywhere
    m.set_normalization(mean=-10.0, std=1.7, atom_ref={1: -0.5, 6: -3.0, 7: -4.0, 8: -5.0})
    return m


def random_molecule(n, seed, spread=1.3):
    """A random, non-degenerate molecule (min distance ≥ 0.8 Å), atoms of H, C, N, O."""
    g = torch.Generator().manual_seed(seed)
    while True:
        R = torch.randn(n, 3, generator=g, dtype=torch.float64) * spread
        d = torch.cdist(R, R) + torch.eye(n, dtype=torch.float64) * 10
        if d.min() > 0.8:
            break
    z = torch.tensor([1, 6, 7, 8], dtype=torch.long)[torch.randint(0, 4, (n,), generator=g)]
    z[0], z[1] = 6, 6  # at least two like atoms for the permutation test
    return R, z


def water_box(seed=0, L=5.5, n_side=2):
    """Slightly distorted water molecules on a cubic lattice in a periodic box of side L."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(n_side, dtype=torch.float64)] * 3, indexing="ij"),
                       -1).reshape(-1, 3) * (L / n_side) + 0.4
    o = grid
    h1 = o + torch.tensor([0.96, 0.0, 0.0], dtype=torch.float64)
    h2 = o + torch.tensor([-0.24, 0.93, 0.0], dtype=torch.float64)
    R = torch.stack([o, h1, h2], 1).reshape(-1, 3)
    R = R + 0.08 * torch.randn(R.shape, generator=g, dtype=torch.float64)
    z = torch.tensor([8, 1, 1] * o.shape[0], dtype=torch.long)
    return R, z, torch.eye(3, dtype=torch.float64) * L


def single(model, R, z, cell=None):
    inp = batch_from_frames(R[None], z, cell=cell, dtype=R.dtype)
    return energy_and_forces(model, **inp)


def fd_forces(model, inp, atoms, h=1e-5):
    pos = inp["positions"]
    out = torch.zeros(len(atoms), 3, dtype=pos.dtype)
    kw = {k: v for k, v in inp.items() if k != "positions"}
    for a_i, a in enumerate(atoms):
        for k in range(3):
            p1, p2 = pos.clone(), pos.clone()
            p1[a, k] += h
            p2[a, k] -= h
            with torch.no_grad():
                out[a_i, k] = -(model(p1, **kw).sum() - model(p2, **kw).sum()) / (2 * h)
    return out


def random_rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def test_registry_names_and_aliases():
    assert set(MODEL_REGISTRY) == {"schnet", "nequip", "nequip_e3nn", "dimenet_pp", "gemnet_t"}
    m = build_model("DimeNetPlusPlus", **SMALL["dimenet_pp"])
    assert m.model_name == "dimenet_pp"


@pytest.mark.parametrize("name", NAMES)
def test_forces_are_minus_energy_gradient_molecules(name):
    model = make_model(name)
    frames = torch.stack([random_molecule(7, 1)[0], random_molecule(7, 2)[0]])
    z = random_molecule(7, 1)[1]
    inp = batch_from_frames(frames, z, dtype=torch.float64)
    energy, forces = energy_and_forces(model, **inp)
    assert energy.shape == (2,) and energy.dtype == torch.float64
    assert forces.shape == (14, 3) and torch.isfinite(forces).all()
    assert forces.abs().max() > 1e-3  # not a trivially flat model
    atoms = [0, 3, 6, 8, 13]
    fd = fd_forces(model, inp, atoms)
    np.testing.assert_allclose(forces[atoms].numpy(), fd.numpy(), rtol=1e-6,
                               atol=1e-7 * max(1.0, forces.abs().max().item()))


@pytest.mark.parametrize("name", NAMES)
def test_forces_are_minus_energy_gradient_periodic_water(name):
    model = make_model(name)
    R, z, cell = water_box(seed=3)
    inp = batch_from_frames(R[None], z, cell=cell, dtype=torch.float64)
    energy, forces = energy_and_forces(model, **inp)
    assert forces.abs().max() > 1e-3
    atoms = [0, 1, 5, 13, 23]
    fd = fd_forces(model, inp, atoms)
    np.testing.assert_allclose(forces[atoms].numpy(), fd.numpy(), rtol=1e-6,
                               atol=1e-7 * max(1.0, forces.abs().max().item()))
    # net force of a periodic system (no external field) vanishes
    assert forces.sum(0).abs().max() < 1e-8 * max(1.0, forces.abs().max().item())


@pytest.mark.parametrize("name", NAMES)
def test_energy_invariances_and_force_equivariance(name):
    model = make_model(name)
    R, z = random_molecule(8, 5)
    e0, f0 = single(model, R, z)
    Q = random_rotation(7)
    shift = torch.tensor([3.0, -1.5, 20.0], dtype=torch.float64)
    e_rot, f_rot = single(model, R @ Q.T + shift, z)
    assert torch.allclose(e_rot, e0, atol=1e-9)
    assert torch.allclose(f_rot, f0 @ Q.T, atol=1e-9)
    e_ref, _ = single(model, -R, z)  # inversion (all the models are E(3)-invariant)
    assert torch.allclose(e_ref, e0, atol=1e-9)
    # swap the positions of two like atoms (z unchanged)
    assert z[0] == z[1]
    perm = torch.arange(len(z))
    perm[0], perm[1] = 1, 0
    e_p, f_p = single(model, R[perm], z)
    assert torch.allclose(e_p, e0, atol=1e-9)
    assert torch.allclose(f_p, f0[perm], atol=1e-9)
    # any relabelling of the atoms (positions and species together)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(3))
    e_p, f_p = single(model, R[perm], z[perm])
    assert torch.allclose(e_p, e0, atol=1e-9)
    assert torch.allclose(f_p, f0[perm], atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_single_evaluations(name):
    model = make_model(name)
    z = random_molecule(6, 11)[1]
    frames = torch.stack([random_molecule(6, 10 + k)[0] for k in range(3)])
    e_b, f_b = energy_and_forces(model, **batch_from_frames(frames, z, dtype=torch.float64))
    for k in range(3):
        e_s, f_s = single(model, frames[k], z)
        assert torch.allclose(e_b[k], e_s[0], atol=1e-10)
        assert torch.allclose(f_b[6 * k:6 * (k + 1)], f_s, atol=1e-10)
    # variable-size batch (equal_size not given): structures of 5, 8 and 6 atoms
    mols = [random_molecule(n, 20 + n) for n in (5, 8, 6)]
    pos = torch.cat([m[0] for m in mols])
    zz = torch.cat([m[1] for m in mols])
    batch = torch.cat([torch.full((len(m[1]),), k) for k, m in enumerate(mols)])
    e_v, f_v = energy_and_forces(model, pos, zz, batch, 3)
    start = 0
    for k, (R, z1) in enumerate(mols):
        e_s, f_s = single(model, R, z1)
        assert torch.allclose(e_v[k], e_s[0], atol=1e-10)
        assert torch.allclose(f_v[start:start + len(z1)], f_s, atol=1e-10)
        start += len(z1)


@pytest.mark.parametrize("name", NAMES)
def test_periodic_images_supercell_and_batching(name):
    model = make_model(name)
    R, z, cell = water_box(seed=4)
    L = cell[0, 0].item()
    e0, f0 = single(model, R, z, cell)
    # moving an atom by lattice vectors changes nothing
    R2 = R.clone()
    R2[4] += torch.tensor([L, -2 * L, L], dtype=torch.float64)
    e2, f2 = single(model, R2, z, cell)
    assert torch.allclose(e2, e0, atol=1e-9) and torch.allclose(f2, f0, atol=1e-9)
    # a 2x1x1 supercell has twice the energy and the same forces
    Rs = torch.cat([R, R + torch.tensor([L, 0.0, 0.0], dtype=torch.float64)])
    cs = torch.diag(torch.tensor([2 * L, L, L], dtype=torch.float64))
    es, fs = single(model, Rs, torch.cat([z, z]), cs)
    mean = model.target_mean  # a per-structure constant
    assert torch.allclose(es - mean, 2 * (e0 - mean), atol=1e-8)
    assert torch.allclose(fs[: len(z)], f0, atol=1e-8)
    # two periodic structures in one batch
    Rb, _, _ = water_box(seed=5)
    inp = batch_from_frames(torch.stack([R, Rb]), z, cell=cell, dtype=torch.float64)
    eb, fb = energy_and_forces(model, **inp)
    e1, f1 = single(model, Rb, z, cell)
    assert torch.allclose(eb, torch.cat([e0, e1]), atol=1e-9)
    assert torch.allclose(fb[len(z):], f1, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_pairs_beyond_cutoff_contribute_nothing(name):
    """Two fragments farther apart than the cutoff: energy is the sum of the isolated fragments'
    energies and no force acts between them (exact zero weight from the clamped cutoff)."""
    model = make_model(name)
    model.set_normalization(mean=0.0)
    A, za = random_molecule(4, 30, spread=0.8)
    B, zb = random_molecule(5, 31, spread=0.8)
    gap = CUTOFF + 0.01 + (A[:, 0].max() - B[:, 0].min()).item()
    both = torch.cat([A, B + torch.tensor([gap, 0.0, 0.0], dtype=torch.float64)])
    d = torch.cdist(both[:4], both[4:])
    assert d.min() > CUTOFF
    e_ab, f_ab = single(model, both, torch.cat([za, zb]))
    e_a, f_a = single(model, A, za)
    e_b, f_b = single(model, B, zb)
    assert torch.allclose(e_ab, e_a + e_b, atol=1e-10)
    assert torch.allclose(f_ab, torch.cat([f_a, f_b]), atol=1e-10)


def test_float32_model_gives_float64_energy_and_keeps_normalisation():
    model = build_model("schnet", **SMALL["schnet"])
    model.set_normalization(mean=-17637.827343506295, std=2.0, atom_ref=[0.0, -0.25])
    model.float()
    assert model.target_mean.dtype == torch.float64
    assert model.target_mean.item() == -17637.827343506295
    R, z = random_molecule(5, 3)
    z = torch.ones_like(z)
    inp = batch_from_frames(R[None], z, dtype=torch.float32)
    e, f = energy_and_forces(model, **inp)
    assert e.dtype == torch.float64 and f.dtype == torch.float32
    raw = model.atomic_outputs(inp["positions"], inp["atomic_numbers"], inp["batch"], 1)
    expect = 2.0 * raw.double().sum() - 17637.827343506295 - 0.25 * 5
    assert abs(e.item() - expect.item()) < 1e-9
    e_atoms = model.atomic_energies(inp["positions"], inp["atomic_numbers"], inp["batch"], 1)
    assert abs(e_atoms.sum().item() + model.target_mean.item() - e.item()) < 1e-9


def test_schnet_parameter_names_follow_pyg():
    model = build_model("schnet", hidden_channels=64, num_filters=64, num_interactions=6,
                        num_gaussians=25, cutoff=5.0)
    keys = set(model.state_dict())
    for k in ("embedding.weight", "distance_expansion.offset", "interactions.0.mlp.0.weight",
              "interactions.5.conv.lin1.weight", "interactions.5.conv.nn.2.bias",
              "interactions.3.lin.bias", "lin1.weight", "lin2.bias", "target_mean", "atom_ref"):
        assert k in keys, k
    assert tuple(model.state_dict()["embedding.weight"].shape) == (100, 64)


def test_triplets_match_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 7
    ei = torch.tensor([(s, t) for s in range(n) for t in range(n)
                       if s != t and torch.rand(1, generator=g).item() < 0.6]).T
    kj, ji = triplets(ei, n)
    got = sorted(zip(kj.tolist(), ji.tolist()))
    src, dst = ei.tolist()
    want = sorted((e1, e2) for e2 in range(ei.shape[1]) for e1 in range(ei.shape[1])
                  if dst[e1] == src[e2] and src[e1] != dst[e2])
    assert got == want


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ModelConfigError, match="unknown model 'gemnet'"):
        build_model("gemnet")
    with pytest.raises(ModelConfigError, match="hidden_size"):
        build_model("schnet", hidden_size=3)
    model = build_model("nequip_e3nn", **dict(SMALL["nequip_e3nn"], species=[1, 8]))
    R, z = random_molecule(4, 1)
    with pytest.raises(ModelInputError, match="not in the model's species"):
        model(R.float(), z, torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ModelInputError, match="positions"):
        model(R.float()[:, :2], z, torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ModelInputError, match="cell"):
        model(R.float(), z, torch.zeros(4, dtype=torch.long), 1, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ModelConfigError, match="avg_num_neighbors"):
        resolve_hyperparameters("nequip_e3nn", {"avg_num_neighbors": "auto"}, None)


def test_resolve_auto_hyperparameters_from_split():
    from mdsim.data.format import SplitData

    R, z = random_molecule(6, 2, spread=1.0)
    data = SplitData(R=R[None].numpy(), z=z.numpy(), E=np.zeros(1), F=np.zeros((1, 6, 3)),
                     fid=np.zeros(1))
    hp = resolve_hyperparameters("nequip_e3nn", {"r_max": 2.0, "avg_num_neighbors": "auto",
                                            "species": "auto"}, data)
    d = torch.cdist(R, R)
    expect = ((d < 2.0).sum().item() - 6) / 6
    assert math.isclose(hp["avg_num_neighbors"], expect)
    assert hp["species"] == sorted(set(z.tolist()))
