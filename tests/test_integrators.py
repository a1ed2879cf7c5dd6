"""Integrators: NVE accuracy, agreement with ASE, canonical sampling, batching."""
import math

import numpy as np
import pytest
import torch

from mdsim.md.forces import PotentialForceField
from mdsim.md.init import maxwell_boltzmann_velocities, select_frames
from mdsim.md.integrators import make_integrator, nose_hoover_mass
from mdsim.md.potentials import HarmonicBonds, HarmonicOscillators, LennardJones
from mdsim.md.state import MDState
from mdsim.units import FS, KB

DT = torch.float64


def _ar13():
    from ase.cluster import Icosahedron
    return Icosahedron("Ar", noshells=2, latticeconstant=5.26)


def _state(ff, x, v, m, zeta=None):
    e, f = ff(x, None)
    return MDState(positions=x, velocities=v, forces=f, energy=e, masses=m, zeta=zeta)


def test_lj_matches_ase_calculator():
    from ase.calculators.lj import LennardJones as AseLJ
    a = _ar13()
    a.rattle(0.1, seed=1)
    a.calc = AseLJ(epsilon=0.0104, sigma=3.4, rc=6.0)  # some pairs beyond rc: truncation convention
    ff = PotentialForceField(LennardJones(0.0104, 3.4, 6.0))
    e, f = ff(torch.tensor(a.get_positions(), dtype=DT)[None])
    assert abs(e.item() - a.get_potential_energy()) < 1e-12
    np.testing.assert_allclose(f[0].numpy(), a.get_forces(), atol=1e-12)
    # autograd path agrees with the analytic forces (inside the cutoff the force is -dE/dx)
    pot = LennardJones(0.0104, 3.4, 20.0)
    ff_auto = PotentialForceField(lambda x, c: pot(x, c)[0])
    x = torch.tensor(a.get_positions(), dtype=DT)[None]
    np.testing.assert_allclose(ff_auto(x)[1].numpy(), pot(x)[1].numpy(), atol=1e-12)


def test_velocity_verlet_equals_ase():
    from ase.calculators.lj import LennardJones as AseLJ
    from ase.md.verlet import VelocityVerlet
    from ase import units
    a = _ar13()
    rng = np.random.default_rng(0)
    a.set_velocities(rng.normal(size=(len(a), 3)) * 2e-3)
    a.calc = AseLJ(epsilon=0.0104, sigma=3.4, rc=10.0)
    ff = PotentialForceField(LennardJones(0.0104, 3.4, 10.0))
    st = _state(ff, torch.tensor(a.get_positions(), dtype=DT)[None], torch.tensor(a.get_velocities(), dtype=DT)[None],
                torch.tensor(a.get_masses(), dtype=DT))
    integ = make_integrator("VelocityVerlet", 5.0)
    for _ in range(100):
        st = integ.step(st, ff)
    VelocityVerlet(a, timestep=5.0 * units.fs).run(100)
    np.testing.assert_allclose(st.positions[0].numpy(), a.get_positions(), atol=1e-10)
    np.testing.assert_allclose(st.velocities[0].numpy(), a.get_velocities(), atol=1e-12)
    assert abs(st.energy.item() - a.get_potential_energy()) < 1e-10
    assert int(st.step[0]) == 100


def test_nve_energy_error_scales_dt2():
    a = _ar13()
    R = 3
    g = torch.Generator().manual_seed(0)
    m = torch.tensor(a.get_masses(), dtype=DT)
    ff = PotentialForceField(LennardJones(0.0104, 3.4, 20.0))
    x0 = torch.tensor(a.get_positions(), dtype=DT)[None].repeat(R, 1, 1) + 0.05 * torch.randn(R, 13, 3, generator=g, dtype=DT)
    v0 = maxwell_boltzmann_velocities(m, R, 40.0, g)
    errs = []
    for dt in (8.0, 4.0):
        st = _state(ff, x0, v0, m)
        e0 = st.energy + st.kinetic_energy()
        integ = make_integrator("VelocityVerlet", dt)
        dev = torch.zeros(R, dtype=DT)
        for _ in range(int(1600 / dt)):
            st = integ.step(st, ff)
            dev = torch.maximum(dev, (st.energy + st.kinetic_energy() - e0).abs())
        assert torch.all(dev / e0.abs() < 1e-4), dev / e0.abs()  # bounded relative drift
        errs.append(dev)
    ratio = errs[0] / errs[1]
    assert torch.all((ratio > 3.5) & (ratio < 4.5)), ratio


