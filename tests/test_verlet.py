"""Verlet neighbour lists (mdsim.geometry.VerletList) and their use in MD: the pair set is exact,
forces equal the all-pairs forces to rounding along trajectories that cross many rebuilds, the
compiled step keeps the list exact (redo on violation), periodic lists survive atoms crossing
the boundary without wrapping."""
import itertools

import pytest
import torch

from mdsim.geometry import VerletList, all_pairs_edges, periodic_edges
from mdsim.md.compiled import FastStepper
from mdsim.md.forces import ModelForceField
from mdsim.md.init import maxwell_boltzmann_velocities
from mdsim.md.integrators import make_integrator
from mdsim.md.state import MDState
from mdsim.models import SchNetModel


def brute_pairs(pos, cutoff, cell=None):
    """Set of (structure, i, j, image) with i<j (or i==j with a nonzero image) within cutoff."""
    out = set()
    R, N, _ = pos.shape
    images = [(0, 0, 0)] if cell is None else list(itertools.product((-1, 0, 1), repeat=3))
    for s in range(R):
        for i in range(N):
            for j in range(N):
                for im in images:
                    if (i, j, im) == (i, i, (0, 0, 0)):
                        continue
                    shift = 0 if cell is None else torch.tensor(im, dtype=pos.dtype) @ cell[s]
                    d = (pos[s, j] - pos[s, i] + shift).norm()
                    if d < cutoff:
                        out.add((s, min(i, j), max(i, j), round(float(d), 6)))
    return out


