"""ASE calculator: same numbers as energy_and_forces, molecules and periodic boxes."""
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import CalculatorSetupError

from mdsim.calculator import StableCalculator
from mdsim.models import batch_from_frames, build_model, energy_and_forces, save_checkpoint

from conftest import SHARED  # noqa: E402

PRETRAINED = SHARED / "reference/original_stable_checkpoints/schnet_aspirin_1k_pretrained/best_checkpoint.pt"
ASPIRIN = SHARED / "data/xtb_aspirin_500K.npz"


def _water_atoms(L=5.0, seed=0):
    rng = np.random.default_rng(seed)
    o = np.array([[0.5, 0.5, 0.5], [3.0, 2.8, 0.6], [1.0, 3.0, 3.2], [3.2, 0.7, 3.1]])
    pos = np.concatenate([o, o + [0.96, 0, 0], o + [-0.24, 0.93, 0]]) + 0.05 * rng.standard_normal((12, 3))
    return Atoms("O4H8", positions=pos, cell=[L, L, L], pbc=True)


@pytest.mark.parametrize("name,hp", [
    ("schnet", dict(hidden_channels=8, num_filters=8, num_interactions=2, num_gaussians=6, cutoff=3.0)),
    ("nequip_e3nn", dict(r_max=3.0, num_layers=1, l_max=1, num_features=4, radial_mlp_neurons=8,
                    avg_num_neighbors=3.0, species=[1, 8])),
])
def test_calculator_equals_energy_and_forces(tmp_path, name, hp):
    torch.manual_seed(0)
    model = build_model(name, **hp)
    model.set_normalization(mean=-50.0, std=2.0)
    path = save_checkpoint(tmp_path / f"{name}.pt", model)
    calc = StableCalculator(checkpoint=path)
    # periodic box
    atoms = _water_atoms()
    atoms.calc = calc
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    inp = batch_from_frames(torch.tensor(atoms.positions)[None], atoms.numbers,
                            cell=torch.tensor(np.asarray(atoms.cell)))
    e_ref, f_ref = energy_and_forces(model, **inp)
    assert e == pytest.approx(e_ref.item(), abs=1e-9)
    np.testing.assert_allclose(f, f_ref.numpy(), atol=1e-6)
    assert f.dtype == np.float64 and f.shape == (12, 3)
    # wrapping atoms into the box changes nothing (periodic images)
    shifted = atoms.copy()
    shifted.positions[:3] += 5.0
    shifted.calc = calc
    assert shifted.get_potential_energy() == pytest.approx(e, abs=1e-4)
    # the same atoms without PBC: molecule path (cell ignored), differs from the periodic one
    mol = atoms.copy()
    mol.pbc = False
    mol.calc = calc
    e_mol = mol.get_potential_energy()
    e_ref_mol, f_ref_mol = energy_and_forces(model, **batch_from_frames(
        torch.tensor(atoms.positions)[None], atoms.numbers))
    assert e_mol == pytest.approx(e_ref_mol.item(), abs=1e-9)
    np.testing.assert_allclose(mol.get_forces(), f_ref_mol.numpy(), atol=1e-6)
    assert abs(e_mol - e) > 1e-6
    # forces are −dE/dx as ASE sees them (numerical check on one coordinate, float32 model)
    from ase.calculators.fd import calculate_numerical_forces

    num = calculate_numerical_forces(mol, eps=1e-3, iatoms=[0, 5])
    np.testing.assert_allclose(mol.get_forces()[[0, 5]], num, atol=5e-3 * max(1.0, np.abs(num).max()))


def test_calculator_bad_setup(tmp_path):
    with pytest.raises(CalculatorSetupError, match="exactly one"):
        StableCalculator()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        StableCalculator(checkpoint=tmp_path / "missing.pt")
    model = build_model("schnet", hidden_channels=8, num_filters=8, num_interactions=1,
                        num_gaussians=4, cutoff=3.0)
    atoms = _water_atoms()
    atoms.pbc = [True, True, False]
    atoms.calc = StableCalculator(model=model)
    with pytest.raises(CalculatorSetupError, match="partial periodicity"):
        atoms.get_potential_energy()


@pytest.mark.skipif(not (PRETRAINED.is_file() and ASPIRIN.is_file()), reason="shared data/checkpoints not available")
def test_calculator_with_original_schnet_checkpoint():
    from mdsim.models import load_model

    d = np.load(ASPIRIN)
    atoms = Atoms(numbers=d["z"], positions=d["R"][123])
    atoms.calc = StableCalculator(checkpoint=PRETRAINED)
    model, _ = load_model(PRETRAINED)
    e_ref, f_ref = energy_and_forces(model, **batch_from_frames(d["R"][123][None], d["z"]))
    assert atoms.get_potential_energy() == pytest.approx(e_ref.item(), abs=1e-9)
    assert atoms.get_potential_energy() == pytest.approx(-17637.8, abs=2.0)
    np.testing.assert_allclose(atoms.get_forces(), f_ref.numpy(), atol=1e-6)
