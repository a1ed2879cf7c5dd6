"""Boltzmann estimator: exact cases, finite differences and agreement with the per-sample
Jacobian (original) form."""
import math

import numpy as np
import pytest
import torch

from boltzmann_estimator import (BoltzmannEstimator, LocalBoltzmannEstimator, boltzmann_surrogate,
                                 estimator_weights, local_boltzmann_surrogate, reference_jacobian_gradient,
                                 reference_local_jacobian_gradient, squared_error_loss)
from mdsim import observables as ob


def _per_sample_contrib(G, s, kT):
    """Per-sample terms c_i with mean = −(1/kT)Cov(s, G) estimate; returns (estimate, std error)."""
    c = -(s - s.mean())[:, None] * (G - G.mean(0)) / kT
    n = c.shape[0]
    return c.mean(0), c.std(0) / math.sqrt(n)


def test_harmonic_oscillator_dx2_dk():
    torch.manual_seed(0)
    kT, kval, n = 0.7, 2.5, 20000
    k = torch.tensor(kval, dtype=torch.float64, requires_grad=True)
    x = torch.randn(n, dtype=torch.float64) * math.sqrt(kT / kval)
    U = 0.5 * k * x ** 2
    obs = (x ** 2)[:, None]
    (g,) = torch.autograd.grad(boltzmann_surrogate(U, obs, torch.ones(1), kT), k, retain_graph=True)
    exact = -kT / kval ** 2
    est, se = _per_sample_contrib((0.5 * x ** 2)[:, None], x ** 2, kT)
    assert abs(float(g) - float(est[0])) < 1e-12 * abs(exact)  # surrogate = centred covariance
    assert abs(float(g) - exact) < 3 * float(se[0]), (float(g), exact, float(se[0]))
    assert float(se[0]) < 0.05 * abs(exact)
    # original scaling: 1/kT dropped
    (g0,) = torch.autograd.grad(boltzmann_surrogate(U, obs, torch.ones(1), kT, scale_by_kT=False), k)
    assert abs(float(g0) * 1 / kT - float(g)) < 1e-12


def test_2d_anisotropic_oscillator_mixed_observables():
    torch.manual_seed(1)
    kT, n = 0.5, 40000
    theta0 = torch.tensor([2.0, 0.7, 0.4], dtype=torch.float64)  # A = [[a, c], [c, b]]

    def A_of(t):
        return torch.stack([torch.stack([t[0], t[2]]), torch.stack([t[2], t[1]])])

    def loss_of_means(m):  # L = (⟨(x+y)²⟩ − 1)² + 0.5 ⟨x y⟩
        return (m[0] - 1.0) ** 2 + 0.5 * m[1]

    # analytic: Cov = kT A⁻¹
    t = theta0.clone().requires_grad_(True)
    C = kT * torch.linalg.inv(A_of(t))
    L_exact = loss_of_means(torch.stack([C.sum(), C[0, 1]]))
    (exact,) = torch.autograd.grad(L_exact, t)

    C0 = kT * torch.linalg.inv(A_of(theta0))
    xy = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), C0).sample((n,))
    theta = theta0.clone().requires_grad_(True)
    U = 0.5 * (theta[0] * xy[:, 0] ** 2 + theta[1] * xy[:, 1] ** 2) + theta[2] * xy[:, 0] * xy[:, 1]
    obs = torch.stack([(xy[:, 0] + xy[:, 1]) ** 2, xy[:, 0] * xy[:, 1]], 1)
    m = obs.mean(0).clone().requires_grad_(True)
    (lg,) = torch.autograd.grad(loss_of_means(m), m)
    (g,) = torch.autograd.grad(boltzmann_surrogate(U, obs, lg, kT), theta)
    G = torch.stack([0.5 * xy[:, 0] ** 2, 0.5 * xy[:, 1] ** 2, xy[:, 0] * xy[:, 1]], 1)
    _, se = _per_sample_contrib(G, obs @ lg, kT)
    assert torch.all((g - exact).abs() < 3 * se), (g, exact, se)
    # the estimator class (chunked energies, callable loss) gives the same
    def energy_fn(p):  # p (M, 2)
        return 0.5 * (theta[0] * p[:, 0] ** 2 + theta[1] * p[:, 1] ** 2) + theta[2] * p[:, 0] * p[:, 1]
    (g2,), stats = BoltzmannEstimator(energy_fn, 4096, kT).gradient([theta], xy, obs, loss_of_means)
    torch.testing.assert_close(g2, g, rtol=1e-10, atol=0)
    torch.testing.assert_close(stats["loss_grad"], lg)


