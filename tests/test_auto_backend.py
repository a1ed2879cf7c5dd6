"""``md_backend: auto``: the choice follows the rules of resolve_auto_backend and is logged once."""
import torch

from mdsim.config import StableConfig
from mdsim.md import rollout as ro
from mdsim.md.forces import ModelForceField
from mdsim.md.integrators import make_integrator
from mdsim.md.state import MDState
from mdsim.models import SchNetModel


def _state(R=2, N=5, cell=None):
    pos = torch.randn(R, N, 3)
    return MDState(positions=pos, velocities=torch.zeros_like(pos), forces=torch.zeros_like(pos),
                   energy=torch.zeros(R, dtype=torch.float64), masses=torch.ones(N), cell=cell)


def test_auto_rules():
    model = SchNetModel(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=5, cutoff=3.0)
    ff = ModelForceField(model, torch.tensor([1, 1, 6, 8, 1]))
    st = _state()
    work_per_step = st.n_replicas * st.n_atoms
    long_run = ro.AUTO_COMPILE_MIN_ATOM_STEPS // work_per_step + 1
    assert ro.resolve_auto_backend(st, ff, long_run)[0] == "compile"
    assert ro.resolve_auto_backend(st, ff, None)[0] == "compile"  # unknown length: long
    assert ro.resolve_auto_backend(st, ff, long_run - 2)[0] == "eager"
    assert ro.resolve_auto_backend(st, lambda x, c=None: None, long_run)[0] == "eager"  # no model
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        backend, why = ro.resolve_auto_backend(st, ff, long_run)
        assert backend == "compile" and "1 of this process's 2 threads" in why
    finally:
        torch.set_num_threads(n)
    periodic = _state(cell=torch.eye(3).expand(2, 3, 3) * 10)
    assert ro.resolve_auto_backend(periodic, ff, long_run)[0] == "eager"


def test_auto_is_the_default_and_logged_once(capsys):
    assert StableConfig().md_backend == "auto"
    model = SchNetModel(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=5, cutoff=3.0)
    ff = ModelForceField(model, torch.tensor([1, 1, 6, 8, 1]))
    integ = make_integrator("VelocityVerlet", 0.5)
    ro._AUTO_LOGGED.clear()
    for _ in range(3):
        stepper = ro.make_stepper(integ, ff, _state(), "auto", planned_steps=10)
        assert stepper.backend == "eager"
    err = capsys.readouterr().err
    assert err.count("md_backend auto → eager") == 1


def test_compiled_cpu_steps_run_on_one_thread_and_restore_the_setting():
    """FastStepper(compile) on a CPU runs its steps with cpu_threads intra-op threads (default 1,
    measured faster) and gives the process its own setting back; eager runs keep it."""
    from mdsim.md.compiled import FastStepper
    model = SchNetModel(hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=5, cutoff=3.0)
    z = torch.tensor([1, 1, 6, 8, 1])
    seen = []

    class Spy(ModelForceField):
        def compute(self, positions, cell=None):
            seen.append(torch.get_num_threads())
            return super().compute(positions, cell)

    ff = Spy(model, z)
    integ = make_integrator("VelocityVerlet", 0.5)
    st = _state()
    e, f = ff(st.positions)
    st = MDState(positions=st.positions, velocities=st.velocities, forces=f, energy=e, masses=st.masses)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen.clear()
        FastStepper(integ, ff, st, "eager").run(st, 2)
        assert seen == [2, 2]
        fast = FastStepper(integ, ff, st, "compile", compile_backend="eager")
        fast.force_fn = ff  # trace the spy (the functional force field is what compile uses otherwise)
        fast._tensor_step = __import__("mdsim.md.compiled", fromlist=["x"]).make_tensor_step(integ, ff)
        seen.clear()
        fast.run(st, 2)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
        seen.clear()
        FastStepper(integ, ff, st, "compile", compile_backend="eager", cpu_threads=None)._threads().__enter__()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
