"""Capture-safe MD steps: torch.compile without graph breaks, equality with the eager step,
md_backend in StABlE rollouts, fallbacks, CUDA graphs (only with a GPU)."""
import warnings

import pytest
import torch

from mdsim.md.compiled import (FastStepper, functional_force_fn, get_stepper, make_tensor_step,
                               resolve_backend)
from mdsim.md.forces import ModelForceField, PotentialForceField
from mdsim.md.integrators import make_integrator
from mdsim.md.potentials import HarmonicOscillators
from mdsim.md.state import MDState
from mdsim.md.rollout import simulate

Z = torch.tensor([6, 6, 8, 1, 1, 1, 1, 1, 1])  # ethanol-like
MASSES = torch.tensor([12.011, 12.011, 15.999] + [1.008] * 6)
BASE = torch.tensor([[0.0, 0.0, 0.0], [1.52, 0.0, 0.0], [2.0, 1.35, 0.0], [-0.4, 1.0, 0.2],
                     [-0.4, -0.5, 0.9], [-0.4, -0.5, -0.9], [1.9, -0.5, 0.9], [1.9, -0.5, -0.9],
                     [2.9, 1.4, 0.3]])


def _model(dtype=torch.float64, seed=0):
    from mdsim.models import SchNetModel
    torch.manual_seed(seed)
    m = SchNetModel(hidden_channels=16, num_filters=16, num_interactions=2, num_gaussians=10, cutoff=4.0)
    m.set_normalization(mean=-10.0, std=2.0)
    return m.to(dtype).eval()


