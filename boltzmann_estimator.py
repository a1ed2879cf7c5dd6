"""Boltzmann estimator: gradients of losses on ensemble averages (spec §5, with one backward pass).

For samples x_i ~ exp(−U_θ(x)/kT) and a loss L(⟨O⟩) of ensemble averages,

    ∂L/∂θ = −(1/kT) Σ_k (∂L/∂⟨O_k⟩) Cov(O_k, ∂U/∂θ),

computed as the gradient of the surrogate S(θ) = Σ_i w_i U_θ(x_i), w_i = −(s_i − s̄)/(N kT),
s_i = Σ_k (∂L/∂⟨O_k⟩) O_k(x_i) (w detached), chunk by chunk with exact full-batch centring.
:func:`reference_jacobian_gradient` reproduces the original's per-sample-Jacobian form (1/kT
dropped, minibatch means).  ``scale_by_kT=False`` (config ``boltzmann_scale_by_kT``) drops 1/kT.

This script is the public entry point; the implementation lives in :mod:`mdsim.estimator`
(one core shared by the global, local (water) and sharded variants).
"""
from __future__ import annotations

from mdsim.estimator import (BoltzmannEstimator, LocalBoltzmannEstimator, LossGrad, boltzmann_surrogate,
                             estimator_weights, local_boltzmann_surrogate, reference_jacobian_gradient,
                             reference_local_jacobian_gradient, resolve_loss_grad, squared_error_loss)

__all__ = [
    "estimator_weights", "boltzmann_surrogate", "local_boltzmann_surrogate", "resolve_loss_grad",
    "squared_error_loss", "BoltzmannEstimator", "LocalBoltzmannEstimator",
    "reference_jacobian_gradient", "reference_local_jacobian_gradient", "LossGrad",
]
