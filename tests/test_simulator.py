"""Simulator: recording, outputs (thermo.csv, extxyz), model force field, CLI."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdsim.md.forces import ModelForceField, PotentialForceField
from mdsim.md.potentials import HarmonicBonds
from mdsim.md.runner import Recorder, Simulator
from mdsim.md.system import System, detect_bonds
from mdsim.units import FS

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]
from conftest import SHARED  # noqa: E402
CKPT = SHARED / "reference/original_stable_checkpoints/schnet_aspirin_1k_pretrained/best_checkpoint.pt"
ASPIRIN = SHARED / "data/xtb_aspirin_500K.npz"


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: OpenMP-parallel index_add on tiny tensors stalls
    for tens of ms when the other core is busy; one thread is faster and predictable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ethanol_system(tol=0.5):
    from ase.build import molecule
    from ase.data import atomic_masses
    a = molecule("CH3CH2OH")
    z = torch.tensor(a.numbers)
    bonds = torch.tensor(detect_bonds(a.numbers, a.positions))
    x = torch.tensor(a.positions, dtype=DT)
    ref = (x[bonds[:, 1]] - x[bonds[:, 0]]).norm(dim=-1)
    sysm = System(atomic_numbers=z, masses=torch.tensor(atomic_masses[a.numbers], dtype=DT), bonds=bonds,
                  ref_bond_lengths=ref, stability_tolerance=tol)
    return sysm, x


def _frames(x, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return x[None] + 0.01 * torch.randn(n, *x.shape, generator=g, dtype=DT)


def test_recorder_strides():
    rec = Recorder(20, every=1, start=5, fields=("positions", "velocities", "accelerations", "energy"))
    assert rec.n_frames == 15 and rec.steps[0] == 6 and rec.steps[-1] == 20
    assert rec.slot(5) is None and rec.slot(6) == 0 and rec.slot(20) == 14
    rec2 = Recorder(20, every=4, start=2)
    assert rec2.steps.tolist() == [6, 10, 14, 18]
    with pytest.raises(ValueError, match="record fields"):
        Recorder(10, fields=("nonsense",))


def test_simulator_outputs_readable(tmp_path):
    from ase.io import read
    sysm, x = _ethanol_system()
    ff = PotentialForceField(HarmonicBonds(sysm.bonds, sysm.ref_bond_lengths, k=20.0))
    sim = Simulator(ff, sysm, integrator="Langevin", timestep_fs=0.5, temperature_K=300.0,
                    integrator_config={"gamma": 10.0}, n_dump=10, out_dir=tmp_path, dtype=DT, seed=1)
    st = sim.initial_state(_frames(x), 3, mode="random")
    res = sim.run(st, 30, record=True, record_every=1, record_start=5,
                  record_fields=("positions", "velocities", "energy"), progress=False)
    sim.close()
    assert res.stable.all() and res.check_steps.tolist() == [0, 10, 20, 30]
    assert res.frames("positions").shape == (25, 3, 9, 3)
    assert res.frames("positions", stride=5).shape == (5, 3, 9, 3)
    rows = list(csv.DictReader(open(tmp_path / "thermo.csv")))
    assert list(rows[0]) == ["time_fs", "replica", "epot", "ekin", "temperature", "stable"]
    assert len(rows) == 4 * 3
    assert [float(r["time_fs"]) for r in rows[::3]] == [0.0, 5.0, 10.0, 15.0]
    # rescaled MB start: (3N−3)/2 kT in the velocities with zero net momentum, reported over the
    # 3N degrees of freedom of Langevin dynamics
    assert float(rows[0]["temperature"]) == pytest.approx(300.0 * 24 / 27, rel=1e-5)
    for r in range(3):
        images = read(tmp_path / f"replica_{r:04d}.extxyz", ":")
        assert len(images) == 4
        last = images[-1]
        assert last.info["replica"] == r and last.info["step"] == 30 and last.info["stable"]
        np.testing.assert_allclose(last.get_positions(), res.state.positions[r].numpy(), atol=1e-6)
        np.testing.assert_allclose(last.get_velocities(), res.state.velocities[r].numpy(), atol=1e-8)
        assert last.get_potential_energy() == pytest.approx(res.state.energy[r].item(), abs=1e-8)
        np.testing.assert_allclose(last.get_forces(), res.state.forces[r].numpy(), atol=1e-6)
        # frame at step 20 equals the recorded post-step state
        np.testing.assert_allclose(images[2].get_positions(), res.frames("positions")[20 - 6, r].numpy(), atol=1e-6)
        assert float(rows[3 * 3 + r]["epot"]) == pytest.approx(res.state.energy[r].item(), abs=1e-8)
    # continuing: global step counter and appended output, no duplicate step-0 line
    res2 = sim.run(res.state, 10, progress=False)
    sim.close()
    assert res2.check_steps.tolist() == [30, 40] and sim.global_step == 40
    rows = list(csv.DictReader(open(tmp_path / "thermo.csv")))
    assert len(rows) == 5 * 3 and float(rows[-1]["time_fs"]) == 20.0
    assert len(read(tmp_path / "replica_0001.extxyz", ":")) == 5


def test_simulator_periodic_imd(tmp_path):
    """Two diatomic molecules in a periodic box approach each other; imd flags the replica."""
    L = 8.0
    sysm = System(atomic_numbers=torch.tensor([1, 1, 1, 1]), masses=torch.ones(4, dtype=DT),
                  bonds=torch.tensor([[0, 1], [2, 3]]), ref_bond_lengths=torch.tensor([0.8, 0.8], dtype=DT),
                  cell=torch.eye(3, dtype=DT) * L, pbc=True, molecule_index=torch.tensor([0, 0, 1, 1]),
                  stability_criterion="imd", stability_tolerance=1.2)
    pos = torch.tensor([[0.5, 0, 0], [1.3, 0, 0], [4.5, 0, 0], [5.3, 0, 0]], dtype=DT)
    ff = PotentialForceField(lambda p, c: (torch.zeros(p.shape[0], dtype=p.dtype), torch.zeros_like(p)))
    sim = Simulator(ff, sysm, integrator="VelocityVerlet", timestep_fs=1.0, temperature_K=None, n_dump=1,
                    dtype=DT, out_dir=tmp_path)
    st = sim.initial_state(pos[None].repeat(2, 1, 1), 2, velocities=torch.zeros(2, 4, 3, dtype=DT))
    assert st.cell.shape == (2, 3, 3)
    v = st.velocities.clone()
    # replica 1: molecule 1 moves towards the periodic image of molecule 0 (gap 3.2 Å across the
    # boundary: 5.3 -> 8.5): reaches 1.2 Å after 2.0 Å of travel = step 20
    v[1, 2:, 0] = 2.0 / (19.5 * FS)
    st.velocities = v
    res = sim.run(st, 40, progress=False)
    sim.close()
    assert res.first_unstable_step.tolist() == [-1, 20]
    assert res.check_values[0, 0].item() == pytest.approx(3.2)
    from ase.io import read
    im = read(tmp_path / "replica_0001.extxyz", ":")
    assert im[0].pbc.all() and np.allclose(im[0].cell.lengths(), L)


def test_model_force_field_batched_matches_energy_and_forces(one_thread):
    models = pytest.importorskip("mdsim.models")
    sysm, x = _ethanol_system()
    torch.manual_seed(0)
    model = models.build_model("schnet", hidden_channels=16, num_filters=16, num_interactions=2,
                               num_gaussians=10, cutoff=4.0).double()
    ff = ModelForceField(model, sysm.atomic_numbers)
    frames = _frames(x, 4)
    e, f = ff(frames)
    assert e.shape == (4,) and f.shape == (4, 9, 3)
    for r in range(4):
        e1, f1 = models.energy_and_forces(model, frames[r], sysm.atomic_numbers, torch.zeros(9, dtype=torch.long), 1)
        torch.testing.assert_close(e[r:r + 1], e1)
        torch.testing.assert_close(f[r], f1)
    # a model in a Simulator: NVE energy conservation in float64
    sim = Simulator(model, sysm, integrator="VelocityVerlet", timestep_fs=0.25, temperature_K=300.0,
                    n_dump=50, dtype=DT, seed=0)
    st = sim.initial_state(frames, 2)
    e0 = st.energy + st.kinetic_energy()
    res = sim.run(st, 50, progress=False)
    drift = (res.state.energy + res.state.kinetic_energy() - e0).abs()
    assert torch.all(drift < 0.02 * st.kinetic_energy()), drift


def test_cli_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, R=np.zeros((2, 3, 3)))
    out = subprocess.run([sys.executable, str(ROOT / "simulator.py"), "--checkpoint", "x.pt", "--init", str(bad),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "--init" in out.stderr and "'z'" in out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "simulator.py"), "--checkpoint", "x.pt", "--init", str(bad),
                          "--out", str(tmp_path / "o"), "--timestep", "-1"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode != 0 and "--timestep" in out.stderr


@pytest.mark.skipif(not (CKPT.is_file() and ASPIRIN.is_file()), reason="shared reference data absent")
def test_cli_original_schnet_checkpoint(tmp_path):
    pytest.importorskip("mdsim.models")
    from ase.io import read
    out_dir = tmp_path / "md"
    # a small extxyz init file cut from the shared aspirin frames
    d = np.load(ASPIRIN)
    from ase import Atoms
    from ase.io import write
    init = tmp_path / "init.extxyz"
    write(init, [Atoms(numbers=d["z"], positions=d["R"][i]) for i in range(0, 40, 2)])
    cmd = [sys.executable, str(ROOT / "simulator.py"), "--checkpoint", str(CKPT), "--init", str(init),
           "--replicas", "2", "--steps", "20", "--integrator", "Langevin", "--temperature", "500",
           "--timestep", "0.5", "--out", str(out_dir), "--n-dump", "10", "--seed", "3", "--no-progress",
           "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((out_dir / "stability.json").read_text())
    assert summary["stable"] == [True, True]
    rows = list(csv.DictReader(open(out_dir / "thermo.csv")))
    assert len(rows) == 3 * 2
    epot = np.array([float(r["epot"]) for r in rows])
    assert np.all(np.isfinite(epot)) and np.all(np.abs(epot + 17637) < 5)  # SchNet aspirin ≈ −17,638 eV
    assert len(read(out_dir / "replica_0001.extxyz", ":")) == 3