def test_double_well_finite_difference():
    kT, a0, b0 = 0.6, 1.0, 0.3
    xs = np.linspace(-3.5, 3.5, 400001)

    def mean_obs(a, b):
        u = a * (xs ** 2 - 1) ** 2 + b * xs
        p = np.exp(-(u - u.min()) / kT)
        z = np.trapezoid(p, xs)
        return np.array([np.trapezoid(xs * p, xs) / z, np.trapezoid(xs ** 2 * p, xs) / z]), p / z

    h = 1e-5
    fd = np.stack([(mean_obs(a0 + h, b0)[0] - mean_obs(a0 - h, b0)[0]) / (2 * h),
                   (mean_obs(a0, b0 + h)[0] - mean_obs(a0, b0 - h)[0]) / (2 * h)], 1)  # (K, P)
    # exact covariance formula by quadrature agrees with FD tightly
    _, p = mean_obs(a0, b0)
    O = np.stack([xs, xs ** 2])
    G = np.stack([(xs ** 2 - 1) ** 2, xs])
    E = lambda f: np.trapezoid(f * p, xs)
    cov = np.array([[E(O[k] * G[j]) - E(O[k]) * E(G[j]) for j in range(2)] for k in range(2)])
    np.testing.assert_allclose(-cov / kT, fd, rtol=1e-5, atol=1e-7)

    # exact samples by inverse CDF, estimator for L = ⟨x⟩ + 2⟨x²⟩ (loss_grad (1, 2))
    rng = np.random.default_rng(0)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(xs))])
    cdf /= cdf[-1]
    n = 200000
    x = torch.tensor(np.interp(rng.random(n), cdf, xs))
    theta = torch.tensor([a0, b0], dtype=torch.float64, requires_grad=True)
    U = theta[0] * (x ** 2 - 1) ** 2 + theta[1] * x
    obs = torch.stack([x, x ** 2], 1)
    lg = torch.tensor([1.0, 2.0], dtype=torch.float64)
    (g,) = torch.autograd.grad(boltzmann_surrogate(U, obs, lg, kT), theta)
    target = lg.numpy() @ fd
    Gs = torch.stack([(x ** 2 - 1) ** 2, x], 1)
    _, se = _per_sample_contrib(Gs, obs @ lg, kT)
    assert np.all(np.abs(g.numpy() - target) < 3 * se.numpy()), (g, target, se)


# ------------------------------------------------------------------- neural energy models

class PairModel(torch.nn.Module):
    """E = Σ_{i≠j} ½ φ(d_ij) with a small MLP φ; also per-atom energies."""

    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def atom_energies(self, x):  # x (M, N, 3) → (M, N)
        n = x.shape[-2]
        i, j = ob.ordered_pairs(n)
        d = (x[:, j] - x[:, i]).norm(dim=-1)
        phi = self.mlp(d[..., None])[..., 0]
        return 0.5 * torch.zeros(x.shape[0], n, dtype=x.dtype).index_add(1, i, phi)

    def forward(self, x):
        return self.atom_energies(x).sum(-1)


def _setup(n_samples=60, n_atoms=5, seed=0):
    torch.manual_seed(seed)
    model = PairModel().double()
    x = torch.randn(n_samples, n_atoms, 3, dtype=torch.float64)
    obs = ob.smeared_rdf(x, 4.0, 0.5, 0.3)
    return model, x, obs


def _rel(a, b):
    num = math.sqrt(sum(float(((u - v) ** 2).sum()) for u, v in zip(a, b)))
    den = math.sqrt(sum(float((v ** 2).sum()) for v in b))
    return num / den


def test_surrogate_equals_jacobian_covariance_float64():
    model, x, obs = _setup()
    target = obs.mean(0) * 0.9
    loss = squared_error_loss(target)
    lg = 2 * (obs.mean(0) - target)
    params = list(model.parameters())
    for scale in (False, True):
        ours = torch.autograd.grad(boltzmann_surrogate(model(x), obs, lg, 0.3, scale_by_kT=scale), params)
        ref = reference_jacobian_gradient(model, model, x, obs, loss, kT=0.3, scale_by_kT=scale)
        assert _rel(ours, ref) < 1e-10
        assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())  # params restored
        # explicit covariance with per-sample autograd loops (independent of torch.func)
        G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(x[i:i + 1]).sum(), params)])
                         for i in range(x.shape[0])])
        cov = (G - G.mean(0)).T @ (obs - obs.mean(0)) / x.shape[0]  # (P, K)
        explicit = -(cov @ lg) / (0.3 if scale else 1.0)
        flat = torch.cat([g.reshape(-1) for g in ours])
        assert float((flat - explicit).norm() / explicit.norm()) < 1e-10


