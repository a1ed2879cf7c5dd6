"""Stability criteria, the tracker, and replica resets."""
import math

import numpy as np
import pytest
import torch

from mdsim.md.forces import PotentialForceField
from mdsim.md.init import maxwell_boltzmann_velocities, replace_replicas, reset_replicas
from mdsim.md.potentials import HarmonicBonds
from mdsim.md.stability import (StabilityTracker, max_bond_deviation, min_intermolecular_distance,
                                stability_values)
from mdsim.md.state import MDState
from mdsim.md.system import System
from mdsim.units import FS, KB

DT = torch.float64


def _triatomic(criterion="bond_length_deviation", tol=0.5, molecule_index=None, cell=None):
    bonds = torch.tensor([[0, 1], [1, 2]])
    return System(atomic_numbers=torch.tensor([8, 1, 1]), masses=torch.tensor([16.0, 1.0, 1.0], dtype=DT),
                  bonds=bonds, ref_bond_lengths=torch.tensor([1.0, 1.0], dtype=DT), cell=cell,
                  pbc=cell is not None, molecule_index=molecule_index, stability_criterion=criterion,
                  stability_tolerance=tol)


X0 = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=DT)


def test_bond_deviation_vectorised_over_replicas_and_frames():
    sysm = _triatomic()
    pos = X0.repeat(4, 3, 1, 1)  # (T=4, R=3, N, 3)
    pos[2, 1, 2, 1] += 0.7  # frame 2, replica 1: second bond 1.7 Å
    pos[3, 2, 0, 0] = float("nan")
    unstable, value = stability_values(pos, sysm)
    assert unstable.shape == (4, 3) and value.shape == (4, 3)
    assert unstable[2, 1] and abs(value[2, 1].item() - 0.7) < 1e-12
    assert unstable[3, 2] and torch.isnan(value[3, 2])
    assert unstable.sum() == 2
    # exactly at tolerance counts as unstable (value >= tol)
    pos2 = X0.clone()[None]
    pos2[0, 2, 1] += 0.5
    assert stability_values(pos2, sysm)[0].item()
    # non-finite energy alone flags a replica
    u, _ = stability_values(X0.repeat(2, 1, 1), sysm, energy=torch.tensor([0.0, float("inf")], dtype=DT))
    assert u.tolist() == [False, True]


def test_imd_matches_ase_minimum_image():
    from ase import Atoms
    rng = np.random.default_rng(0)
    L = 6.0
    n_mol = 5
    mol = torch.arange(n_mol).repeat_interleave(3)
    pos = rng.random((2, 15, 3)) * L
    sysm = _triatomic("imd", 1.2, molecule_index=mol, cell=torch.eye(3, dtype=DT) * L)
    sysm.bonds = torch.zeros(0, 2, dtype=torch.long)
    value = min_intermolecular_distance(torch.tensor(pos), sysm, sysm.cell)
    for r in range(2):
        a = Atoms("X15", positions=pos[r], cell=[L, L, L], pbc=True)
        d = a.get_all_distances(mic=True)
        inter = mol.numpy()[:, None] != mol.numpy()[None, :]
        assert abs(value[r].item() - d[inter].min()) < 1e-10
    # per-replica cells (R,3,3) and frames (T,R,N,3)
    cells = torch.eye(3, dtype=DT).repeat(2, 1, 1) * L
    v2 = min_intermolecular_distance(torch.tensor(pos)[None].repeat(3, 1, 1, 1), sysm, cells)
    torch.testing.assert_close(v2, value[None].repeat(3, 1))
    unstable, v = stability_values(torch.tensor(pos), sysm)
    torch.testing.assert_close(v, value)
    assert torch.equal(unstable, value < 1.2)


def test_tracker_freezes_first_instability():
    tr = StabilityTracker(3, "bond_length_deviation")
    tr.update(torch.tensor([False, False, False]), 10, torch.tensor([0.1, 0.2, 0.1], dtype=DT))
    new = tr.update(torch.tensor([False, True, False]), 20, torch.tensor([0.3, 0.9, 0.1], dtype=DT))
    assert new.tolist() == [False, True, False]
    tr.update(torch.tensor([False, False, True]), 30, torch.tensor([0.2, 0.1, 0.6], dtype=DT))
    assert tr.first_unstable_step.tolist() == [-1, 20, 30]
    assert tr.worst_value.tolist() == pytest.approx([0.3, 0.9, 0.6])
    t = tr.stability_time_ps(total_steps=100, timestep_fs=0.5)
    assert t.tolist() == pytest.approx([0.05, 0.01, 0.015])
    tr.reset(torch.tensor([False, True, False]))
    assert tr.first_unstable_step.tolist() == [-1, -1, 30]
    # frame-wise update: first True per column
    tr2 = StabilityTracker(3, "imd")
    unstable = torch.tensor([[False, False, False], [False, True, False], [True, True, False]])
    vals = torch.tensor([[2.0, 2.0, 2.0], [1.9, 1.0, 2.0], [0.5, 0.2, 1.8]], dtype=DT)
    tr2.update_frames(unstable, torch.tensor([100, 200, 300]), vals)
    assert tr2.first_unstable_step.tolist() == [300, 200, -1]
    assert tr2.worst_value.tolist() == pytest.approx([0.5, 1.0, 1.8])


