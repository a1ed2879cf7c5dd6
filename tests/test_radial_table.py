"""Tabulated radial functions (mdsim.models.radial_table) and SchNet's tabulated filters in MD:
the table reproduces the float64 network's values and slopes to float32 rounding, forces equal
the network's (eager, compiled, with a padded Verlet list), the table follows in-place parameter
updates (also inside compiled code), a coarse grid is caught by the same checks, parameter
gradients never see a table, and NVE energy conservation is as good as with the network."""
import math

import pytest
import torch

from mdsim.md.compiled import FastStepper
from mdsim.md.forces import ModelForceField
from mdsim.md.init import maxwell_boltzmann_velocities
from mdsim.md.integrators import make_integrator
from mdsim.md.state import MDState
from mdsim.models import SchNetModel
from mdsim.models.radial_table import RadialTable

from conftest import SHARED


def molecule(R=3, N=12, seed=0, dtype=torch.float32):
    """R random compact molecules (min distance ~1 Å, many pairs beyond the 5 Å cutoff)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(R, N, 3, generator=g, dtype=torch.float64) * 2.2
    z = torch.tensor([6, 1, 8, 1, 6, 1, 7, 1, 6, 1, 8, 1][:N])
    return pos.to(dtype), z


def schnet(seed=0, **kw):
    torch.manual_seed(seed)
    m = SchNetModel(**kw)
    # larger, less smooth filters than the default init: a stricter test of the interpolation
    with torch.no_grad():
        for blk in m.interactions:
            blk.conv.nn[0].weight.mul_(3.0)
            blk.conv.nn[2].weight.mul_(2.0)
    return m


def forces(model, pos, z, spacing=None, skin=None, dtype=None):
    ff = ModelForceField(model, z, dtype=dtype, neighbor_skin=skin, radial_table_spacing=spacing)
    return ff(pos)


def test_table_matches_float64_function_values_and_slopes():
    f = lambda d: torch.stack([torch.exp(-((d - 1.3) / 0.2) ** 2), torch.sin(3 * d) * (5 - d) ** 2], -1)
    tab = RadialTable(5.0, 0.005, zero_at_cutoff=False).build(f, torch.float32, "cpu")
    d = torch.linspace(0.0, 5.0, 7001, dtype=torch.float32).requires_grad_(True)
    y = tab(d)
    (gy,) = torch.autograd.grad(y.sum(), d)
    d64 = d.detach().double().requires_grad_(True)
    y64 = f(d64)
    (g64,) = torch.autograd.grad(y64.sum(), d64)
    assert (y.double() - y64).abs().max() < 3e-7 * y64.abs().max()
    err = (gy.double() - g64).abs().max().item()
    assert err < 2e-6 * g64.abs().max()
    # a grid 20x coarser misses the slopes by orders of magnitude more: the check discriminates
    coarse = RadialTable(5.0, 0.1, zero_at_cutoff=False).build(f, torch.float32, "cpu")
    (gc,) = torch.autograd.grad(coarse(d).sum(), d)
    assert (gc.double() - g64).abs().max() > 100 * err


def test_schnet_forces_with_table_equal_network_to_rounding():
    model = schnet()
    pos, z = molecule()
    model64 = schnet().double()
    e64, f64 = forces(model64, pos.double(), z)
    e32, f32 = forces(model, pos, z)
    et, ft = forces(model, pos, z, spacing=0.005)
    err_net = (f32.double() - f64).abs().max().item()
    err_tab = (ft.double() - f64).abs().max().item()
    scale = f64.abs().max().item()
    assert err_net < 1e-5 * scale
    assert err_tab < max(4 * err_net, 2e-6 * scale), (err_tab, err_net, scale)
    assert (et - e64).abs().max() < 1e-4  # eV (energies are float64 sums of float32 atoms)
    # a coarse grid is caught by the same comparison
    _, fc = forces(model, pos, z, spacing=0.1)
    assert (fc.double() - f64).abs().max().item() > 4 * err_net


def test_table_with_verlet_list_equals_all_pairs_network():
    model = schnet(1)
    pos, z = molecule(R=2, N=12, seed=3)
    _, f_ref = forces(model, pos, z)
    _, f_nl = forces(model, pos, z, spacing=0.005, skin=0.4)  # padded slots: beyond the cutoff
    assert torch.allclose(f_nl, f_ref, atol=5e-5, rtol=0)


def test_table_follows_in_place_parameter_updates():
    model = schnet(2)
    pos, z = molecule(R=2, seed=5)
    ff = ModelForceField(model, z, radial_table_spacing=0.005)
    _, before = ff(pos)
    builds = model._radial_table_signature
    ff(pos)
    assert model._radial_table_signature == builds  # no rebuild without a change
    with torch.no_grad():  # an optimiser-style in-place update of one filter weight
        model.interactions[3].conv.nn[2].weight.mul_(1.5)
    _, after = ff(pos)
    _, exact = forces(model, pos, z)
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.allclose(after, exact, atol=5e-5, rtol=0)
    # load_state_dict (copy_ into the parameters) is seen as well
    other = schnet(7)
    model.load_state_dict(other.state_dict())
    _, loaded = ff(pos)
    _, exact = forces(other, pos, z)
    assert torch.allclose(loaded, exact, atol=5e-5, rtol=0)


def test_parameter_gradients_never_use_the_table():
    model = schnet(3)
    pos, z = molecule(R=2, seed=1)
    batch = torch.arange(2).repeat_interleave(z.shape[0])
    zz = z.repeat(2)

    def grads():
        model.zero_grad()
        e = model(pos.reshape(-1, 3), zz, batch, 2)
        e.sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    g0 = grads()
    forces(model, pos, z, spacing=0.005)  # MD with tables, then training again
    g1 = grads()
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert not model._table_active
    # create_graph force fields (force-matching losses) bypass the table
    ff = ModelForceField(model, z, create_graph=True, radial_table_spacing=0.005)
    _, f = ff(pos)
    f.pow(2).sum().backward()
    w = model.interactions[0].conv.nn[2].weight
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["compile", "cuda_graph"])
def test_compiled_steps_read_the_current_table(backend):
    """The compiled step and the (emulated) CUDA-graph block see the table as an input: after an
    in-place parameter update, their forces follow the eager network's."""
    model = schnet(4)
    pos, z = molecule(R=2, seed=2)
    masses = torch.full((z.shape[0],), 12.0)
    ff = ModelForceField(model, z, radial_table_spacing=0.005)
    integ = make_integrator("VelocityVerlet", 0.5, 300.0)
    e0, f0 = ff(pos)
    st = MDState(positions=pos, velocities=torch.zeros_like(pos), forces=f0, energy=e0, masses=masses)
    fast = FastStepper(integ, ff, st, backend=backend, compile_backend="aot_eager", emulate_graph=True)
    for scale in (1.0, 1.7):
        with torch.no_grad():
            model.interactions[1].conv.nn[0].weight.mul_(scale)
        new, blk = fast.run(st, 1)
        _, exact = forces(model, new.positions, z)
        assert torch.allclose(new.forces, exact, atol=5e-5, rtol=0), backend