def _state(ff, R=3, dtype=torch.float64, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (BASE[None] + 0.05 * torch.randn(R, 9, 3, generator=g)).to(device, dtype)
    v = (0.01 * torch.randn(R, 9, 3, generator=g)).to(device, dtype)
    e, f = ff(x)
    return MDState(positions=x, velocities=v, forces=f, energy=e, masses=MASSES.to(device, dtype))


def _eager(integ, ff, st, n, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            st = integ.step(st, ff, g)
    return st


def _assert_states_equal(a, b, atol):
    for name in ("positions", "velocities", "forces", "energy", "zeta"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0, msg=name)
    assert torch.equal(a.step, b.step)


def test_functional_force_fn_matches_autograd_forces():
    m = _model()
    ff = ModelForceField(m, Z)
    st = _state(ff, R=4)
    fff = functional_force_fn(m, Z, 4)
    e, f = fff(st.positions)
    assert e.dtype == torch.float64 and f.dtype == st.positions.dtype and not f.requires_grad
    torch.testing.assert_close(e, st.energy, atol=1e-12, rtol=0)
    torch.testing.assert_close(f, st.forces, atol=1e-12, rtol=0)
    # forces are −∂E/∂x: a finite difference on one coordinate
    x = st.positions.clone()
    h = 1e-5
    x[2, 4, 1] += h
    ep = fff(x)[0][2]
    x[2, 4, 1] -= 2 * h
    em = fff(x)[0][2]
    assert abs(-(ep - em) / (2 * h) - f[2, 4, 1]) < 1e-6
    with pytest.raises(ValueError, match="built for 4 replicas"):
        fff(st.positions[:2])
    with pytest.raises(ValueError, match="molecules"):
        fff(st.positions, torch.eye(3, dtype=torch.float64).expand(4, 3, 3) * 10)


@pytest.mark.parametrize("name", ["NoseHoover", "Langevin"])
def test_compiled_step_fullgraph_no_breaks_equals_eager(name):
    m = _model()
    ff = ModelForceField(m, Z)
    st0 = _state(ff)
    integ = make_integrator(name, 0.5, 500.0, {"gamma": 20.0, "ttime": 10})
    step = make_tensor_step(integ, functional_force_fn(m, Z, 3))
    g = torch.Generator().manual_seed(7)
    noise = integ.draw_noise(st0, g)
    args = (st0.positions, st0.velocities, st0.forces, st0.energy, st0.zeta, st0.step, st0.masses, noise)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(step)(*args)
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ref = _eager(integ, ff, st0, 6, seed=3)
    g = torch.Generator().manual_seed(3)  # same stream: noise drawn outside the graph
    vals = tuple(args[:6])
    with torch.no_grad():
        for _ in range(6):
            vals = compiled(*vals, st0.masses, integ.draw_noise(st0, g))
    out = MDState(*vals[:4], masses=st0.masses, zeta=vals[4], step=vals[5])
    _assert_states_equal(ref, out, atol=1e-12)
    assert (ref.positions - st0.positions).abs().max() > 1e-4  # the replicas moved


def test_pre_drawn_noise_equals_generator_draws():
    pot = HarmonicOscillators(k=torch.tensor(2.0, dtype=torch.float64))
    ff = PotentialForceField(pot)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    e, f = ff(x)
    st = MDState(positions=x, velocities=torch.zeros_like(x), forces=f, energy=e,
                 masses=torch.ones(5, dtype=torch.float64))
    for name in ("Langevin", "LangevinOriginal"):
        integ = make_integrator(name, 1.0, 300.0, {"gamma": 50.0})
        a = integ.step(st, ff, torch.Generator().manual_seed(5))
        b = integ.step(st, ff, noise=integ.draw_noise(st, torch.Generator().manual_seed(5)))
        assert torch.equal(a.velocities, b.velocities) and torch.equal(a.positions, b.positions)
        c = integ.step(st, ff, noise=torch.zeros_like(x))  # zero noise: deterministic part only
        assert not torch.equal(a.velocities, c.velocities)
    nh = make_integrator("NoseHoover", 1.0, 300.0)
    assert nh.draw_noise(st) is None
    with pytest.raises(ValueError, match="deterministic"):
        nh.step(st, ff, noise=torch.zeros_like(x))


def test_simulate_compile_backend_equals_eager_and_sees_parameter_updates():
    m = _model()
    ff = ModelForceField(m, Z)
    st0 = _state(ff, R=2)
    integ = make_integrator("Langevin", 0.5, 500.0, {"gamma": 20.0})
    kw = dict(steps=12, n_dump=4, eq_steps=3, vstride=2)
    torch._dynamo.reset()
    for epoch in range(2):
        ref_state, ref = simulate(integ, ff, st0.clone(), generator=torch.Generator().manual_seed(epoch), **kw)
        out_state, rec = simulate(integ, ff, st0.clone(), generator=torch.Generator().manual_seed(epoch),
                                  backend="compile", compile_backend="aot_eager", **kw)
        _assert_states_equal(ref_state, out_state, atol=1e-12)
        assert torch.equal(rec.frame_steps, ref.frame_steps) and rec.frame_steps.tolist() == [4, 8, 12]
        assert rec.velocities.shape == ref.velocities.shape == (4, 2, 9, 3)  # steps 5, 7, 9, 11
        for name in ("frames", "energies", "velocities", "temperatures"):
            torch.testing.assert_close(getattr(rec, name), getattr(ref, name), atol=1e-12, rtol=0)
        # the optimiser updates parameters in place: the compiled step must see the new values
        with torch.no_grad():
            m.interactions[0].lin.weight.mul_(1.5)
            m.lin2.bias.add_(0.3)
    stepper = get_stepper(integ, ff, st0, "compile", compile_backend="aot_eager", block_steps=4)
    assert stepper.backend == "compile" and stepper._compile_checked  # the one simulate used
    # reused across epochs (one stepper per force field and settings)
    assert get_stepper(integ, ff, st0, "compile", compile_backend="aot_eager", block_steps=4) is stepper


def test_cuda_graph_request_on_cpu_falls_back_with_warning():
    m = _model()
    ff = ModelForceField(m, Z)
    st0 = _state(ff, R=2)
    integ = make_integrator("NoseHoover", 0.5, 500.0)
    ref_state, _ = simulate(integ, ff, st0.clone(), steps=5, n_dump=5)
    with pytest.warns(RuntimeWarning, match="cuda_graph needs a CUDA device"):
        out_state, _ = simulate(integ, ff, st0.clone(), steps=5, n_dump=5, backend="cuda_graph",
                                compile_backend="aot_eager")
    _assert_states_equal(ref_state, out_state, atol=1e-12)
    # periodic systems (host-side neighbour lists) run eager; unknown names are errors
    periodic = MDState(positions=st0.positions, velocities=st0.velocities, forces=st0.forces, energy=st0.energy,
                       masses=st0.masses, cell=torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 12)
    assert resolve_backend("compile", periodic)[0] == "eager"
    assert resolve_backend("cuda_graph", periodic)[0] == "eager"
    with pytest.raises(ValueError, match="md_backend"):
        resolve_backend("jit", st0)


def test_graph_block_logic_emulated_on_cpu():
    """The cuda_graph path's host logic (static buffers, K-step blocks with a shorter tail,
    pre-drawn noise, per-step outputs, recording copies, recapture when parameters are
    re-allocated) with 'replay' executing the block eagerly."""
    m = _model()
    ff = ModelForceField(m, Z)
    st0 = _state(ff, R=2)
    integ = make_integrator("Langevin", 0.5, 500.0, {"gamma": 20.0})
    stepper = FastStepper(integ, ff, st0, "cuda_graph", block_steps=4, emulate_graph=True)
    assert stepper.backend == "cuda_graph"
    out, blk = stepper.run(st0, 10, torch.Generator().manual_seed(4))
    assert set(stepper._graphs) == {4, 2} and stepper.captures == 2
    assert blk.positions.shape == (10, 2, 9, 3) and blk.energy.shape == (10, 2)
    g = torch.Generator().manual_seed(4)
    ref = st0
    with torch.no_grad():
        for j in range(10):
            ref = integ.step(ref, ff, g)
            torch.testing.assert_close(blk.velocities[j], ref.velocities, atol=1e-12, rtol=0)
            torch.testing.assert_close(blk.energy[j], ref.energy, atol=1e-12, rtol=0)
    _assert_states_equal(ref, out, atol=1e-12)
    # in-place parameter update: same blocks; re-allocated parameter: recaptured
    with torch.no_grad():
        m.lin2.bias.add_(0.2)
    stepper.run(st0, 4)
    assert stepper.captures == 2
    m.lin2.bias = torch.nn.Parameter(m.lin2.bias.detach() + 0.1)
    out, _ = stepper.run(st0, 4, torch.Generator().manual_seed(6))
    assert stepper.captures == 3
    _assert_states_equal(_eager(integ, ff, st0, 4, 6), out, atol=1e-12)
    # through simulate: records copied out of the reused block buffers
    kw = dict(steps=9, n_dump=3, eq_steps=1, vstride=2)
    ref_state, ref_rec = simulate(integ, ff, st0.clone(), generator=torch.Generator().manual_seed(8), **kw)
    out_state, rec = simulate(integ, ff, st0.clone(), generator=torch.Generator().manual_seed(8), backend="cuda_graph",
                              block_steps=3, stepper_options={"emulate_graph": True}, **kw)
    _assert_states_equal(ref_state, out_state, atol=1e-12)
    for name in ("frames", "energies", "velocities", "temperatures"):
        torch.testing.assert_close(getattr(rec, name), getattr(ref_rec, name), atol=1e-12, rtol=0)


def test_compile_failure_falls_back_to_eager():
    m = _model()
    ff = ModelForceField(m, Z)
    st0 = _state(ff, R=2)
    integ = make_integrator("NoseHoover", 0.5, 500.0)

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    torch._dynamo.reset()
    stepper = FastStepper(integ, ff, st0, "compile", compile_backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        out, blk = stepper.run(st0, 3)
    assert stepper.backend == "eager" and len(blk) == 3
    _assert_states_equal(_eager(integ, ff, st0, 3, 0), out, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["NoseHoover", "Langevin"])
def test_cuda_graph_rollout_equals_eager(name):
    dev = "cuda"
    m = _model(torch.float32).to(dev)
    ff = ModelForceField(m, Z)
    st0 = _state(ff, R=8, dtype=torch.float32, device=dev)
    integ = make_integrator(name, 0.5, 500.0, {"gamma": 20.0})
    kw = dict(steps=23, n_dump=5, eq_steps=2, vstride=1, block_steps=5)  # 4 full blocks + a 3-step one
    for epoch in range(2):
        ref_state, ref = simulate(integ, ff, st0.clone(), generator=torch.Generator().manual_seed(epoch),
                                  **{k: v for k, v in kw.items() if k != "block_steps"})
        out_state, rec = simulate(integ, ff, st0.clone(), generator=torch.Generator().manual_seed(epoch),
                                  backend="cuda_graph", **kw)
        for name_ in ("positions", "velocities", "zeta"):
            torch.testing.assert_close(getattr(out_state, name_), getattr(ref_state, name_), atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(rec.energies, ref.energies, atol=1e-3, rtol=1e-6)
        torch.testing.assert_close(rec.velocities, ref.velocities, atol=2e-5, rtol=1e-4)
        assert torch.equal(out_state.step, ref_state.step)
        with torch.no_grad():  # in-place update: replays read the new parameters
            m.lin2.bias.add_(0.3)
            m.interactions[0].lin.weight.mul_(1.2)
    stepper = get_stepper(integ, ff, st0, "cuda_graph", compile_backend="inductor", block_steps=5)
    assert stepper.backend == "cuda_graph" and set(stepper._graphs) == {5, 3}
    # re-allocated parameters (e.g. load into a new tensor) trigger a recapture
    old = stepper._graphs[5]
    m.lin2.bias = torch.nn.Parameter(m.lin2.bias.detach().clone() + 0.1)
    ref_state = _eager(integ, ff, st0, 5, 11)
    out_state, _ = stepper.run(st0, 5, torch.Generator().manual_seed(11))
    assert stepper._graphs[5] is not old
    torch.testing.assert_close(out_state.positions, ref_state.positions, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_inductor_compiled_step_equals_eager_float32():
    m = _model(torch.float32)
    ff = ModelForceField(m, Z)
    st0 = _state(ff, R=4, dtype=torch.float32)
    integ = make_integrator("NoseHoover", 0.5, 500.0, {"ttime": 10})
    torch._dynamo.reset()
    stepper = FastStepper(integ, ff, st0, "compile", compile_backend="inductor", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback
        out, _ = stepper.run(st0, 20)
    assert stepper.backend == "compile"
    ref = _eager(integ, ff, st0, 20, 0)
    for name in ("positions", "velocities", "zeta"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