def _oscillators(R, N, T, g, k=None, m=10.0, canonical_x=True):
    k = torch.linspace(0.5, 2.0, N, dtype=DT) if k is None else k
    masses = torch.full((N,), m, dtype=DT)
    ff = PotentialForceField(HarmonicOscillators(k))
    if canonical_x:
        x = torch.randn(R, N, 3, generator=g, dtype=DT) * torch.sqrt(KB * T / k)[None, :, None]
    else:
        x = torch.zeros(R, N, 3, dtype=DT)
    return ff, masses, k, x


def _canonical_stats(ts, kx2, T, N, R):
    """ts, kx2: (steps, R).  Means, and the spread of per-replica means (replicas independent)."""
    mt = ts.mean(0)
    return {
        "T": (mt.mean() / T).item(), "T_err": (mt.std() / math.sqrt(R) / T).item(),
        "varT": (ts.var() / (2 * T * T / (3 * N))).item(),
        "x2": (kx2.mean() / (KB * T)).item(), "x2_err": (kx2.mean(0).std() / math.sqrt(R) / (KB * T)).item(),
    }


def _sample(integ, st, ff, k, n_steps, n_eq, g):
    ts, kx2 = [], []
    for i in range(n_steps):
        st = integ.step(st, ff, generator=g)
        if i >= n_eq:
            ts.append(st.temperature())
            kx2.append((k[None, :, None] * st.positions ** 2).mean(dim=(1, 2)))
    return st, torch.stack(ts), torch.stack(kx2)


def test_langevin_baoab_canonical():
    """Independent oscillators (ω dt ≤ 0.09): <T>, Var(T) = 2T²/3N and <k x²> = kT."""
    R, N, T = 32, 16, 300.0
    g = torch.Generator().manual_seed(1)
    ff, m, k, _ = _oscillators(R, N, T, g)
    x = torch.zeros(R, N, 3, dtype=DT)  # start out of equilibrium: all energy kinetic
    st = _state(ff, x, maxwell_boltzmann_velocities(m, R, T, g), m)
    integ = make_integrator("Langevin", 2.0, T, {"gamma": 30.0})
    assert abs(integ.params["gamma"] - 30.0 / (1000 * FS)) < 1e-15
    _, ts, kx2 = _sample(integ, st, ff, k, 2500, 300, g)
    s = _canonical_stats(ts, kx2, T, N, R)
    # BAOAB velocities carry an O((ω dt)²/4) ≈ 0.2% bias; positions are exact for harmonic potentials
    assert abs(s["T"] - 1) < 4 * s["T_err"] + 0.003, s
    assert abs(s["varT"] - 1) < 0.06, s
    assert abs(s["x2"] - 1) < 4 * s["x2_err"], s


def test_langevin_original_scheme_thermostats_roughly():
    R, N, T = 16, 8, 300.0
    g = torch.Generator().manual_seed(2)
    ff, m, k, x = _oscillators(R, N, T, g)
    st = _state(ff, x, maxwell_boltzmann_velocities(m, R, 0.5 * T, g), m)
    integ = make_integrator("LangevinOriginal", 1.0, T, {"gamma": 30.0})
    _, ts, kx2 = _sample(integ, st, ff, k, 1500, 300, g)
    assert abs(ts.mean().item() / T - 1) < 0.05  # first order scheme: O(dt) bias, roughly right


