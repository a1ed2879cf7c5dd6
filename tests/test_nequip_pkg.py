"""``model: nequip`` — NequIP built by the nequip package (extra ``[nequip]``).

Without the package every test but the error-message one is skipped; with it: equivariance,
forces = −∂E/∂r (finite differences), all-pairs edges = a radius graph, precision kept under
``.to(dtype)``, files written by nequip's own tools (``nequip-train`` checkpoint, ``nequip-package``
zip) give nequip's own energies and forces, and pretraining → StABlE training → evaluation end to
end."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mdsim.models import (ModelConfigError, build_model, energy_and_forces, batch_from_frames,
                          load_model, nequip_available)
from mdsim.models.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(r_max=3.0, num_layers=2, l_max=1, num_features=4, radial_mlp_width=8, radial_mlp_depth=1,
             species=[1, 8], avg_num_neighbors=3.0, per_type_energy_scales={"H": 0.7, 8: 1.3},
             per_type_energy_shifts=0.1)
# two water molecules, close enough that some pairs are inside and some outside r_max
WATER2 = np.array([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0],
                   [2.6, 0.4, 0.3], [3.4, 0.9, 0.2], [2.4, -0.5, 0.6]])
Z = [8, 1, 1, 8, 1, 1]


@pytest.fixture(scope="module")
def nq():
    return pytest.importorskip("nequip")


@pytest.fixture(scope="module")
def model64(nq):
    torch.manual_seed(0)
    return build_model("nequip", **SMALL, model_dtype="float64")


def _frames(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return WATER2[None] + 0.08 * rng.standard_normal((n, *WATER2.shape))


@pytest.mark.skipif(nequip_available(), reason="the nequip package is installed")
def test_missing_package_gives_one_line_error():
    with pytest.raises(ModelConfigError, match=r"model: nequip needs `pip install -e \.\[nequip\]`"):
        build_model("nequip")


def test_rotation_invariant_energy_and_equivariant_forces(model64):
    R = torch.as_tensor(_frames(), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    e0, f0 = energy_and_forces(model64, **batch_from_frames(R, Z, dtype=torch.float64))
    e1, f1 = energy_and_forces(model64, **batch_from_frames(R @ q + 2.5, Z, dtype=torch.float64))
    assert f0.abs().max() > 1e-3  # the forces are not trivially zero
    assert torch.allclose(e0, e1, atol=1e-10, rtol=0)
    assert torch.allclose(f0 @ q, f1, atol=1e-10, rtol=0)


def test_forces_are_minus_energy_gradient(model64):
    R = torch.as_tensor(_frames(1, seed=3), dtype=torch.float64)
    _, f = energy_and_forces(model64, **batch_from_frames(R, Z, dtype=torch.float64))
    h = 1e-5
    for a, k in [(0, 0), (1, 1), (3, 2), (5, 0)]:
        Rp, Rm = R.clone(), R.clone()
        Rp[0, a, k] += h
        Rm[0, a, k] -= h
        with torch.no_grad():
            ep = model64(**batch_from_frames(Rp, Z, dtype=torch.float64))
            em = model64(**batch_from_frames(Rm, Z, dtype=torch.float64))
        assert float(-(ep - em) / (2 * h)) == pytest.approx(float(f[a, k]), abs=1e-7)


def test_all_pairs_equal_radius_graph_and_per_atom_energies(model64):
    """Pairs beyond r_max (all-pairs edges for molecules) contribute nothing; the energy is the
    sum of the per-atom energies (plus target_mean) for the local estimator."""
    from nequip.data import AtomicDataDict as K

    R = torch.as_tensor(_frames(1, seed=4)[0], dtype=torch.float64)
    inp = batch_from_frames(R[None], Z, dtype=torch.float64)
    ei, vec = model64.edges(inp["positions"], inp["batch"], 1, None, True)
    d = vec.norm(dim=-1)
    assert bool((d > model64.cutoff).any()) and bool((d < model64.cutoff).any())
    keep = d < model64.cutoff
    full = model64.nequip_data(**inp)
    radius = model64.nequip_data(**inp, edges=(ei[:, keep], vec[keep]))
    e_full = model64.net.model.func(full)[K.PER_ATOM_ENERGY_KEY]
    e_rad = model64.net.model.func(radius)[K.PER_ATOM_ENERGY_KEY]
    assert torch.allclose(e_full, e_rad, atol=1e-12, rtol=0)
    model64.set_normalization(mean=-3.0)
    try:
        ea = model64.atomic_energies(**inp)
        assert float(model64(**inp)) == pytest.approx(float(ea.sum()) - 3.0, abs=1e-12)
    finally:
        model64.set_normalization(mean=0.0)


def test_precision_kept_under_to_dtype_and_checkpoint_roundtrip(nq, tmp_path):
    m = build_model("nequip", **SMALL)  # float32 network
    R = torch.as_tensor(_frames(2), dtype=torch.float32)
    e32, f32 = energy_and_forces(m, **batch_from_frames(R, Z))
    m64 = m.to(torch.float64)
    assert m64.net_dtype == torch.float32 and m64.target_mean.dtype == torch.float64
    e64, f64 = energy_and_forces(m64, **batch_from_frames(R, Z, dtype=torch.float64))
    assert f64.dtype == torch.float64 and torch.allclose(e32, e64, atol=1e-5, rtol=0)
    m.set_normalization(mean=-12.5)
    save_checkpoint(tmp_path / "m.pt", m)
    back, ck = load_model(tmp_path / "m.pt", expected_model="nequip")
    assert ck["model_name"] == "nequip" and back.hyperparameters == m.hyperparameters
    eb, fb = energy_and_forces(back, **batch_from_frames(R, Z))
    assert torch.allclose(eb, e32 - 12.5, atol=1e-4, rtol=0) and torch.allclose(fb, f32, atol=1e-5)


def test_bad_keys_are_rejected(nq):
    with pytest.raises(ModelConfigError, match="unknown hyperparameter"):
        build_model("nequip", radial_mlp_neurons=8)
    with pytest.raises(ValueError, match="model_dtype"):
        build_model("nequip", model_dtype="float16")
    with pytest.raises(ValueError, match="per_type_energy_scales lacks entries"):
        build_model("nequip", **dict(SMALL, per_type_energy_scales={"H": 1.0}))
    with pytest.raises(ValueError, match="remove the keys"):
        build_model("nequip", nequip_file="x.ckpt", r_max=4.0)


# ----------------------------------------------------------------------------- nequip's own files
NEQUIP_TRAIN_YAML = """
run: [train]
seed: 1
cutoff_radius: 3.0
model_type_names: [H, O]
chemical_species: ${model_type_names}
dataloader: {_target_: torch.utils.data.DataLoader, batch_size: 4}
data:
  _target_: nequip.data.datamodule.NequIPDataModule
  seed: ${seed}
  split_dataset:
    dataset:
      _target_: nequip.data.dataset.ASEDataset
      file_path: DATA
      transforms:
        - _target_: nequip.data.transforms.ChemicalSpeciesToAtomTypeMapper
          model_type_names: ${model_type_names}
          chemical_species_to_atom_type_map: ${list_to_identity_dict:${chemical_species}}
        - {_target_: nequip.data.transforms.NeighborListTransform, r_max: "${cutoff_radius}"}
    train: 8
    val: 4
  train_dataloader: ${dataloader}
  val_dataloader: ${dataloader}
  stats_manager: {_target_: nequip.data.CommonDataStatisticsManager, type_names: "${model_type_names}"}
