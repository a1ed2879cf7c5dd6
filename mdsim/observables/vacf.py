"""Velocity autocorrelation function (spec §4).

Time is the FIRST axis: velocities (T, ..., N, 3), e.g. (T, R, N, 3) for R replicas."""
from __future__ import annotations

from typing import Optional

import torch

VACF_EPS = 1e-6


def vacf(velocities: torch.Tensor, window: Optional[int] = None) -> torch.Tensor:
    """Normalised VACF C(τ), τ = 0 … W−1, of every system in the batch.

    velocities (T, ..., N, 3) → (..., W), W = ``window`` (default T, must be ≤ T).
    C(0) = 1 and for τ ≥ 1 C(τ) = ⟨v(t)·v(t+τ)⟩ / (⟨v²⟩ + 1e-6), where ⟨·⟩ averages over all
    origins t = 0 … T−1−τ, atoms and Cartesian components and ⟨v²⟩ averages v² over all T frames,
    atoms and components."""
    v = velocities
    T = v.shape[0]
    W = T if window is None else int(window)
    if W > T or W < 1:
        raise ValueError(f"vacf window {W} must be in [1, {T}]")
    norm = (v * v).mean(dim=(0, -2, -1)) + VACF_EPS
    out = [torch.ones_like(norm)]
    for tau in range(1, W):
        out.append((v[tau:] * v[:-tau]).mean(dim=(0, -2, -1)) / norm)
    return torch.stack(out, -1)


def windowed_vacf(velocities: torch.Tensor, window: int, stride: int = 1) -> torch.Tensor:
    """Average VACF over non-overlapping windows of ``window`` frames, keeping every ``stride``-th
    window (the original's n_dump_vacf), as used for monitoring during training.

    velocities (T, ..., N, 3) with T ≥ window → (..., window)."""
    T = velocities.shape[0]
    n = T // window
    if n == 0:
        raise ValueError(f"need at least {window} frames, got {T}")
    starts = list(range(0, n * window, window))[::max(1, int(stride))]
    return torch.stack([vacf(velocities[s:s + window], window) for s in starts], 0).mean(0)


def velocities_from_positions(frames: torch.Tensor, dt: float = 1.0) -> torch.Tensor:
    """Finite-difference velocities (x[t+1] − x[t]) / dt of consecutive frames (T, ..., N, 3) →
    (T−1, ..., N, 3) (positions must be unwrapped)."""
    return (frames[1:] - frames[:-1]) / dt


def vacf_from_positions(frames: torch.Tensor, window: int, dt: float = 1.0) -> torch.Tensor:
    """Reference VACF from positions: :func:`vacf` of the finite-difference velocities.

    The frame spacing ``dt`` only matters through the 1e-6 regulariser."""
    return vacf(velocities_from_positions(frames, dt), window)


def vacf_mae(c: torch.Tensor, c_ref: torch.Tensor) -> torch.Tensor:
    """mean_τ |C − C*| over the last dimension."""
    return (c - torch.as_tensor(c_ref, dtype=c.dtype, device=c.device)).abs().mean(-1)
