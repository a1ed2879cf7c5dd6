"""Checkpoints: round trips, errors, and the original implementation's SchNet checkpoints."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mdsim.models import (CheckpointError, batch_from_frames, build_model, energy_and_forces,
                          load_model, save_checkpoint)
from mdsim.models.checkpoint import load_checkpoint_dict, load_weights
from mdsim.units import KCAL_MOL

from conftest import SHARED  # noqa: E402
ORIG = SHARED / "reference" / "original_stable_checkpoints"
PRETRAINED = ORIG / "schnet_aspirin_1k_pretrained" / "best_checkpoint.pt"
STABLE = ORIG / "schnet_aspirin_1k_stable" / "ckpt.pt"
ASPIRIN = SHARED / "data" / "xtb_aspirin_500K.npz"
needs_shared = pytest.mark.skipif(not (PRETRAINED.is_file() and ASPIRIN.is_file()),
                                  reason="shared reference checkpoints/data not available")

SMALL = {
    "schnet": dict(hidden_channels=8, num_filters=8, num_interactions=2, num_gaussians=6, cutoff=4.0),
    "nequip_e3nn": dict(r_max=4.0, num_layers=1, l_max=1, num_features=4, radial_mlp_neurons=8,
                   avg_num_neighbors=3.0, species=[1, 6, 8]),
    "dimenet_pp": dict(hidden_channels=8, num_blocks=1, int_emb_size=4, basis_emb_size=2,
                       out_emb_channels=8, num_spherical=3, num_radial=3, cutoff=4.0,
                       output_initializer="glorot_orthogonal"),
}


def _frames(n_frames=2, n_atoms=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.tensor([[0.0, 0, 0], [1.2, 0, 0], [0, 1.3, 0], [0, 0, 1.1], [1.1, 1.1, 1.1]])
    R = base[:n_atoms] + 0.1 * torch.randn(n_frames, n_atoms, 3, generator=g)
    z = torch.tensor([6, 8, 1, 1, 6])[:n_atoms]
    return R, z


@pytest.mark.parametrize("name", sorted(SMALL))
def test_roundtrip_restores_model_and_extra(tmp_path, name):
    torch.manual_seed(1)
    model = build_model(name, **SMALL[name])
    model.set_normalization(mean=-123.456789012345, std=0.5, atom_ref={6: -1.0})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    R, z = _frames()
    inp = batch_from_frames(R, z)
    e0, f0 = energy_and_forces(model, **inp)
    path = save_checkpoint(tmp_path / "sub" / "ck.pt", model,
                           {"epoch": 7, "optimizer": opt.state_dict(), "config": {"a": 1}})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]  # no temporary left behind
    loaded, ck = load_model(path)
    assert loaded.model_name == name and not loaded.training
    assert loaded.hyperparameters == model.hyperparameters
    assert ck["epoch"] == 7 and ck["config"] == {"a": 1} and "state" in ck["optimizer"]
    assert ck["normalizers"]["target"]["mean"] == -123.456789012345
    e1, f1 = energy_and_forces(loaded, **inp)
    assert torch.equal(e0, e1) and torch.equal(f0, f1)


def test_float64_model_reloads_as_float64(tmp_path):
    model = build_model("schnet", **SMALL["schnet"]).double()
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert next(loaded.parameters()).dtype == torch.float64


def test_errors_missing_file_other_model_and_mismatched_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not found: .*nope.pt"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nope.pt")
    schnet = build_model("schnet", **SMALL["schnet"])
    save_checkpoint(tmp_path / "s.pt", schnet)
    with pytest.raises(CheckpointError, match="holds model 'schnet', expected 'nequip_e3nn'"):
        load_model(tmp_path / "s.pt", expected_model="nequip_e3nn")
    # weights of one configuration into a model of another
    bigger = build_model("schnet", **dict(SMALL["schnet"], hidden_channels=16))
    with pytest.raises(CheckpointError, match=r"does not fit model 'schnet'.*shape mismatch.*embedding.weight"):
        load_weights(bigger, tmp_path / "s.pt")
    deeper = build_model("schnet", **dict(SMALL["schnet"], num_interactions=3))
    with pytest.raises(CheckpointError, match=r"missing keys \['interactions.2"):
        load_weights(deeper, tmp_path / "s.pt")
    nequip = build_model("nequip_e3nn", **SMALL["nequip_e3nn"])
    with pytest.raises(CheckpointError, match="holds model 'schnet', not 'nequip_e3nn'"):
        load_weights(nequip, tmp_path / "s.pt")
    # a checkpoint whose hyperparameters disagree with its weights
    ck = torch.load(tmp_path / "s.pt", weights_only=True)
    ck["hyperparameters"]["num_gaussians"] = 9
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt does not fit model 'schnet'.*distance_expansion.offset"):
        load_model(tmp_path / "bad.pt")
    # a bare state dict and a non-checkpoint file
    torch.save(schnet.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_model(tmp_path / "bare.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="reserved"):
        save_checkpoint(tmp_path / "x.pt", schnet, {"state_dict": {}})


# ----------------------------------------------------------------------------- original's SchNet
def _aspirin_frames(k=tuple(range(0, 20000, 2000))):
    d = np.load(ASPIRIN)
    return d["R"][list(k)], d["z"], d["E"][list(k), 0] * KCAL_MOL


def _reference_energy(state, config, R, z, dtype):
    """Independent path: stock PyG SchNet forward (its own readout), a brute-force radius graph,
    and the config's target mean."""
    from torch_geometric.nn.models import SchNet

    attrs = config["model_attributes"]
    cutoff = attrs["cutoff"]

    def radius_graph(pos, batch):
        d = torch.cdist(pos, pos)
        same = batch[:, None] == batch[None, :]
        mask = same & (d < cutoff) & ~torch.eye(len(pos), dtype=torch.bool)
        row, col = mask.nonzero(as_tuple=True)
        return torch.stack([row, col]), (pos[row] - pos[col]).norm(dim=-1)

    net = SchNet(hidden_channels=attrs["hidden_channels"], num_filters=attrs["num_filters"],
                 num_interactions=attrs["num_interactions"], num_gaussians=attrs["num_gaussians"],
                 cutoff=cutoff, interaction_graph=radius_graph)
    sd = {k[len("module."):]: v for k, v in state.items() if k != "module.atomic_mass"}
    net.load_state_dict(sd)
    net = net.to(dtype)
    B, N, _ = R.shape
    pos = torch.as_tensor(R, dtype=dtype).reshape(-1, 3)
    zz = torch.as_tensor(z).repeat(B)
    batch = torch.arange(B).repeat_interleave(N)
    with torch.no_grad():
        out = net(zz, pos, batch).reshape(-1)
    return out.double() + config["dataset"]["target_mean"]


