"""Multi-process training (torch.distributed, gloo, 2 CPU processes) against single-process runs.

One ``torchrun`` launch (session fixture ``two_process_runs``) performs every 2-process run:
DDP pretraining, a StABlE run that learns (forced instability), a StABlE run with Langevin
noise and random resets, and a sharded evaluation.  Each test repeats one of them in this
process without torch.distributed and compares.  Tolerances: the 2-process runs sum the
same terms in another order (per-rank partial sums, then all-reduce), so results agree to
float32 rounding amplified by a few optimizer/MD steps, not bit for bit.
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_SCHNET
from mdsim.config import PretrainConfig, StableConfig, load_config
from mdsim.md.integrators import langevin_baoab_step, make_integrator
from mdsim.md.state import MDState
from mdsim.training import distributed
from mdsim.training.distributed import Comm, GlobalNoiseIntegrator, ShardedGenerator, shard_range
from mdsim.units import FS

ROOT = Path(__file__).resolve().parents[1]
PRE_YML = str(ROOT / "configs/pretraining/xtb/schnet.yml")
TRAIN_YML = str(ROOT / "configs/stable_training/xtb/train.yml")
SIM_YML = str(ROOT / "configs/stable_training/xtb/simulate.yml")
QUIET = dict(log=lambda *a, **k: None)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)  # parameters after several steps (changes are ~1e-4..1e-2)
POS_TOL = dict(rtol=0, atol=1e-4)  # Å after 2-4 short MD epochs


# ----------------------------------------------------------------------------- configs
def pretrain_overrides(data_root, run_dir, epochs):
    # batch 15 over 2 ranks: shards of 8 and 7 frames, last batch of 3 frames (2 + 1)
    return [f"dataset.src={data_root}", "dataset.molecule=ethanol", f"run_dir={run_dir}", "device=cpu",
            f"optim.max_epochs={epochs}"] + TINY_SCHNET + ["optim.batch_size=15"]


def stable_overrides(data_root, model_dir, log_dir, extra=()):
    return [f"src={data_root}", "molecule=ethanol", f"model_dir={model_dir}", f"log_dir={log_dir}", "device=cpu",
            "n_replicas=4", "steps=40", "n_dump=10", "vacf_window=10", "minibatch_size=20", "progress=false",
            "lr=0.001"] + list(extra)


LEARN = ["bond_dev_tol=0.0001", "n_epochs=3"]  # every replica unstable: epoch 1 triggers, 2-3 learn
# energy/force gradient on 50 random frames: minibatches of 20, 20, 10 dealt to ranks 0, 1, 0
SUBSET = LEARN + ["energy_force_frames_per_epoch=50"]
NOISY = ["bond_dev_tol=100", "reset_probability=0.5", "integrator=Langevin", "ic_stddev=0.01"]
EVAL = ["train=false", "eval_model=pre", "integrator=Langevin", "n_replicas=5", "n_epochs=2", "bond_dev_tol=0.5"]
# most replicas unstable within 6 epochs, a few stable to the end: the batches shrink (park_unstable)
SHRINK = ["train=false", "eval_model=pre", "integrator=Langevin", "temperature=500", "n_replicas=8", "n_epochs=6",
          "bond_dev_tol=0.6", "max_frac_unstable_threshold=1.0"]

DRIVER = r'''
import json, os, sys
spec = json.load(open(sys.argv[1]))
sys.path.insert(0, spec["root"])
import torch
torch.set_num_threads(1)
from mdsim.config import PretrainConfig, StableConfig, load_config
from mdsim.training import distributed
from mdsim.training.evaluate import run_evaluation
from mdsim.training.pretrain import train as pretrain
from mdsim.training.stable import train as stable_train
comm = distributed.setup("cpu")
quiet = lambda *a, **k: None
try:
    for job in spec["jobs"]:
        if job["kind"] == "pretrain":
            pretrain(load_config(PretrainConfig, job["config"], job["overrides"]), log=quiet)
        elif job["kind"] == "stable":
            stable_train(load_config(StableConfig, job["config"], job["overrides"]), log=quiet)
        else:
            run_evaluation(load_config(StableConfig, job["config"], job["overrides"]), log=quiet)
    m = torch.nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.fill_(0.5)
        m.bias.fill_(0.25)
        if comm.rank == 1:
            m.weight[0, 0] += 1e-6
    try:
        comm.check_same(m)
        caught = False
    except RuntimeError:
        caught = True
    with open(os.path.join(spec["out"], "rank%d.json" % comm.rank), "w") as fh:
        json.dump({"rank": comm.rank, "world_size": comm.world_size, "caught": caught}, fh)
finally:
    distributed.cleanup()
'''


@pytest.fixture(scope="session")
def two_process_runs(xtb_data_root, tiny_pretrained, tmp_path_factory):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("this torch build has no torch.distributed")
    model_dir, _ = tiny_pretrained
    out = tmp_path_factory.mktemp("two_procs")
    jobs = [
        {"kind": "pretrain", "config": PRE_YML, "overrides": pretrain_overrides(xtb_data_root, out / "pre", 2)},
        {"kind": "stable", "config": TRAIN_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "learn", LEARN)},
        {"kind": "stable", "config": TRAIN_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "subset", SUBSET)},
        {"kind": "stable", "config": TRAIN_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "noisy", NOISY + ["n_epochs=2"])},
        {"kind": "evaluate", "config": SIM_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "eval", EVAL)},
        # the same evaluation stopped after one epoch, then resumed to two
        {"kind": "evaluate", "config": SIM_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "eval_resumed", EVAL + ["n_epochs=1"])},
        {"kind": "evaluate", "config": SIM_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "eval_resumed", EVAL)},
        # compiled steps, shrinking batches: stopped after 5 epochs, then resumed to 6
        {"kind": "evaluate", "config": SIM_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "shrink", SHRINK + ["md_backend=compile",
                                                                                            "n_epochs=5"])},
        {"kind": "evaluate", "config": SIM_YML,
         "overrides": stable_overrides(xtb_data_root, model_dir, out / "shrink", SHRINK + ["md_backend=compile"])},
    ]
    for j in jobs:
        j["overrides"] = [str(o) for o in j["overrides"]]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"root": str(ROOT), "out": str(out), "jobs": jobs}))
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in distributed._TORCHRUN_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(driver), str(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def stable_folder(log_dir):
    (folder,) = (Path(log_dir) / "stable_training_results").iterdir()
    return folder


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- unit tests
def test_shard_range_covers_contiguously():
    for n in (1, 4, 5, 7, 128):
        for w in (1, 2, 3, 8):
            parts = [shard_range(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(parts[i][1] == parts[i + 1][0] for i in range(w - 1))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    c = Comm()
    t = torch.arange(6.0)
    assert not c.distributed and c.is_main and c.shard(7) == (0, 7)
    assert c.all_reduce(t) is t and c.all_gather_cat(t) is t and c.sum_floats(1.5, 2) == [1.5, 2.0]


class _DrawsInside:
    """An integrator without pre-drawn noise support (draws inside the step)."""
    stochastic = True
    name = "Langevin"

    def step(self, state, force_fn, generator=None):
        return langevin_baoab_step(state, force_fn, 0.5 * FS, 300.0, 0.01, generator=generator)


def _harmonic(pos, cell=None):
    e = 0.5 * (pos ** 2).sum(dim=(1, 2))
    return e, -pos


@pytest.mark.parametrize("inner", ["integrator", "draws_inside"])
def test_sharded_noise_reproduces_full_batch(inner):
    """A rank stepping replicas [lo, hi) with the shared generator gets exactly the rows of the
    single-process step of all replicas, step after step."""
    integ = make_integrator("Langevin", 0.5, 300.0, {"gamma": 10.0}) if inner == "integrator" else _DrawsInside()
    g = torch.Generator().manual_seed(3)
    R, N = 5, 4
    masses = torch.tensor([1.0, 12.0, 16.0, 1.0], dtype=torch.float64)
    pos = torch.randn(R, N, 3, generator=g, dtype=torch.float64)
    e, f = _harmonic(pos)
    full0 = MDState(positions=pos, velocities=torch.zeros_like(pos), forces=f, energy=e, masses=masses)
    gen = torch.Generator().manual_seed(11)
    full = full0
    for _ in range(3):
        full = integ.step(full, _harmonic, gen)
    # shards [lo, hi), and chosen replicas ``rows`` (an evaluation that shrank its batch)
    for lo, hi, rows in ((0, 3, None), (3, 5, None), (0, 5, [0, 2, 4]), (3, 5, [4])):
        gen = torch.Generator().manual_seed(11)
        wrapped = GlobalNoiseIntegrator(integ, lo, hi, R, rows=rows)
        idx = list(range(lo, hi)) if rows is None else rows
        st = full0.select(idx)
        for _ in range(3):
            st = wrapped.step(st, _harmonic, gen)
        torch.testing.assert_close(st.positions, full.positions[idx], rtol=0, atol=0)
        torch.testing.assert_close(st.velocities, full.velocities[idx], rtol=0, atol=0)
    # the noise actually matters: an unwrapped shard stepped with the same seed differs
    gen = torch.Generator().manual_seed(11)
    st = integ.step(distributed.local_state(full0, 3, 5), _harmonic, gen)
    assert not torch.allclose(st.velocities, integ.step(full0, _harmonic, torch.Generator().manual_seed(11)).velocities[3:5])


@pytest.mark.parametrize("backend", ["compile", "cuda_graph"])
def test_sharded_noise_through_compiled_stepper(backend):
    """The compiled MD backends draw the block's noise through ``integrator.draw_noise`` when
    handed the shared generator as a ShardedGenerator: sharded, they reproduce the rows of the
    full-batch run (cuda_graph runs as compile without CUDA)."""
    compiled = pytest.importorskip("mdsim.md.compiled")
    integ = make_integrator("Langevin", 0.5, 300.0, {"gamma": 10.0})
    g = torch.Generator().manual_seed(3)
    R = 5
    pos = torch.randn(R, 4, 3, generator=g, dtype=torch.float64)
    e, f = _harmonic(pos)
    s0 = MDState(positions=pos, velocities=torch.zeros_like(pos), forces=f, energy=e,
                 masses=torch.tensor([1.0, 12.0, 16.0, 1.0], dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # cuda_graph → compile without CUDA
        full, _ = compiled.FastStepper(integ, _harmonic, s0, backend, compile_backend="aot_eager").run(
            s0, 3, torch.Generator().manual_seed(11))
        for lo, hi, rows in ((0, 3, None), (3, 5, None), (0, 5, [1, 3])):
            idx = list(range(lo, hi)) if rows is None else rows
            st = s0.select(idx)
            stepper = compiled.get_stepper(GlobalNoiseIntegrator(integ, lo, hi, R, rows=rows), _harmonic, st,
                                           backend, compile_backend="aot_eager")
            st, _ = stepper.run(st, 3, ShardedGenerator(torch.Generator().manual_seed(11)))
            torch.testing.assert_close(st.positions, full.positions[idx], rtol=0, atol=0)
            torch.testing.assert_close(st.velocities, full.velocities[idx], rtol=0, atol=0)
        # steppers are cached per integrator settings: other rows of the same count are another stepper
        st = s0.select([0, 2])
        a = compiled.get_stepper(GlobalNoiseIntegrator(integ, 0, 5, R, rows=[1, 3]), _harmonic, st, backend,
                                 compile_backend="aot_eager")
        b = compiled.get_stepper(GlobalNoiseIntegrator(integ, 0, 5, R, rows=[0, 2]), _harmonic, st, backend,
                                 compile_backend="aot_eager")
        assert a is not b and b.integrator.rows.tolist() == [0, 2]


# ------------------------------------------------------------------------ 2-process runs
def test_two_process_consistency_check(two_process_runs):
    for r in (0, 1):
        res = json.loads((two_process_runs / f"rank{r}.json").read_text())
        assert res["world_size"] == 2 and res["caught"], res


def test_ddp_pretraining_matches_single_process(two_process_runs, xtb_data_root, tmp_path, one_thread):
    from mdsim.training.pretrain import run_folder, train
    single = train(load_config(PretrainConfig, PRE_YML, pretrain_overrides(xtb_data_root, tmp_path / "a", 2)),
                   **QUIET)
    ddp_cfg = load_config(PretrainConfig, PRE_YML, pretrain_overrides(xtb_data_root, two_process_runs / "pre", 2))
    ca = torch.load(single.run_dir / "checkpoints/checkpoint.pt", weights_only=False)
    cb = torch.load(run_folder(ddp_cfg) / "checkpoints/checkpoint.pt", weights_only=False)
    assert cb["trainer_state"]["step"] == ca["trainer_state"]["step"] == 2 * 16  # 228 frames / 15
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, **PARAM_TOL)
    for ha, hb in zip(ca["trainer_state"]["history"], cb["trainer_state"]["history"]):
        for key in ("train_loss", "val_forces_mae", "val_energy_mae"):
            assert hb[key] == pytest.approx(ha[key], rel=1e-5), key
    # the runs did train (the comparison is not between two untouched models)
    assert ca["trainer_state"]["history"][1]["train_loss"] < ca["trainer_state"]["history"][0]["train_loss"]
    # only rank 0 wrote: one tensorboard event file
    assert len(list((run_folder(ddp_cfg) / "logs").glob("events.out.tfevents.*"))) <= 1
    # the DDP checkpoint resumes in one process like the single-process checkpoint
    train(load_config(PretrainConfig, PRE_YML, pretrain_overrides(xtb_data_root, tmp_path / "a", 3)), **QUIET)
    train(load_config(PretrainConfig, PRE_YML, pretrain_overrides(xtb_data_root, two_process_runs / "pre", 3)),
          **QUIET)
    ca = torch.load(single.run_dir / "checkpoints/checkpoint.pt", weights_only=False)
    cb = torch.load(run_folder(ddp_cfg) / "checkpoints/checkpoint.pt", weights_only=False)
    assert cb["epoch"] == 3
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, **PARAM_TOL)


@pytest.mark.parametrize("run,extra", [("learn", LEARN), ("subset", SUBSET)])
def test_sharded_stable_learning_matches_single_process(two_process_runs, xtb_data_root, tiny_pretrained,
                                                         tmp_path, one_thread, run, extra):
    """Also with energy_force_frames_per_epoch: every rank uses the same random subset."""
    from mdsim.training.stable import train
    model_dir, pre = tiny_pretrained
    a = train(load_config(StableConfig, TRAIN_YML, stable_overrides(xtb_data_root, model_dir, tmp_path, extra)),
              **QUIET)
    b = stable_folder(two_process_runs / run)
    assert {p.name for p in a.glob("*.pt")} == {p.name for p in b.glob("*.pt")}
    pa = torch.load(a / "ckpt.pt", weights_only=False)["state_dict"]
    pb = torch.load(b / "ckpt.pt", weights_only=False)["state_dict"]
    p0 = torch.load(pre, weights_only=False)["state_dict"]
    change = max(float((pa[k] - p0[k]).abs().max()) for k in pa)
    assert change > 1e-5  # it learned
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], **PARAM_TOL)
    rb = torch.load(b / "resume.pt", weights_only=False)
    ra = torch.load(a / "resume.pt", weights_only=False)
    assert rb["world_size"] == 2 and rb["state"]["positions"].shape[0] == 4  # the global MD state
    assert rb["phase"] == ra["phase"]
    assert torch.equal(rb["gen"], ra["gen"]) and torch.equal(rb["shuffle_gen"], ra["shuffle_gen"])
    assert torch.equal(rb["ef_gen"], ra["ef_gen"])
    for k in ra["optimizer"]["state"]:
        for name, t in ra["optimizer"]["state"][k].items():
            if torch.is_tensor(t) and t.is_floating_point():
                torch.testing.assert_close(rb["optimizer"]["state"][k][name], t, **PARAM_TOL)
    assert len(list((b / "logs").glob("events.out.tfevents.*"))) == 1


def test_sharded_noisy_run_and_resume_with_other_world_size(two_process_runs, xtb_data_root, tiny_pretrained,
                                                            tmp_path, one_thread):
    """Langevin noise, restarts and random jumps to saved starts: the 2-process MD states equal
    the single-process ones; the 2-process resume.pt continues in one process like the
    single-process run."""
    from mdsim.training.stable import train
    model_dir, _ = tiny_pretrained
    cfg = lambda log_dir, n: load_config(StableConfig, TRAIN_YML, stable_overrides(  # noqa: E731
        xtb_data_root, model_dir, log_dir, NOISY + [f"n_epochs={n}"]))
    a = train(cfg(tmp_path, 2), **QUIET)
    b = stable_folder(two_process_runs / "noisy")
    ra = torch.load(a / "resume.pt", weights_only=False)
    rb = torch.load(b / "resume.pt", weights_only=False)
    assert len(rb["saved_starts"]) == len(ra["saved_starts"]) == 2
    for k in ("positions", "velocities"):
        torch.testing.assert_close(rb["state"][k], ra["state"][k], **POS_TOL)
        torch.testing.assert_close(rb["saved_starts"][1][k], ra["saved_starts"][1][k], **POS_TOL)
    assert torch.equal(rb["gen"], ra["gen"])
    # both continue in one process to epoch 4 (random jumps to saved starts happen from epoch 3)
    a = train(cfg(tmp_path, 4), **QUIET)
    b = train(cfg(two_process_runs / "noisy", 4), **QUIET)
    ra = torch.load(a / "resume.pt", weights_only=False)
    rb = torch.load(b / "resume.pt", weights_only=False)
    assert ra["phase"]["epoch"] == rb["phase"]["epoch"] == 4
    torch.testing.assert_close(rb["state"]["positions"], ra["state"]["positions"], **POS_TOL)
    assert torch.isfinite(ra["state"]["positions"]).all()


def test_sharded_evaluation_matches_single_process(two_process_runs, xtb_data_root, tiny_pretrained,
                                                   tmp_path, one_thread):
    from mdsim.training.evaluate import run_evaluation
    model_dir, _ = tiny_pretrained
    a = run_evaluation(load_config(StableConfig, SIM_YML, stable_overrides(xtb_data_root, model_dir, tmp_path, EVAL)),
                       **QUIET)
    b = stable_folder(two_process_runs / "eval") / "inference" / "pre"
    ma = json.loads((a / "final_metrics.json").read_text())
    mb = json.loads((b / "final_metrics.json").read_text())
    assert mb["n_replicas"] == 5 and mb["epochs"] == ma["epochs"]
    for k, v in ma.items():
        if isinstance(v, float):
            assert mb[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    ta, tb = np.load(a / "full_traj.npy"), np.load(b / "full_traj.npy")
    assert ta.shape == tb.shape and ta.shape[0] == 5
    np.testing.assert_allclose(tb, ta, atol=1e-4)
    np.testing.assert_array_equal(np.load(b / "replicas_stable_time.npy"), np.load(a / "replicas_stable_time.npy"))
    # resumed under torchrun after one epoch: the same as the uninterrupted two-process run
    c = stable_folder(two_process_runs / "eval_resumed") / "inference" / "pre"
    mc = json.loads((c / "final_metrics.json").read_text())
    assert mc == mb
    for f in ("full_traj.npy", "replicas_stable_time.npy", "final_rdfs.npy"):
        np.testing.assert_array_equal(np.load(c / f), np.load(b / f), err_msg=f)


def test_sharded_evaluation_shrinks_its_batches(two_process_runs, xtb_data_root, tiny_pretrained, tmp_path,
                                               one_thread):
    """Two processes (compiled steps) that each stop simulating their unstable replicas, one of
    them resumed after the batches shrank, give the single process's stability times, and the
    stable replicas' trajectories to float rounding."""
    from mdsim.training.evaluate import run_evaluation
    model_dir, _ = tiny_pretrained
    a = run_evaluation(load_config(StableConfig, SIM_YML, stable_overrides(xtb_data_root, model_dir, tmp_path, SHRINK)),
                       **QUIET)
    b = stable_folder(two_process_runs / "shrink") / "inference" / "pre"
    stable = np.load(a / "replicas_stable.npy")
    assert stable.any() and not stable.all()
    for f in ("replicas_stable_time.npy", "replicas_stable.npy"):
        np.testing.assert_array_equal(np.load(b / f), np.load(a / f), err_msg=f)
    ta, tb = np.load(a / "full_traj.npy"), np.load(b / "full_traj.npy")
    # a different batch composition changes float rounding (~1e-7 Å), which the chaotic MD
    # amplifies ~2x per frame; a replica given another's state or noise jumps instead
    d = np.abs(ta[stable] - tb[stable]).max(axis=(0, 2, 3))
    assert d[0] < 1e-5 and d.max() < 1e-2, d
    assert (d[1:] <= 10 * d[:-1] + 1e-5).all(), d
    # both ranks shrank: some of each rank's flagged replicas were not simulated in the last epoch
    gone = np.isnan(tb[:, -1]).all(axis=(1, 2))
    assert gone[:4].any() and gone[4:].any() and not gone[stable].any(), gone
    # a pair distance near a histogram bin edge may land in the neighbouring bin: compare the errors
    ma, mb = (json.loads((d / "final_metrics.json").read_text()) for d in (a, b))
    for k in ("Mean RDF MAE", "Mean ADF MAE", "Mean VACF MAE"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-2), k
