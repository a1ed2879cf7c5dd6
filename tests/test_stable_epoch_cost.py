"""Cheaper StABlE learning epochs: the energy/force gradient on a random subset of training
frames (``energy_force_frames_per_epoch``) and no recomputation of what the epoch already has
(monitoring observables reused by the estimator, test-set errors once per parameter values).
The default path must stay bit-identical to recomputing everything."""
import pytest
import torch

from test_stable_training import QUIET, params, stable_cfg

from mdsim.training import stable as stable_mod
from mdsim.training.context import prepare
from mdsim.training.learning import EFLossSettings, energy_force_gradient, energy_force_subset, observable_gradient
from mdsim.training.stable import StableLoop, epoch_observables, train
from mdsim.training.targets import training_observable

LEARN = ["bond_dev_tol=0.0001"]  # every replica unstable: epoch 1 triggers, later epochs learn


def flat(gs):
    return torch.cat([g.reshape(-1) for g in gs])


def run_state(folder):
    return torch.load(folder / "resume.pt", weights_only=False)


def assert_same_run(a, b):
    pa, pb = params(a / "ckpt.pt"), params(b / "ckpt.pt")
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    ra, rb = run_state(a), run_state(b)
    for k in ("positions", "velocities"):
        assert torch.equal(ra["state"][k], rb["state"][k])
    assert torch.equal(ra["gen"], rb["gen"]) and torch.equal(ra["shuffle_gen"], rb["shuffle_gen"])


@pytest.fixture
def record_subsets(monkeypatch):
    """The ``frames`` argument of every energy/force gradient the training loop computes."""
    seen = []
    orig = stable_mod.energy_force_gradient

    def spy(*a, frames=None, **k):
        seen.append(None if frames is None else frames.clone())
        return orig(*a, frames=frames, **k)

    monkeypatch.setattr(stable_mod, "energy_force_gradient", spy)
    return seen


# ----------------------------------------------------------------------------- subsets
def test_subset_draws():
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert energy_force_subset(10, None, gen) is None and energy_force_subset(10, 10, gen) is None
    assert energy_force_subset(10, 25, gen) is None
    assert torch.equal(gen.get_state(), state)  # all frames: nothing drawn
    a, b = energy_force_subset(50, 7, gen), energy_force_subset(50, 7, gen)
    for s in (a, b):
        assert s.numel() == 7 and s.unique().numel() == 7 and int(s.min()) >= 0 and int(s.max()) < 50
        assert torch.equal(s, s.sort().values)
    assert not torch.equal(a, b)


def test_subset_gradient_is_unbiased(xtb_data_root, tiny_pretrained, tmp_path):
    """Mean over many random subsets ≈ the full gradient (error ~ 1/sqrt(draws) of one draw's),
    while a fixed subset (the first k frames) stays one draw's error away."""
    model_dir, _ = tiny_pretrained
    ctx = prepare(stable_cfg(xtb_data_root, model_dir, tmp_path), log=lambda *a: None)
    settings = EFLossSettings.from_checkpoint(ctx.ckpt)
    n, k, draws = len(ctx.train), 4, 100
    full, _ = energy_force_gradient(ctx.model, ctx.train, settings, 1, ctx.device, ctx.dtype)  # mean of frames
    full = flat(full)
    gen = torch.Generator().manual_seed(5)
    ests = torch.stack([flat(energy_force_gradient(ctx.model, ctx.train, settings, 2, ctx.device, ctx.dtype,
                                                   frames=energy_force_subset(n, k, gen))[0])
                        for _ in range(draws)])
    one_draw = float((ests - full).norm(dim=1).mean())
    fixed = flat(energy_force_gradient(ctx.model, ctx.train, settings, 2, ctx.device, ctx.dtype,
                                       frames=torch.arange(k))[0])
    assert float((ests.mean(0) - full).norm()) < 0.3 * one_draw
    assert float((fixed - full).norm()) > 0.3 * one_draw