@needs_shared
def test_original_schnet_matches_independent_stock_pyg_forward():
    raw = torch.load(PRETRAINED, map_location="cpu", weights_only=False)
    model, ck = load_model(PRETRAINED)
    assert model.model_name == "schnet"
    assert model.hyperparameters["num_interactions"] == 6 and model.cutoff == 5.0
    assert model.target_mean.item() == pytest.approx(-17637.827343506295, abs=1e-9)
    R, z, E_xtb = _aspirin_frames()
    inp = batch_from_frames(R, z, dtype=torch.float32)
    e32, f32 = energy_and_forces(model, **inp)
    model64 = model.double()
    e64, f64 = energy_and_forces(model64, **batch_from_frames(R, z, dtype=torch.float64))
    ref64 = _reference_energy(raw["state_dict"], raw["config"], R, z, torch.float64)
    ref32 = _reference_energy(raw["state_dict"], raw["config"], R, z, torch.float32)
    assert torch.allclose(e64, ref64, atol=1e-5, rtol=0)
    assert torch.allclose(e32, ref32, atol=1e-4, rtol=0)  # float32 network, other summation order
    assert torch.allclose(f32, f64.float(), atol=1e-3)
    # physically sensible: the MD17-trained model tracks the xTB reference (another level of
    # theory, so only loosely): energy fluctuations and forces correlate
    F_xtb = np.load(ASPIRIN)["F"][list(range(0, 20000, 2000))] * KCAL_MOL
    assert np.corrcoef(e64.numpy(), E_xtb)[0, 1] > 0.6
    assert np.corrcoef(f64.numpy().ravel(), F_xtb.ravel())[0, 1] > 0.8


@needs_shared
def test_original_checkpoints_config_sources(tmp_path):
    # StABlE-trained checkpoint: its config's model section has no name
    if STABLE.is_file():
        model, ck = load_model(STABLE)
        assert model.model_name == "schnet" and ck["epoch"] == 499
    # no config inside: config.yml beside the file is used
    raw = torch.load(PRETRAINED, map_location="cpu", weights_only=False)
    ref_model, _ = load_model(PRETRAINED)
    stripped = {k: v for k, v in raw.items() if k != "config"}
    torch.save(stripped, tmp_path / "best_checkpoint.pt")
    with pytest.raises(CheckpointError, match="no 'config' entry and .*config.yml does not exist"):
        load_model(tmp_path / "best_checkpoint.pt")
    shutil.copy(PRETRAINED.parent / "config.yml", tmp_path / "config.yml")
    model, _ = load_model(tmp_path / "best_checkpoint.pt")
    for k, v in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # normalisers only (no dataset target_mean): the float32 normaliser value is used
    cfg = dict(raw["config"])
    cfg.pop("dataset")
    torch.save(dict(raw, config=cfg), tmp_path / "n.pt")
    model_n, _ = load_model(tmp_path / "n.pt")
    assert model_n.target_mean.item() == float(raw["normalizers"]["target"]["mean"])
    # an original checkpoint of another model
    torch.save(dict(raw, config=dict(raw["config"], model="gemnet_t")), tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="model 'gemnet_t' are not supported"):
        load_model(tmp_path / "g.pt")
    # an original checkpoint whose config does not match its weights
    cfg = dict(raw["config"], model_attributes=dict(raw["config"]["model_attributes"], hidden_channels=32))
    torch.save(dict(raw, config=cfg), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"m.pt does not fit model 'schnet'.*shape mismatch"):
        load_model(tmp_path / "m.pt")
    assert load_checkpoint_dict(PRETRAINED)["val_metrics"]["forces_mae"]["metric"] > 0


def test_old_nequip_checkpoints_load_as_nequip_e3nn(tmp_path):
    """Checkpoints of our e3nn model written when it was registered as ``nequip`` still load."""
    from mdsim.models import NequIPModel
    m = build_model("nequip_e3nn", **SMALL["nequip_e3nn"])
    save_checkpoint(tmp_path / "old.pt", m)
    ck = torch.load(tmp_path / "old.pt", weights_only=False)
    ck["model_name"] = "nequip"
    torch.save(ck, tmp_path / "old.pt")
    back, _ = load_model(tmp_path / "old.pt")
    assert isinstance(back, NequIPModel)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())