def test_minibatched_estimator_equals_one_big_batch():
    model, x, obs = _setup(n_samples=53)
    params = list(model.parameters())
    loss = squared_error_loss(obs.mean(0) * 1.1)
    big, st_big = BoltzmannEstimator(model, 1000, 0.25).gradient(params, x, obs, loss)
    small, st_small = BoltzmannEstimator(model, 7, 0.25).gradient(params, x, obs, loss)
    assert _rel(small, big) < 1e-12
    assert st_big["loss"] == pytest.approx(float(((obs.mean(0) * -0.1) ** 2).sum()))
    torch.testing.assert_close(st_small["mean_observable"], obs.mean(0))
    direct = torch.autograd.grad(boltzmann_surrogate(model(x), obs, st_big["loss_grad"], 0.25), params)
    assert _rel(big, direct) < 1e-12
    # accumulate into .grad
    for p in params:
        p.grad = None
    acc, _ = BoltzmannEstimator(model, 10, 0.25).gradient(params, x, obs, loss, accumulate_into_grad=True)
    assert _rel([p.grad for p in params], big) < 1e-12 and _rel(acc, big) < 1e-12


def test_original_minibatch_form_is_mean_of_block_estimates():
    model, x, obs = _setup(n_samples=40)
    params = list(model.parameters())
    loss = squared_error_loss(obs.mean(0) * 0.8)
    ref = reference_jacobian_gradient(model, model, x, obs, loss, minibatch_size=10, chunk_size=4)
    refJ = reference_jacobian_gradient(model, model, x, obs, loss, minibatch_size=10, materialize_J=True)
    assert _rel(refJ, ref) < 1e-12
    blocks = [BoltzmannEstimator(model, 10, 1.0, scale_by_kT=False).gradient(params, x[s:s + 10], obs[s:s + 10], loss)[0]
              for s in range(0, 40, 10)]
    mean_blocks = [sum(bs) / 4 for bs in zip(*blocks)]
    assert _rel(ref, mean_blocks) < 1e-10


def test_local_estimator_equals_jacobian_form():
    torch.manual_seed(3)
    model = PairModel().double()
    nm, F, L_box = 6, 5, 4.0
    base = torch.tensor([[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]], dtype=torch.float64)
    x = (torch.rand(F, nm, 1, 3, dtype=torch.float64) * L_box + base + 0.05 * torch.randn(F, nm, 3, 3,
                                                                                        dtype=torch.float64))
    x = x.reshape(F, 3 * nm, 3)
    z = torch.tensor([8, 1, 1] * nm)
    mol = torch.arange(nm).repeat_interleave(3)
    nb, _ = ob.local_neighborhoods(x, mol, z, n_local_neighborhoods=4, n_closest_molecules=2,
                                   generator=torch.Generator().manual_seed(0))
    obs = ob.local_bond_lengths(x, nb)  # (F, L, 2)
    target = torch.tensor([0.96, 0.96], dtype=torch.float64)
    loss = squared_error_loss(target)
    lg = 2 * (obs.reshape(-1, 2).mean(0) - target)
    params = list(model.parameters())
    for scale in (False, True):
        ours = torch.autograd.grad(local_boltzmann_surrogate(model.atom_energies(x), nb, obs, lg, 0.2, scale), params)
        ref = reference_local_jacobian_gradient(model.atom_energies, model, x, nb, obs, loss, kT=0.2,
                                                scale_by_kT=scale)
        assert _rel(ours, ref) < 1e-10
        est, stats = LocalBoltzmannEstimator(model.atom_energies, 2, 0.2, scale).gradient(params, x, nb, obs, loss)
        assert _rel(est, ref) < 1e-10 and stats["n_samples"] == F * 4


def test_weights_properties():
    obs = torch.randn(100, 3, dtype=torch.float64)
    w = estimator_weights(obs, torch.tensor([1.0, -2.0, 0.5]), kT=0.1)
    assert abs(float(w.sum())) < 1e-12  # centring: a constant energy shift has zero gradient
    torch.testing.assert_close(w * 0.1, estimator_weights(obs, torch.tensor([1.0, -2.0, 0.5]), 0.1, False))


class TiedModel(torch.nn.Module):
    """Two attribute paths to the same submodule (like PyG SchNet's mlp / conv.nn)."""

    def __init__(self):
        super().__init__()
        self.inner = PairModel()
        self.alias = self.inner

    def forward(self, x):
        return self.alias(x) + 0.1 * self.inner(x) ** 2


def test_jacobian_form_keeps_shared_parameters_and_agrees():
    torch.manual_seed(4)
    model = TiedModel().double()
    x = torch.randn(20, 4, 3, dtype=torch.float64)
    obs = ob.smeared_rdf(x, 4.0, 0.5, 0.3)
    lg = torch.randn(obs.shape[1], dtype=torch.float64)
    params = list(model.parameters())
    ids = [id(p) for p in params]
    ref = reference_jacobian_gradient(model, model, x, obs, lg)
    assert [id(p) for p in model.parameters()] == ids and model.alias.mlp[0].weight is params[0]
    ours = torch.autograd.grad(boltzmann_surrogate(model(x), obs, lg, 1.0, scale_by_kT=False), params)
    assert _rel(ours, ref) < 1e-10