def test_index_path_equals_slice_path(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, _ = tiny_pretrained
    ctx = prepare(stable_cfg(xtb_data_root, model_dir, tmp_path), log=lambda *a: None)
    settings = EFLossSettings.from_checkpoint(ctx.ckpt)
    n = len(ctx.train)
    ga, la = energy_force_gradient(ctx.model, ctx.train, settings, 20, ctx.device, ctx.dtype)
    gb, lb = energy_force_gradient(ctx.model, ctx.train, settings, 20, ctx.device, ctx.dtype, frames=torch.arange(n))
    assert la == lb and all(torch.equal(a, b) for a, b in zip(ga, gb))


# ----------------------------------------------------------------------------- runs
def test_default_runs_are_bit_identical(xtb_data_root, tiny_pretrained, tmp_path, monkeypatch, record_subsets):
    """Key absent, null and ≥ the number of training frames give the same run; and so does the
    same run with everything recomputed as before (estimator observables from the frames, test
    errors every time they are logged)."""
    model_dir, _ = tiny_pretrained
    n_train = len(prepare(stable_cfg(xtb_data_root, model_dir, tmp_path), log=lambda *a: None).train)
    assert stable_cfg(xtb_data_root, model_dir, tmp_path, ["energy_force_frames_per_epoch=null"]) == \
        stable_cfg(xtb_data_root, model_dir, tmp_path)
    evaluations = []
    orig_eval = stable_mod.evaluate

    def counted(*args, **kw):
        evaluations.append(1)
        return orig_eval(*args, **kw)

    monkeypatch.setattr(stable_mod, "evaluate", counted)
    a = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "a", LEARN), **QUIET)
    assert len(evaluations) == 2  # epoch 0 and the second learning epoch (the first has epoch 0's parameters)
    b = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "b", LEARN + [
        f"energy_force_frames_per_epoch={n_train}"]), **QUIET)
    assert record_subsets == [None] * 4  # two learning epochs per run, all frames
    assert_same_run(a, b)

    evaluations.clear()
    orig_test_errors, orig_learn = StableLoop.test_errors, StableLoop.learn

    def recompute_test_errors(self):
        self.ef_test = None
        return orig_test_errors(self)

    monkeypatch.setattr(StableLoop, "test_errors", recompute_test_errors)
    monkeypatch.setattr(StableLoop, "learn", lambda self, frames, unstable, u, per_frame=None:
                        orig_learn(self, frames, unstable, u, None))
    c = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "c", LEARN), **QUIET)
    assert_same_run(a, c)
    assert len(evaluations) == 3  # epoch 0 and both learning epochs


def test_reused_observables_equal_recomputed(xtb_data_root, tiny_pretrained, tmp_path):
    model_dir, _ = tiny_pretrained
    ctx = prepare(stable_cfg(xtb_data_root, model_dir, tmp_path), log=lambda *a: None)
    gen = torch.Generator().manual_seed(3)
    frames = torch.as_tensor(ctx.train.R[:24], dtype=ctx.dtype).reshape(4, 6, -1, 3).clone()
    frames = frames + 0.05 * torch.randn(frames.shape, generator=gen, dtype=frames.dtype)
    frames[1, 2] = float("nan")

    class Rec:
        pass

    rec = Rec()
    rec.frames, rec.velocities = frames, None
    _, per_frame = epoch_observables(ctx, rec)
    keep = per_frame.finite.clone()
    keep[:, 4] = False  # a replica not selected (only_train_on_unstable_replicas)
    samples = frames[:, torch.arange(6) != 4]
    samples = samples[torch.isfinite(samples).all(dim=(2, 3))]
    for name in ("rdf", "adf"):
        target = training_observable(name, ctx.oset, ctx.refs)
        O = per_frame.rows(target.samples, keep)
        assert O is not None and O.shape[0] == samples.shape[0] == 19
        args = (ctx.model, target, samples, ctx.system.atomic_numbers, None, ctx.kT, 5, True, ctx.dtype)
        ga, la = observable_gradient(*args, torch.Generator().manual_seed(1))
        gb, lb = observable_gradient(*args, torch.Generator().manual_seed(1), observables=O)
        assert la == lb and all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert per_frame.rows(training_observable("bond_length_dev", ctx.oset, ctx.refs).samples, keep) is None


def test_subset_runs_resume_bit_exactly(xtb_data_root, tiny_pretrained, tmp_path, record_subsets):
    """k < n: a fresh subset every learning epoch, and kill/resume continues bit-exactly (the
    subset generator is in resume.pt)."""
    model_dir, _ = tiny_pretrained
    extra = LEARN + ["energy_force_frames_per_epoch=7", "reset_probability=0.5"]
    a = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "a", extra + ["n_epochs=4"]), **QUIET)
    full_run = list(record_subsets)
    assert len(full_run) == 3 and all(s.numel() == 7 for s in full_run)
    assert not torch.equal(full_run[0], full_run[1]) and not torch.equal(full_run[1], full_run[2])
    record_subsets.clear()
    train(stable_cfg(xtb_data_root, model_dir, tmp_path / "b", extra + ["n_epochs=2"]), **QUIET)
    b = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "b", extra + ["n_epochs=4"]), **QUIET)
    assert len(record_subsets) == 3
    for x, y in zip(full_run, record_subsets):
        assert torch.equal(x, y)
    assert_same_run(a, b)
    assert torch.equal(run_state(a)["ef_gen"], run_state(b)["ef_gen"])
    # and the subset changes the update: not the full-data run
    c = train(stable_cfg(xtb_data_root, model_dir, tmp_path / "c", LEARN + ["reset_probability=0.5",
                                                                            "n_epochs=4"]), **QUIET)
    pa, pc = params(a / "ckpt.pt"), params(c / "ckpt.pt")
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)
