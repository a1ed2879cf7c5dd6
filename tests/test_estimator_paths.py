"""The training side's estimator paths (mdsim/training/learning.py: single process and sharded
over ranks) give the public estimator's gradient (boltzmann_estimator.py) on the same samples,
and boltzmann_scale_by_kT: false makes the gradient exactly kT times smaller."""
import copy
import threading

import pytest
import torch

from boltzmann_estimator import BoltzmannEstimator, squared_error_loss
from mdsim.models import build_model
from mdsim.training.distributed import Comm
from mdsim.training.learning import energy_fn_for, observable_gradient
from mdsim.training.targets import TrainingObservable
from mdsim.units import KB

Z = torch.tensor([6, 6, 8, 1, 1, 1])
KT = KB * 500.0


def pair_distances(x):  # (S, N, 3) -> (S, N(N-1)/2) observable
    i, j = torch.triu_indices(x.shape[1], x.shape[1], 1)
    return (x[:, i] - x[:, j]).norm(dim=-1)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    model = build_model("schnet", hidden_channels=8, num_filters=8, num_interactions=1, num_gaussians=8,
                        cutoff=4.0)
    base = torch.tensor([[0, 0, 0], [1.5, 0, 0], [2.2, 1.1, 0], [-0.6, 0.9, 0.2], [-0.5, -0.9, 0.3],
                         [1.9, -0.9, -0.3]], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    samples = (base + 0.1 * torch.randn(23, 6, 3, generator=g, dtype=torch.float64)).float()
    target_values = pair_distances(base[None])[0] + 0.05
    target = TrainingObservable("d", pair_distances, squared_error_loss(target_values))
    return model, samples, target


def public_gradient(model, samples, target, scale_by_kT=True, minibatch_size=5):
    params = [p for p in model.parameters() if p.requires_grad]
    est = BoltzmannEstimator(energy_fn_for(model, Z, None, torch.float32), minibatch_size, KT, scale_by_kT)
    grads, stats = est.gradient(params, samples, pair_distances(samples.double()), target.loss)
    return grads, stats["loss"]


def test_learning_path_equals_public_estimator(problem):
    model, samples, target = problem
    ref, ref_loss = public_gradient(model, samples, target)
    got, loss = observable_gradient(model, target, samples, Z, None, KT, 5, True)
    assert loss == ref_loss
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    assert max(float(g.abs().max()) for g in ref) > 0


class ThreadComm(Comm):
    """An in-process 'world' of ranks run as threads: all_reduce combines every rank's tensor."""

    def __init__(self, rank, world_size, board):
        super().__init__(rank=rank, world_size=world_size, distributed=True)
        self.board = board

    def all_reduce(self, t, op="sum"):
        slots, barrier = self.board
        slots[self.rank] = t.clone()
        barrier.wait()
        stack = torch.stack([slots[r] for r in range(self.world_size)])
        out = {"sum": stack.sum(0), "max": stack.max(0).values, "min": stack.min(0).values}[op]
        barrier.wait()
        t.copy_(out)
        return t


@pytest.mark.parametrize("split", [(23,), (10, 13), (0, 9, 14)])
def test_sharded_path_equals_public_estimator(problem, split):
    """Samples dealt out to ranks (one may hold none): every rank gets the all-sample gradient."""
    model, samples, target = problem
    ref, ref_loss = public_gradient(model, samples, target)
    W = len(split)
    board = ({}, threading.Barrier(W))
    results, errors = [None] * W, []
    bounds = torch.cumsum(torch.tensor((0,) + split), 0).tolist()

    def rank(r):
        try:
            m = copy.deepcopy(model)
            results[r] = observable_gradient(m, target, samples[bounds[r]:bounds[r + 1]], Z, None, KT, 5, True,
                                             comm=ThreadComm(r, W, board))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
            board[1].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(W)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    scale = max(float(g.abs().max()) for g in ref)  # float32 energies summed in other chunks
    for grads, loss in results:
        assert loss == pytest.approx(ref_loss, rel=1e-12)
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_scale_by_kT_false_gives_kT_times_smaller_gradient(problem):
    """docs/observables.md: without the 1/kT factor the gradient is kT (≈0.043 eV) times the
    scaled one, i.e. smaller, measured through the training path."""
    model, samples, target = problem
    scaled, _ = observable_gradient(model, target, samples, Z, None, KT, 5, True)
    unscaled, _ = observable_gradient(model, target, samples, Z, None, KT, 5, False)
    a, b = torch.cat([g.reshape(-1) for g in unscaled]), torch.cat([g.reshape(-1) for g in scaled])
    ratio = a.norm() / b.norm()
    assert float(ratio) == pytest.approx(KT, rel=1e-5) and KT < 1
    torch.testing.assert_close(a, KT * b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