def test_nose_hoover_preserves_canonical_ensemble():
    """One NH thermostat per replica is not ergodic for harmonic oscillators, so time averages of
    one replica are not canonical.  The exact NH flow does preserve the extended canonical
    density ∝ exp(−βH − βQζ²); we start an ensemble of replicas from it and check that the
    ensemble over replicas stays canonical."""
    R, N, T, dt, ttime = 512, 4, 300.0, 1.0, 50.0
    g = torch.Generator().manual_seed(3)
    ff, m, k, x = _oscillators(R, N, T, g)
    v = maxwell_boltzmann_velocities(m, R, T, g, rescale=False, zero_momentum=False)
    q = nose_hoover_mass(N, T, ttime, dt * FS)
    zeta = torch.randn(R, generator=g, dtype=DT) * math.sqrt(KB * T / (2 * q))
    st = _state(ff, x, v, m, zeta=zeta)
    # oscillators tethered to fixed centres: the potential is not translation invariant, the net
    # momentum is not conserved, all 3N degrees of freedom are thermal ("original" counts 3N)
    integ = make_integrator("NoseHoover", dt, T, {"ttime": ttime}, dof_convention="original")
    _, ts, kx2 = _sample(integ, st, ff, k, 1500, 500, g)
    s = _canonical_stats(ts, kx2, T, N, R)
    assert abs(s["T"] - 1) < 0.01, s
    assert abs(s["varT"] - 1) < 0.2, s
    assert abs(s["x2"] - 1) < 0.02, s


def test_nose_hoover_drives_to_target_temperature():
    """From a cold start (x = 0, T₀ = T/2) NH's time-averaged kinetic energy approaches K* for
    every replica; plain NVE stays at T/4 (equipartition)."""
    R, N, T = 16, 16, 300.0
    g = torch.Generator().manual_seed(4)
    ff, m, k, _ = _oscillators(R, N, T, g)
    x = torch.zeros(R, N, 3, dtype=DT)
    v = maxwell_boltzmann_velocities(m, R, 0.5 * T, g, dof_convention="original")
    for name, target in (("NoseHoover", 1.0), ("VelocityVerlet", 0.25)):
        # tethered oscillators: no conserved momentum, 3N thermal degrees of freedom
        integ = make_integrator(name, 2.0, T, {"ttime": 20}, dof_convention="original")
        _, ts, _ = _sample(integ, _state(ff, x, v, m), ff, k, 3000, 500, g)
        per_replica = ts.mean(0) / T
        assert abs(per_replica.mean().item() - target) < 0.01 * target + 0.005, (name, per_replica)
        assert torch.all((per_replica - target).abs() < 0.06), (name, per_replica)


@pytest.mark.parametrize("name", ["VelocityVerlet", "Langevin", "LangevinOriginal", "NoseHoover"])
def test_batched_equals_sequential(name):
    a = _ar13()
    R = 3
    g = torch.Generator().manual_seed(5)
    m = torch.tensor(a.get_masses(), dtype=DT)
    ff = PotentialForceField(LennardJones(0.0104, 3.4, 8.0))
    x0 = torch.tensor(a.get_positions(), dtype=DT)[None].repeat(R, 1, 1) + 0.1 * torch.randn(R, 13, 3, generator=g, dtype=DT)
    v0 = maxwell_boltzmann_velocities(m, R, 100.0, g)
    integ = make_integrator(name, 4.0, 100.0, {"gamma": 5.0, "ttime": 20})
    seeds = [11, 12, 13]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    st = _state(ff, x0, v0, m)
    for _ in range(60):
        st = integ.step(st, ff, generator=gens)
    for r in range(R):
        gr = [torch.Generator().manual_seed(seeds[r])]
        s1 = _state(ff, x0[r:r + 1], v0[r:r + 1], m)
        for _ in range(60):
            s1 = integ.step(s1, ff, generator=gr)
        torch.testing.assert_close(s1.positions[0], st.positions[r], rtol=0, atol=1e-10)
        torch.testing.assert_close(s1.velocities[0], st.velocities[r], rtol=0, atol=1e-12)
        torch.testing.assert_close(s1.zeta[0], st.zeta[r], rtol=0, atol=1e-12)