def listed_pairs(nl, pos, cell=None):
    R, N, _ = pos.shape
    ei, vec = nl.edges(pos.reshape(-1, 3), cell)
    half = ei.shape[1] // 2
    d = vec[:half].norm(dim=-1)
    out = set()
    for p in range(half):
        if d[p] < nl.cutoff:
            i, j = int(ei[0, p]), int(ei[1, p])
            out.add((i // N, min(i, j) % N, max(i, j) % N, round(float(d[p]), 6)))
    return out


def test_molecule_pairs_exact_until_skin_half_then_rebuild():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(3, 10, 3, generator=g, dtype=torch.float64) * 2.0
    nl = VerletList(3.0, skin=0.6)
    assert nl.update(pos) and nl.builds == 1
    assert listed_pairs(nl, pos) == brute_pairs(pos, 3.0)
    # small moves (< skin/2): no rebuild, pair set still exact
    moved = pos + 0.29 * torch.nn.functional.normalize(torch.randn(pos.shape, generator=g, dtype=pos.dtype), dim=-1)
    assert not nl.update(moved)
    assert listed_pairs(nl, moved) == brute_pairs(moved, 3.0)
    # a larger move triggers a rebuild into the same buffers when they suffice
    pairs_buf = nl.pairs
    far = moved.clone()
    far[0, 0] += 0.4
    assert nl.update(far) and nl.builds == 2
    assert listed_pairs(nl, far) == brute_pairs(far, 3.0)
    if nl.n_pairs <= pairs_buf.shape[1]:
        assert nl.pairs is pairs_buf


def test_periodic_pairs_from_unwrapped_positions_match_vesin():
    g = torch.Generator().manual_seed(1)
    L = 6.0
    cell = (torch.eye(3, dtype=torch.float64) * L).expand(2, 3, 3).clone()
    wrapped = torch.rand(2, 16, 3, generator=g, dtype=torch.float64) * L
    unwrapped = wrapped + torch.randint(-2, 3, (2, 16, 3), generator=g).to(torch.float64) * L
    nl = VerletList(2.5, skin=0.3)
    nl.update(unwrapped, cell)
    ei, vec = nl.edges(unwrapped.reshape(-1, 3), cell)
    d_nl = sorted(x for x in vec[: ei.shape[1] // 2].norm(dim=-1).tolist() if x < 2.5)
    batch = torch.arange(2).repeat_interleave(16)
    ei2, sh = periodic_edges(wrapped.reshape(-1, 3), cell, batch, 2.5)
    d_ref = sorted((wrapped.reshape(-1, 3)[ei2[1]] - wrapped.reshape(-1, 3)[ei2[0]] + sh).norm(dim=-1).tolist())
    d_ref = d_ref[::2] if len(d_ref) == 2 * len(d_nl) else d_ref  # vesin full list: each pair twice
    assert len(d_nl) == len(d_ref)
    assert max(abs(a - b) for a, b in zip(d_nl, d_ref)) < 1e-9


def test_edge_lists_are_symmetric_halves():
    ei = all_pairs_edges(5, 3)
    half = ei.shape[1] // 2
    assert torch.equal(ei[:, half:], ei[:, :half].flip(0))
    assert set(map(tuple, ei.T.tolist())) == {(s * 5 + i, s * 5 + j) for s in range(3)
                                              for i in range(5) for j in range(5) if i != j}


def small_schnet(dtype=torch.float64):
    torch.manual_seed(0)
    return SchNetModel(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=10,
                       cutoff=3.0).to(dtype).eval()


def molecule(R=4, N=10, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(N, 3, generator=g, dtype=dtype) * 1.6
    return base.expand(R, N, 3) + 0.1 * torch.randn(R, N, 3, generator=g, dtype=dtype)


def test_md_forces_with_verlet_list_equal_all_pairs_across_rebuilds():
    model = small_schnet()
    z = torch.tensor([6, 6, 8, 1, 1, 1, 1, 6, 1, 8])
    pos = molecule()
    masses = torch.full((10,), 4.0, dtype=torch.float64)
    ff_nl = ModelForceField(model, z, neighbor_skin=0.2)
    ff_all = ModelForceField(model, z)
    integ = make_integrator("Langevin", 1.0, 3000.0, {"gamma": 5.0})
    g = torch.Generator().manual_seed(3)
    e, f = ff_nl(pos)
    st = MDState(positions=pos, velocities=maxwell_boltzmann_velocities(masses, 4, 3000.0, g), forces=f,
                 energy=e, masses=masses)
    worst = 0.0
    for _ in range(150):
        st = integ.step(st, ff_nl, g)
        e_ref, f_ref = ff_all(st.positions)
        worst = max(worst, float((st.forces - f_ref).abs().max()), float((st.energy - e_ref).abs().max()))
    assert ff_nl.neighbors.builds > 3, "the trajectory should have crossed several rebuilds"
    assert worst < 1e-10


def test_compiled_step_keeps_verlet_list_exact_and_redoes_violated_steps():
    model = small_schnet(torch.float32)
    z = torch.tensor([6, 6, 8, 1, 1, 1, 1, 6, 1, 8])
    pos = molecule(dtype=torch.float32)
    masses = torch.full((10,), 4.0)
    ff = ModelForceField(model, z, neighbor_skin=0.05)
    integ = make_integrator("NoseHoover", 1.0, 3000.0, {"ttime": 20})
    g = torch.Generator().manual_seed(4)
    e, f = ff(pos)
    st = MDState(positions=pos, velocities=maxwell_boltzmann_velocities(masses, 4, 3000.0, g), forces=f,
                 energy=e, masses=masses)
    stepper = FastStepper(integ, ff, st, "compile", compile_backend="eager")
    assert stepper.neighbors is ff.neighbors
    stepper.neighbors.needs_rebuild = lambda *a, margin=0.0, _f=stepper.neighbors.needs_rebuild: (
        _f(*a, margin=margin) if margin else True)  # force the post-step check to fail once per step
    out, blk = stepper.run(st, 5)
    assert stepper.redone_steps == 5
    ref = st
    ff_all = ModelForceField(model, z)
    for _ in range(5):
        ref = integ.step(ref, ff_all)
    assert (out.positions - ref.positions).abs().max() < 1e-4
    assert (out.forces - ref.forces).abs().max() < 1e-3


@pytest.mark.parametrize("skin", [0.0, 0.4])
def test_periodic_md_with_verlet_list_matches_fresh_lists_when_atoms_cross_the_cell(skin):
    model = small_schnet()
    L = 5.0
    g = torch.Generator().manual_seed(5)
    R, N = 2, 12
    pos = torch.rand(R, N, 3, generator=g, dtype=torch.float64) * L
    pos[:, 0] = torch.tensor([L - 0.05, 2.0, 2.0], dtype=torch.float64)  # about to cross
    cell = (torch.eye(3, dtype=torch.float64) * L).expand(R, 3, 3).clone()
    z = torch.tensor([8, 1, 1] * 4)
    ff_nl = ModelForceField(model, z, neighbor_skin=skin)
    ff_ref = ModelForceField(model, z)
    x = pos.clone()
    for k in range(6):
        x[:, 0, 0] += 0.04  # atom 0 walks out of the box (unwrapped)
        e1, f1 = ff_nl(x, cell)
        e2, f2 = ff_ref(x, cell)
        assert (f1 - f2).abs().max() < 1e-10 and (e1 - e2).abs().max() < 1e-10
    assert x[0, 0, 0] > L


def test_complete_list_of_a_small_molecule_skips_the_displacement_check():
    """When every pair of every replica is within cutoff + skin (ethanol-sized molecules), the
    list is complete: no pair can be missing whatever the motion, so it is never rebuilt and
    forces stay equal to the all-pairs ones even after large moves.  A molecule with pairs
    beyond cutoff + skin keeps the check."""
    g = torch.Generator().manual_seed(4)
    small = torch.randn(2, 6, 3, generator=g, dtype=torch.float64) * 0.8  # all pairs < 3.6 Å
    nl = VerletList(3.0, skin=0.6)
    nl.update(small)
    assert nl.complete and nl.n_pairs == 2 * 15
    moved = small + 0.9 * torch.randn(small.shape, generator=g, dtype=small.dtype)  # ≫ skin/2
    assert not nl.update(moved) and nl.builds == 1
    model = small_schnet()
    z = torch.tensor([6, 6, 8, 1, 1, 1])
    ff_nl, ff_all = ModelForceField(model, z, neighbor_skin=0.6), ModelForceField(model, z)
    ff_nl(small)
    assert ff_nl.neighbors.complete
    assert torch.allclose(ff_nl(moved)[1], ff_all(moved)[1], atol=1e-6)
    assert ff_nl.neighbors.builds == 1
    wide = torch.randn(2, 10, 3, generator=g, dtype=torch.float64) * 3.0
    nl2 = VerletList(3.0, skin=0.6)
    nl2.update(wide)
    assert not nl2.complete
    assert nl2.update(wide + torch.tensor([0.4, 0.0, 0.0], dtype=wide.dtype) * torch.arange(10).reshape(1, 10, 1))
