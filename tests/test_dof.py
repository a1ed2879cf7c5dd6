"""Degrees of freedom and initial velocities: Nosé–Hoover samples its set-point on a free
cluster (configurational temperature) with the physical count 3N − 3, not with the original's
3N; Maxwell–Boltzmann velocities per mass with zero centre-of-mass velocity."""
import math

import numpy as np
import pytest
import torch

from mdsim.md.forces import PotentialForceField
from mdsim.md.init import maxwell_boltzmann_velocities
from mdsim.md.integrators import make_integrator
from mdsim.md.potentials import LennardJones
from mdsim.md.rollout import EagerStepper, rollout
from mdsim.md.state import MDState
from mdsim.units import KB

DT = torch.float64
EPS, SIG = 0.0104, 3.4  # argon


def _lj_grad2_and_laplacian(x):
    """|∇U|² and ∇²U (R,) of the all-pairs LJ energy (analytic; the cluster is inside rc)."""
    vec = x[:, None] - x[:, :, None]
    N = x.shape[1]
    iu = torch.triu_indices(N, N, 1)
    r = vec.norm(dim=-1)[:, iu[0], iu[1]]
    s6 = (SIG / r) ** 6
    du = 4 * EPS * (-12 * s6 * s6 + 6 * s6) / r
    d2u = 4 * EPS * (156 * s6 * s6 - 42 * s6) / r ** 2
    lap = 2 * (d2u + 2 * du / r).sum(-1)
    _, f = LennardJones(EPS, SIG)(x)
    return (f * f).sum((1, 2)), lap


def _nh_configurational_temperature(convention, T=30.0, R=64, steps=2000, eq=800, seed=0):
    """Configurational temperature and its standard error of an Ar13 cluster under NH."""
    from ase.cluster import Icosahedron
    a = Icosahedron("Ar", noshells=2, latticeconstant=5.26)
    g = torch.Generator().manual_seed(seed)
    m = torch.tensor(a.get_masses(), dtype=DT)
    x = torch.tensor(a.get_positions(), dtype=DT)[None].repeat(R, 1, 1)
    x = x + 0.05 * torch.randn(x.shape, generator=g, dtype=DT)
    ff = PotentialForceField(LennardJones(EPS, SIG))
    v = maxwell_boltzmann_velocities(m, R, T, g, dof_convention=convention)
    e, f = ff(x)
    st = MDState(positions=x, velocities=v, forces=f, energy=e, masses=m)
    # NH is far from ergodic for a nearly harmonic solid cluster: equilibrate the replicas with
    # (ergodic) Langevin first, zero the net momentum, then let NH sample (it preserves the
    # canonical ensemble, so only its set-point decides where the replicas go)
    lang = make_integrator("Langevin", 5.0, T, {"gamma": 5.0})
    st, _ = rollout(st, EagerStepper(lang, ff), eq, g)
    vc = (m[None, :, None] * st.velocities).sum(1, keepdim=True) / m.sum()
    st.velocities = st.velocities - vc
    integ = make_integrator("NoseHoover", 5.0, T, {"ttime": 20}, dof_convention=convention)
    g2, lap = [], []

    class Conf:  # recorder: |∇U|², ∇²U every 5 steps after equilibration
        def record_block(self, t0, blk, state):
            for j in range(len(blk)):
                if (t0 + j + 1) % 5 == 0:
                    a2, b = _lj_grad2_and_laplacian(blk.positions[j])
                    g2.append(a2)
                    lap.append(b)

    st, _ = rollout(st, EagerStepper(integ, ff), steps, recorder=Conf())
    assert (m[None, :, None] * st.velocities).sum(1).abs().max() < 1e-9  # momentum stays zero
    g2, lap = torch.stack(g2), torch.stack(lap)  # (T, R)
    # per-replica blocks (replicas are independent): T_conf and its standard error
    t_rep = (g2.mean(0) / lap.mean(0) / KB).numpy()
    t_all = float(g2.mean() / lap.mean() / KB)
    return t_all, float(t_rep.std(ddof=1) / math.sqrt(R))


def test_nose_hoover_free_cluster_samples_its_set_point():
    """T_conf = ⟨|∇U|²⟩/(k_B⟨∇²U⟩) of a free Ar13 cluster under NH (physical count 3N − 3)
    matches the set-point; with the original's 3N it comes out 39/36 too hot (≈ 32.5 K)."""
    T = 30.0
    t_phys, err = _nh_configurational_temperature("physical", T)
    assert abs(t_phys - T) < 3 * err, (t_phys, err)


@pytest.mark.slow
def test_nose_hoover_original_dof_convention_runs_hot():
    T = 30.0
    t_phys, err = _nh_configurational_temperature("physical", T, R=96)
    t_orig, err_o = _nh_configurational_temperature("original", T, R=96)
    assert abs(t_phys - T) < 3 * err, (t_phys, err)
    assert t_orig - T > 3 * err_o, (t_orig, err_o)
    assert abs(t_orig / T - 39 / 36) < 4 * err_o / T, (t_orig, err_o)


def test_maxwell_boltzmann_per_mass_and_zero_centre_of_mass_velocity():
    """⟨m v_x²⟩ = k_BT(1 − m/M) per atom (the exact marginal with zero total momentum; ≈ k_BT),
    Σmv = 0.  The original subtracts the mean momentum instead: light atoms come out hot."""
    from ase.build import molecule
    a = molecule("CH3CH2OH")
    m = torch.tensor(a.get_masses(), dtype=DT)
    T, R = 500.0, 20000
    v = maxwell_boltzmann_velocities(m, R, T, torch.Generator().manual_seed(3), rescale=False)
    assert (m[None, :, None] * v).sum(1).abs().max() < 1e-10
    mv2 = (m[None, :, None] * v * v).mean(dim=(0, 2)) / (KB * T)  # per atom, in units of kT
    expect = 1 - m / m.sum()
    err = (m[None, :, None] * v * v / (KB * T)).std(dim=(0, 2)) / math.sqrt(3 * R)
    for z in np.unique(a.numbers):
        sel = torch.tensor(a.numbers == z)
        dev = (mv2[sel] - expect[sel]).abs().max()
        assert dev < 4 * err[sel].max(), (z, mv2[sel], expect[sel])
    # rescaled: exactly (3N−3)/2 kT, and the per-mass law keeps its shape
    vr = maxwell_boltzmann_velocities(m, 8, T, torch.Generator().manual_seed(4))
    ke = 0.5 * (m[None, :, None] * vr * vr).sum((1, 2))
    torch.testing.assert_close(ke, torch.full_like(ke, 0.5 * (3 * len(m) - 3) * KB * T))


@pytest.mark.parametrize("name,dof", [("NoseHoover", 24), ("VelocityVerlet", 24), ("Langevin", 27),
                                      ("LangevinOriginal", 27)])
def test_degrees_of_freedom_per_integrator(name, dof):
    assert make_integrator(name, 0.5, 300.0).dof(9) == dof
    assert make_integrator(name, 0.5, 300.0, dof_convention="original").dof(9) == 27
    with pytest.raises(ValueError, match="dof_convention"):
        make_integrator(name, 0.5, 300.0, dof_convention="mine")