def _free_particles(x):  # zero forces: atoms fly in straight lines
    return torch.zeros(x.shape[0], dtype=x.dtype), torch.zeros_like(x)


def test_simulator_flags_right_step_others_untouched():
    from mdsim.md.runner import Simulator
    sysm = _triatomic(tol=0.5)
    R = 3
    dt_fs = 1.0
    # replica 1: atom 2 moves away from atom 1 at v so that the deviation reaches 0.5 Å at step 37.5
    v_fly = 0.5 / (37.5 * dt_fs * FS)
    vel = torch.zeros(R, 3, 3, dtype=DT)
    vel[1, 2, 1] = v_fly

    def nan_energy(x, cell):  # replica 2: energy turns NaN once atom 0 passes x = -0.5 Å
        e = torch.where(x[:, 0, 0] < -0.5, torch.full((x.shape[0],), float("nan"), dtype=x.dtype),
                        torch.zeros(x.shape[0], dtype=x.dtype))
        return e, torch.zeros_like(x)

    vel[2, 0, 0] = -0.5 / (52.5 * dt_fs * FS)  # crosses at step 52.5 → first NaN at step 53
    for check_every, expect1, expect2 in ((1, 38, 53), (5, 40, 55)):
        sim = Simulator(nan_energy, sysm, integrator="VelocityVerlet", timestep_fs=dt_fs, temperature_K=None,
                        n_dump=check_every, dtype=DT, seed=0)
        st = MDState(positions=X0.repeat(R, 1, 1), velocities=vel.clone(), forces=torch.zeros(R, 3, 3, dtype=DT),
                     energy=torch.zeros(R, dtype=DT), masses=sysm.masses)
        res = sim.run(st, 80, record=True, record_every=1, progress=False)
        assert res.first_unstable_step.tolist() == [-1, expect1, expect2]
        assert res.stable.tolist() == [True, False, False]
        assert res.stability_time_ps.tolist() == pytest.approx([0.08, expect1 * 1e-3, expect2 * 1e-3])
        # replica 0 never moved
        assert torch.equal(res.state.positions[0], X0)
        # recorded positions: frame k-1 is the state after step k
        x = res.frames("positions")
        assert x.shape == (80, R, 3, 3)
        assert abs(x[36, 1, 2, 1].item() - (1.0 + 37 * dt_fs * FS * v_fly)) < 1e-12
        # the vectorised frame check finds the exact step regardless of check_every
        tr = StabilityTracker(R)
        sim.check_frames(res.recorder, tracker=tr)
        assert tr.first_unstable_step.tolist()[:2] == [-1, 38]


def test_reset_replicas_restores_finite_stable_states():
    sysm = _triatomic(tol=0.5)
    pot = HarmonicBonds(sysm.bonds, sysm.ref_bond_lengths, k=10.0)
    ff = PotentialForceField(pot)
    R, T = 6, 300.0
    g = torch.Generator().manual_seed(0)
    frames = X0[None] + 0.02 * torch.randn(20, 3, 3, generator=g, dtype=DT)
    pos = frames[:R].clone()
    pos[1, 2] += 3.0
    pos[4, 0, 0] = float("nan")
    e, f = ff(pos)
    st = MDState(positions=pos, velocities=maxwell_boltzmann_velocities(sysm.masses, R, T, g), forces=f, energy=e,
                 masses=sysm.masses, zeta=torch.full((R,), 0.3, dtype=DT),
                 step=torch.full((R,), 77), stable=torch.tensor([True, False, True, True, False, True]))
    unstable, _ = stability_values(st.positions, sysm, energy=st.energy)
    assert unstable.tolist() == [False, True, False, False, True, False]
    new, mask = reset_replicas(st, unstable, frames, ff, T, generator=g)
    assert mask.tolist() == unstable.tolist()
    u2, _ = stability_values(new.positions, sysm, energy=new.energy)
    assert not u2.any() and torch.isfinite(new.forces).all() and new.stable.all()
    keep = ~mask
    assert torch.equal(new.positions[keep], st.positions[keep])
    assert torch.equal(new.velocities[keep], st.velocities[keep])
    assert torch.equal(new.zeta[keep], st.zeta[keep]) and torch.all(new.zeta[mask] == 0)
    assert new.step.tolist() == [77] * R  # counters kept
    # fresh velocities with zero net momentum: (3N − 3)/2 kT
    torch.testing.assert_close(new.temperature(3 * 3 - 3)[mask], torch.full((2,), T, dtype=DT))
    torch.testing.assert_close(new.forces[mask], ff(new.positions[mask])[1])
    # new positions are dataset frames
    for r in torch.nonzero(mask).reshape(-1).tolist():
        assert any(torch.equal(new.positions[r], fr) for fr in frames)
    # reset_probability: ceil(p * #stable) extra stable replicas restart
    new2, mask2 = reset_replicas(st, unstable, frames, ff, T, generator=g, reset_probability=0.3)
    assert int(mask2.sum()) == 2 + math.ceil(0.3 * 4) and torch.all(mask2[unstable])
    # replace_replicas merges two states
    merged = replace_replicas(st, torch.tensor([True, False, False, False, False, False]), new)
    assert torch.equal(merged.positions[0], new.positions[0]) and torch.equal(merged.positions[1], st.positions[1])
    assert KB > 0
