"""GemNet-T specifics.  The generic model checks (forces = −∇E by finite differences on molecules
and a periodic water box, rotation/translation/inversion/permutation invariance, batching,
periodic images and supercells, cutoff) run for ``gemnet_t`` in tests/test_models.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mdsim.config import PretrainConfig, StableConfig, load_config
from mdsim.data.splits import make_splits
from mdsim.models import batch_from_frames, build_model, energy_and_forces, load_model, save_checkpoint
from mdsim.models.gemnet_t import GemNetTModel, ScaleFactor, fit_scale_factors, he_orthogonal_
from mdsim.models.registry import resolve_hyperparameters

from test_water_local import water_frames

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_spherical=4, num_radial=4, num_blocks=2, emb_size_atom=16, emb_size_edge=16,
             emb_size_trip=8, emb_size_rbf=4, emb_size_cbf=4, emb_size_bil_trip=8, cutoff=3.0)
WATER = torch.tensor([[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]], dtype=torch.float64)


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("gemnet_t", **{**SMALL, **kw}).double()


def single(model, R, z, cell=None):
    return energy_and_forces(model, **batch_from_frames(R[None], z, cell=cell, dtype=R.dtype))


def test_molecule_across_the_boundary_equals_isolated_molecule():
    """A water molecule split over the corner of a box larger than 2×cutoff interacts through
    the periodic images exactly as the isolated molecule (two- and three-body terms)."""
    model = small()
    z = torch.tensor([8, 1, 1])
    L = 8.0
    R = WATER + torch.tensor([0.1, 0.2, 0.15], dtype=torch.float64)
    e_mol, f_mol = single(model, R, z)
    cell = torch.eye(3, dtype=torch.float64) * L
    wrapped = torch.remainder(R - 0.5, L)  # O near the corner, both H across faces
    assert (wrapped.max(0).values - wrapped.min(0).values).max() > L / 2
    e_pbc, f_pbc = single(model, wrapped, z, cell)
    torch.testing.assert_close(e_pbc, e_mol, atol=1e-10, rtol=0)
    torch.testing.assert_close(f_pbc, f_mol, atol=1e-10, rtol=0)
    assert f_mol.abs().max() > 1e-3
    # the pair across the boundary interacts: moving it apart changes the energy
    far = wrapped.clone()
    far[1, 0] -= 1.0
    assert abs(single(model, far, z, cell)[0] - e_pbc).item() > 1e-6


def test_max_neighbors_caps_incoming_edges():
    model = small()
    R = WATER.repeat(3, 1) + torch.tensor([[0, 0, 0]] * 3 + [[1.5, 0.3, 0]] * 3 + [[0.2, 1.7, 0.4]] * 3,
                                          dtype=torch.float64)
    z = torch.tensor([8, 1, 1] * 3)
    model.max_neighbors = None
    e_all, f_all = single(model, R, z)
    model.max_neighbors = 8  # every atom has 8 neighbours within the cutoff: no change
    assert (torch.cdist(R, R) < 3.0).sum(1).max() == 9
    e8, f8 = single(model, R, z)
    torch.testing.assert_close(e8, e_all, atol=0, rtol=0)
    model.max_neighbors = 3
    e3, f3 = single(model, R, z)
    assert abs(e3 - e_all).item() > 1e-6
    # with the cap reached, forces are still −∇E (away from rank changes)
    inp = batch_from_frames(R[None], z, dtype=torch.float64)
    h = 1e-5
    for a, k in [(0, 0), (4, 1), (8, 2)]:
        p1, p2 = inp["positions"].clone(), inp["positions"].clone()
        p1[a, k] += h
        p2[a, k] -= h
        kw = {q: v for q, v in inp.items() if q != "positions"}
        fd = -(model(p1, **kw) - model(p2, **kw)).item() / (2 * h)
        assert abs(fd - f3[a, k].item()) < 1e-6 * max(1.0, f3.abs().max().item())


def test_he_orthogonal_init_statistics():
    torch.manual_seed(0)
    w = he_orthogonal_(torch.empty(64, 32))
    torch.testing.assert_close(w.mean(1), torch.zeros(64), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.full((64,), 1 / 32), atol=1e-6, rtol=0)
    # variance preserving for unit-variance inputs
    x = torch.randn(20000, 32)
    assert abs((x @ w.T).var().item() - 1.0) < 0.05


def test_fitted_scale_factors_keep_second_moments_and_round_trip(tmp_path):
    model = small()
    frames = torch.tensor(water_frames(4, seed=2).R)
    z = torch.tensor([8, 1, 1] * 8)
    cell = torch.eye(3, dtype=torch.float64) * 6.2
    inp = batch_from_frames(frames, z, cell=cell, dtype=torch.float64)
    seen = {}

    def hook(mod, args, out):
        x, ref = args
        seen[mod.name] = (out.pow(2).mean().item(), ref.pow(2).mean().item())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, ScaleFactor)]
    with torch.no_grad():
        model(**inp)
    assert any(abs(a / b - 1) > 0.1 for a, b in seen.values())  # unfitted: moments differ
    values = fit_scale_factors(model, inp)
    assert len(values) == 3 * 2 + 3 and all(v > 0 for v in values.values())
    with torch.no_grad():
        e_fit = model(**inp)
    for name, (out2, ref2) in seen.items():
        assert out2 == pytest.approx(ref2, rel=1e-9), name
    for h in handles:
        h.remove()
    # scale file: JSON of named factors (plus a comment and the direct-force head's factors)
    path = tmp_path / "scale.json"
    path.write_text(json.dumps({"comment": "fitted", "OutBlock_0_had": 2.0, **values}))
    torch.manual_seed(0)
    m2 = build_model("gemnet_t", **SMALL, scale_file=str(path)).double()
    assert m2.scale_factor_values() == values
    with torch.no_grad():
        torch.testing.assert_close(m2(**inp), e_fit, atol=1e-12, rtol=0)
    # checkpoints carry the factors (state dict and hyperparameters), not the file path
    save_checkpoint(tmp_path / "g.pt", m2)
    path.unlink()
    m3, _ = load_model(tmp_path / "g.pt")
    with torch.no_grad():
        torch.testing.assert_close(m3(**inp), e_fit, atol=1e-12, rtol=0)
    bad = dict(values)
    bad.pop("AtomUpdate_1_sum")
    with pytest.raises(ValueError, match="missing \\['AtomUpdate_1_sum'\\]"):
        build_model("gemnet_t", **SMALL, scale_file=bad)
    with pytest.raises(ValueError, match="unknown \\['Foo'\\]"):
        build_model("gemnet_t", **SMALL, scale_file={**values, "Foo": 1.0})
    with pytest.raises(FileNotFoundError, match="scale_file not found"):
        build_model("gemnet_t", **SMALL, scale_file=str(tmp_path / "none.json"))


def test_scale_file_auto_is_fitted_without_touching_the_rng():
    data = water_frames(4, seed=3)
    torch.manual_seed(5)
    hp = resolve_hyperparameters("gemnet_t", {**SMALL, "scale_file": "auto"}, data)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)
    assert set(hp["scale_file"]) == set(small().scale_factor_values())
    assert any(v != 1.0 for v in hp["scale_file"].values())
    with pytest.raises(ValueError, match="training data"):
        resolve_hyperparameters("gemnet_t", {"scale_file": "auto"}, None)
    with pytest.raises(ValueError, match="resolved from training data"):
        build_model("gemnet_t", scale_file="auto")


def test_original_config_keys_build_the_original_architecture():
    cfg = load_config(PretrainConfig, ROOT / "configs/pretraining/water/gemnet-T.yml")
    hp = {k: v for k, v in cfg.model.extra.items() if k != "scale_file"}
    model = build_model("gemnet_t", **hp)
    assert model.cutoff == 5.0 and model.max_neighbors == 50
    assert len(model.int_blocks) == 4 and len(model.out_blocks) == 5
    assert model.atom_emb.weight.shape[1] == 128
    assert model.int_blocks[0].trip.bilinear.linear.weight.shape == (64, 16 * 64)
    for bad, match in [({"direct_forces": True}, "direct_forces"), ({"extensive": False}, "extensive"),
                       ({"rbf": {"name": "bessel"}}, "rbf"), ({"activation": "relu"}, "activation"),
                       ({"emb_size": 3}, "unknown hyperparameter")]:
        with pytest.raises(ValueError, match=match):
            build_model("gemnet_t", **{**hp, **bad})


def test_float32_and_compiled_match_eager_float64():
    model = small(num_blocks=1)
    g = torch.Generator().manual_seed(1)
    frames = WATER.repeat(2, 1)[None] + torch.tensor([[0.0] * 3] * 3 + [[2.0, 0.5, 0.3]] * 3, dtype=torch.float64) \
        + 0.05 * torch.randn(3, 6, 3, generator=g, dtype=torch.float64)
    z = torch.tensor([8, 1, 1, 8, 1, 1])
    inp = batch_from_frames(frames, z, dtype=torch.float64)
    e64, f64 = energy_and_forces(model, **inp)
    m32 = small(num_blocks=1).float()
    e32, f32 = energy_and_forces(m32, **batch_from_frames(frames, z, dtype=torch.float32))
    torch.testing.assert_close(e32, e64, atol=1e-4, rtol=0)
    torch.testing.assert_close(f32.double(), f64, atol=1e-4, rtol=1e-4)
    # after one eager call (graph templates cached) the forward is one graph without breaks;
    # the "eager" backend checks dynamo's capture (aot_eager takes > 40 s to build here)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for k in range(2):  # second call: the cached graph
        x = inp["positions"] + 0.01 * k
        e_c, f_c = energy_and_forces(compiled, **{**inp, "positions": x})
        e_e, f_e = energy_and_forces(model, **{**inp, "positions": x})
        torch.testing.assert_close(e_c, e_e, atol=1e-10, rtol=0)
        torch.testing.assert_close(f_c, f_e, atol=1e-10, rtol=0)


def test_training_on_periodic_water_lowers_the_loss():
    data = water_frames(8, seed=4)
    R = torch.tensor(data.R, dtype=torch.float32)
    F = torch.tensor(data.F, dtype=torch.float32)
    z = torch.tensor(data.z)
    cell = torch.tensor(data.cell, dtype=torch.float32)
    torch.manual_seed(0)
    model = build_model("gemnet_t", **SMALL)
    model.set_normalization(mean=float(data.E.mean()), std=float(data.F.std()))
    inp = batch_from_frames(R, z, cell=cell)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        _, f = energy_and_forces(model, **inp, create_graph=True)
        loss = (f - F.reshape(-1, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope="module")
def pretrained_water(tmp_path_factory):
    """The shipped GemNet-T water config (tiny sizes, scale_file auto) through pretraining."""
    from mdsim.training.pretrain import train

    root = tmp_path_factory.mktemp("gdata")
    make_splits(water_frames(), root, "water", None, sizes=["1k"], layouts=("random", "contiguous"))
    model_dir = tmp_path_factory.mktemp("gmodels")
    over = [("dataset.src", str(root)), ("run_dir", str(model_dir)), "optim.batch_size=32",
            "optim.eval_batch_size=32", "optim.max_epochs=2", "progress=false", "logger.name=none",
            "optim.lr_initial=0.003", "optim.ema_decay=null"]
    over += [f"model.{k}={v}" for k, v in SMALL.items()]
    train(load_config(PretrainConfig, ROOT / "configs/pretraining/water/gemnet-T.yml", over), log=lambda *a: None)
    return root, model_dir


def test_pretraining_pipeline_with_the_water_config(pretrained_water):
    _, model_dir = pretrained_water
    ck = torch.load(next(model_dir.rglob("checkpoint.pt")), weights_only=False)
    hist = ck["trainer_state"]["history"]
    assert len(hist) == 2 and hist[1]["train_loss"] < hist[0]["train_loss"]
    model, _ = load_model(next(model_dir.rglob("best_checkpoint.pt")))
    assert isinstance(model, GemNetTModel) and model.max_neighbors == 50
    assert any(v != 1.0 for v in model.scale_factor_values().values())


def test_stable_epoch_with_local_estimator(pretrained_water, tmp_path):
    from mdsim.training.stable import train

    root, model_dir = pretrained_water
    cfg = load_config(StableConfig, ROOT / "configs/stable_training/water/gemnet_t_train.yml", [
        ("src", str(root)), ("model_dir", str(model_dir)), ("log_dir", str(tmp_path)),
        "n_replicas=2", "steps=10", "n_dump=5", "vacf_window=3", "n_epochs=2", "imd_tol=10.0",
        "n_local_neighborhoods=4", "n_closest_molecules=1", "progress=false", "max_rdf_dist=3.0", "dr=0.1"])
    assert cfg.model == "gemnet_t" and cfg.local_estimator
    folder = train(cfg, log=lambda *a: None)
    pre = torch.load(next(model_dir.rglob("best_checkpoint.pt")), weights_only=False)["state_dict"]
    post = torch.load(folder / "ckpt.pt", weights_only=False)["state_dict"]
    assert (folder / "cycle1_epoch1.pt").exists()
    assert any(not torch.equal(pre[k], post[k]) for k in pre)
    for k in (k for k in pre if k.endswith(".scale")):  # constants, not trained
        torch.testing.assert_close(post[k].double(), pre[k].double(), rtol=1e-7, atol=0)
    assert np.isfinite(np.load(folder / "gt_rdf.npy")).all()