trainer:
  _target_: lightning.Trainer
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  callbacks:
    - {_target_: lightning.pytorch.callbacks.ModelCheckpoint, dirpath: "${hydra:runtime.output_dir}",
       filename: best, save_top_k: 1, monitor: val0_epoch/weighted_sum}
training_module:
  _target_: nequip.train.EMALightningModule
  loss: {_target_: nequip.train.EnergyForceLoss, per_atom_energy: true, coeffs: {total_energy: 1.0, forces: 1000.0}}
  val_metrics: {_target_: nequip.train.EnergyForceMetrics, coeffs: {total_energy_mae: 1.0, forces_mae: 1.0}}
  optimizer: {_target_: torch.optim.Adam, lr: 0.005}
  model:
    _target_: nequip.model.NequIPGNNModel
    seed: ${seed}
    model_dtype: float64
    type_names: ${model_type_names}
    r_max: ${cutoff_radius}
    l_max: 1
    num_layers: 2
    num_features: 4
    radial_mlp_depth: 1
    radial_mlp_width: 8
    avg_num_neighbors: ${training_data_stats:num_neighbors_mean}
    per_type_energy_shifts: ${training_data_stats:per_atom_energy_mean}
    per_type_energy_scales: ${training_data_stats:forces_rms}
"""


@pytest.fixture(scope="module")
def nequip_files(nq, tmp_path_factory):
    """(frames, best.ckpt, .nequip.zip) from nequip-train (1 epoch, EMT water dimers) and
    nequip-package."""
    import ase.io
    from ase import Atoms
    from ase.calculators.emt import EMT

    d = tmp_path_factory.mktemp("nequip_files")
    frames = []
    for R in _frames(12, seed=7):
        a = Atoms(numbers=Z, positions=R)
        a.calc = EMT()
        a.get_potential_energy()
        frames.append(a)
    ase.io.write(d / "data.xyz", frames, format="extxyz")
    (d / "tiny.yaml").write_text(NEQUIP_TRAIN_YAML.replace("DATA", str(d / "data.xyz")))
    import os
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "nequip.scripts.train", "-cp", str(d), "-cn", "tiny",
                    f"hydra.run.dir={d / 'out'}"], check=True, capture_output=True, env=env, cwd=d)
    ckpt = d / "out" / "best.ckpt"
    pkg = d / "out" / "tiny.nequip.zip"
    subprocess.run([sys.executable, "-m", "nequip.scripts.package", "build", str(ckpt), str(pkg)],
                   check=True, capture_output=True, env=env, cwd=d)
    return frames, ckpt, pkg


def _nequip_reference(path, frames):
    """Energies and forces from nequip's own model and data pipeline (its neighbour list and its
    ForceStressOutput)."""
    from nequip.data import AtomicDataDict as K
    from nequip.data import from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper, NeighborListTransform
    from nequip.model import ModelFromCheckpoint
    from nequip.utils.dtype import torch_default_dtype

    from mdsim.models.nequip_pkg import _nequip_global_state

    with _nequip_global_state():
        model = ModelFromCheckpoint(str(path))["sole_model"]
    tm = ChemicalSpeciesToAtomTypeMapper(["H", "O"], {"H": "H", "O": "O"})
    nl = NeighborListTransform(r_max=3.0)
    out = []
    for a in frames:
        with torch_default_dtype(torch.float64):  # nequip's data are float64 (its global default)
            data = nl(tm(from_ase(a)))
        res = model(K.with_batch_(data))
        out.append((float(res[K.TOTAL_ENERGY_KEY].sum()), res[K.FORCE_KEY].detach()))
    return out


@pytest.mark.slow  # nequip-train + nequip-package: ~1.5 min on one busy core
def test_nequip_checkpoint_and_package_load_as_our_model(nequip_files, tmp_path):
    frames, ckpt, pkg = nequip_files
    ref = _nequip_reference(ckpt, frames[:3])
    R = np.stack([a.positions for a in frames[:3]])
    for path in (ckpt, pkg):
        model, info = load_model(path, expected_model="nequip")
        assert info["model_name"] == "nequip" and model.species == [1, 8] and model.cutoff == 3.0
        e, f = energy_and_forces(model, **batch_from_frames(R, Z, dtype=torch.float64))
        for i, (er, fr) in enumerate(ref):
            assert float(e[i]) == pytest.approx(er, abs=1e-9)
            assert torch.allclose(f[6 * i:6 * (i + 1)], fr, atol=1e-9)
        # retrainable: gradients reach the nequip weights; our checkpoint of it reloads
        model.train()
        e2, f2 = energy_and_forces(model, **batch_from_frames(R, Z, dtype=torch.float64), create_graph=True)
        (f2.square().sum() + e2.sum()).backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        save_checkpoint(tmp_path / "ours.pt", model)
        back, _ = load_model(tmp_path / "ours.pt")
        eb, _ = energy_and_forces(back, **batch_from_frames(R, Z, dtype=torch.float64))
        assert torch.allclose(eb, e, atol=1e-12)
        with pytest.raises(ValueError, match="carries its own per-type"):
            model.set_normalization(mean=1.0)


# ----------------------------------------------------------------------------- pipeline
@pytest.mark.slow
def test_pretraining_stable_training_and_evaluation_with_nequip(nq, xtb_data_root, tmp_path):
    """configs/pretraining/md22/nequip.yml (shrunk, on the tiny xTB ethanol data) → StABlE
    training (forced learning) → evaluation of pre and post."""
    import json

    from mdsim.config import PretrainConfig, StableConfig, load_config
    from mdsim.training.evaluate import run_evaluation
    from mdsim.training.pretrain import train as pretrain
    from mdsim.training.stable import train as stable_train

    cfg = load_config(PretrainConfig, ROOT / "configs/pretraining/md22/nequip.yml", [
        ("dataset.src", str(xtb_data_root)), "dataset.name=xtb", "dataset.molecule=ethanol",
        "dataset.size=1k", ("run_dir", str(tmp_path / "MODELPATH")), "logger.name=none",
        "optim.max_epochs=2", "optim.batch_size=16", "model.num_layers=1", "model.num_features=4",
        "model.radial_mlp_width=8", "model.radial_mlp_depth=1", "model.r_max=4.0"])
    res = pretrain(cfg, log=lambda *a: None)
    ck = res.run_dir / "checkpoints" / "best_checkpoint.pt"
    _, info = load_model(ck, expected_model="nequip")
    hp = info["hyperparameters"]
    assert hp["species"] == [1, 6, 8] and hp["avg_num_neighbors"] > 1 and hp["per_type_energy_scales"] > 0
    assert math.isfinite(res.best_val["forces_mae"])

    def scfg(extra):
        return load_config(StableConfig, ROOT / "configs/stable_training/xtb/train.yml", [
            ("src", str(xtb_data_root)), "molecule=ethanol", "model=nequip", ("pretrained_checkpoint", str(ck)),
            ("log_dir", str(tmp_path)), "n_replicas=2", "steps=20", "n_dump=10", "vacf_window=10",
            "minibatch_size=20", "progress=false", "lr=0.001"] + extra)

    folder = stable_train(scfg(["n_epochs=2", "bond_dev_tol=0.0001"]), log=lambda *a: None)
    before, after = torch.load(ck, weights_only=False)["state_dict"], torch.load(folder / "ckpt.pt", weights_only=False)["state_dict"]
    assert any(k.startswith("net.") and not torch.equal(before[k], after[k]) for k in before)
    for em in ("pre", "post"):
        out = run_evaluation(scfg(["train=false", f"eval_model={em}", "integrator=Langevin", "n_epochs=1",
                                   "bond_dev_tol=0.5"]), log=lambda *a: None)
        m = json.loads((out / "final_metrics.json").read_text())
        assert np.isfinite(m["Force MAE (eV/A)"]) and m["Mean Stability (ps)"] > 0