def test_harmonic_crystal_nve_and_bonds_force():
    """Harmonic springs between nearest neighbours of a periodic fcc crystal: forces match
    autograd, and velocity Verlet conserves energy."""
    from ase.build import bulk
    from ase.neighborlist import neighbor_list
    at = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
    i, j, d = neighbor_list("ijd", at, 2.6)
    keep = i < j
    bonds = torch.tensor(np.stack([i[keep], j[keep]], 1))
    pot = HarmonicBonds(bonds, torch.tensor(d[keep]), k=2.0)
    cell = torch.tensor(np.asarray(at.cell), dtype=DT)[None]
    g = torch.Generator().manual_seed(6)
    x = torch.tensor(at.get_positions(), dtype=DT)[None] + 0.05 * torch.randn(1, len(at), 3, generator=g, dtype=DT)
    e, f = pot(x, cell)
    fa = PotentialForceField(lambda p, c: pot(p, c)[0])(x, cell)[1]
    torch.testing.assert_close(f, fa, rtol=0, atol=1e-12)
    m = torch.tensor(at.get_masses(), dtype=DT)
    ff = PotentialForceField(pot)
    st = MDState(positions=x, velocities=maxwell_boltzmann_velocities(m, 1, 300.0, g), forces=f, energy=e,
                 masses=m, cell=cell)
    e0 = (st.energy + st.kinetic_energy()).item()
    integ = make_integrator("VelocityVerlet", 2.0)
    for _ in range(300):
        st = integ.step(st, ff)
    assert abs((st.energy + st.kinetic_energy()).item() - e0) < 1e-3 * abs(st.kinetic_energy().item())


def test_maxwell_boltzmann_velocities():
    g = torch.Generator().manual_seed(7)
    m = torch.tensor([1.0, 12.0, 16.0, 100.0], dtype=DT)
    T = 500.0
    v = maxwell_boltzmann_velocities(m, 4000, T, g, rescale=False, zero_momentum=False)
    var = v.var(dim=(0, 2))  # per mass
    np.testing.assert_allclose((var * m / (KB * T)).numpy(), 1.0, atol=0.05)
    v = maxwell_boltzmann_velocities(m, 50, T, g)  # zero momentum, exact KE of its 3N − 3 dof
    p = (m[None, :, None] * v).sum(1)
    assert p.abs().max() < 1e-12
    ke = 0.5 * (m[None, :, None] * v ** 2).sum((1, 2))
    torch.testing.assert_close(ke, torch.full_like(ke, 0.5 * (3 * 4 - 3) * KB * T))
    v = maxwell_boltzmann_velocities(m, 50, T, g, dof_convention="original")  # the original: 3N
    ke = 0.5 * (m[None, :, None] * v ** 2).sum((1, 2))
    torch.testing.assert_close(ke, torch.full_like(ke, 1.5 * 4 * KB * T))
    # seeded
    v1 = maxwell_boltzmann_velocities(m, 3, T, torch.Generator().manual_seed(1))
    v2 = maxwell_boltzmann_velocities(m, 3, T, torch.Generator().manual_seed(1))
    assert torch.equal(v1, v2)


def test_select_frames_and_errors():
    g = torch.Generator().manual_seed(0)
    idx = select_frames(100, 10, "random", g)
    assert len(set(idx.tolist())) == 10 and idx.max() < 100
    assert select_frames(100, 3, "first").tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="n_replicas"):
        select_frames(5, 10, "random", g)
    with pytest.raises(ValueError, match="integrator"):
        make_integrator("Berendsen", 1.0, 300.0)
    with pytest.raises(ValueError, match="temperature"):
        make_integrator("Langevin", 1.0, None)
    with pytest.raises(ValueError, match="timestep"):
        make_integrator("NoseHoover", -1.0, 300.0)
