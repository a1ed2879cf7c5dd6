"""Boltzmann estimator (spec §5): gradients of losses on ensemble averages in one backward pass.

:mod:`.core` holds the one weighting/chunking core shared by the global, local (water) and
sharded (multi-rank) variants; :mod:`.reference` the original's per-sample-Jacobian form, for
tests and benchmarks.  The top-level ``boltzmann_estimator.py`` re-exports the public API.
"""
from .core import (BoltzmannEstimator, LocalBoltzmannEstimator, LossGrad, as_sample_matrix,  # noqa: F401
                   boltzmann_surrogate, estimator_weights, expand_neighborhoods, local_boltzmann_surrogate,
                   mean_squared_error, resolve_loss_grad, squared_error_loss, weighted_energy_gradient)
from .reference import reference_jacobian_gradient, reference_local_jacobian_gradient  # noqa: F401