def test_nve_energy_conservation_with_table_as_with_network():
    model = schnet(5, num_interactions=3).double()
    for p in model.parameters():
        p.requires_grad_(False)
    pos, z = molecule(R=4, N=10, seed=9, dtype=torch.float64)
    masses = torch.tensor([12.0, 1.0, 16.0, 1.0, 12.0, 1.0, 14.0, 1.0, 12.0, 1.0], dtype=torch.float64)
    integ = make_integrator("VelocityVerlet", 0.25, 300.0)
    drift = {}
    for spacing in (None, 0.005):
        ff = ModelForceField(model, z, radial_table_spacing=spacing)
        v = maxwell_boltzmann_velocities(masses, 4, 300.0, torch.Generator().manual_seed(0))
        e, f = ff(pos)
        st = MDState(positions=pos, velocities=v, forces=f, energy=e, masses=masses)
        total = []
        for _ in range(400):
            st = integ.step(st, ff)
            total.append(st.energy + st.kinetic_energy())
        total = torch.stack(total)
        drift[spacing] = (total - total[0]).abs().max().item()
    assert drift[None] > 0
    assert drift[0.005] < 1.5 * drift[None] + 1e-6, drift


@pytest.mark.skipif(not (SHARED / "reference/original_stable_checkpoints").is_dir(), reason="needs ../shared")
def test_published_checkpoint_forces_with_table():
    """The original's published SchNet aspirin checkpoint (trained weights) on real aspirin
    frames: table forces equal the float64 network's as closely as the float32 network's."""
    import numpy as np
    from mdsim.models import load_model
    ck = SHARED / "reference/original_stable_checkpoints/schnet_aspirin_1k_pretrained/best_checkpoint.pt"
    data = SHARED / "data/xtb_aspirin_500K.npz"
    if not ck.is_file() or not data.is_file():
        pytest.skip("needs the published checkpoint and the xTB aspirin data")
    model, _ = load_model(ck)
    d = np.load(data)
    pos = torch.tensor(d["R"][:8:2], dtype=torch.float32)
    z = torch.tensor(d["z"])
    _, f64 = forces(model.double(), pos.double(), z)
    model = model.float()
    _, f32 = forces(model, pos, z)
    _, ft = forces(model, pos, z, spacing=0.005, skin=0.3)
    err_net = (f32.double() - f64).abs().max().item()
    err_tab = (ft.double() - f64).abs().max().item()
    assert err_tab < max(4 * err_net, 1e-5), (err_tab, err_net)


def test_the_key_reaches_the_md_force_fields():
    """Simulator (simulator.py) and the StABlE/evaluation context take radial_table_spacing;
    null evaluates the network; StableConfig validates the range."""
    from mdsim.config import ConfigError, StableConfig, load_config
    from mdsim.md.runner import Simulator
    from mdsim.md.system import System

    model = schnet(6)
    z = torch.tensor([6, 1, 8, 1])
    sysm = System(atomic_numbers=z, masses=torch.tensor([12.0, 1.0, 16.0, 1.0]), bonds=torch.tensor([[0, 1]]),
                  ref_bond_lengths=torch.ones(1))
    assert Simulator(model, sysm).force_field.radial_table_spacing == 0.005
    assert Simulator(model, sysm, radial_table_spacing=None).force_field.radial_table_spacing is None
    assert StableConfig().radial_table_spacing == 0.005
    with pytest.raises(ConfigError, match="radial_table_spacing"):
        load_config(StableConfig, None, [("radial_table_spacing", -1.0)])
    with pytest.raises(ValueError, match="radial_table_spacing"):
        ModelForceField(model, z, radial_table_spacing=0.0)
