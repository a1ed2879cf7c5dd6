"""Mean-squared displacement and diffusivity of selected atoms (water: O atoms), spec §4."""
from __future__ import annotations

from typing import Optional

import torch

#: 1 Å²/ps expressed in units of 1e-9 m²/s (the unit the paper reports).
ANG2_PER_PS_TO_1E9_M2_PER_S = 10.0


def msd(frames: torch.Tensor, max_lag: Optional[int] = None, atom_indices=None,
        remove_centroid: bool = True) -> torch.Tensor:
    """MSD(τ), τ = 0 … max_lag, of unwrapped frames (T, ..., N, 3) (time first) → (..., max_lag+1).

    Only ``atom_indices`` (default all atoms) are used; with ``remove_centroid`` their per-frame
    centroid is subtracted first (removes centre-of-mass drift).  Averages over all origins
    t = 0 … T−1−τ and over the selected atoms."""
    x = frames
    if atom_indices is not None:
        idx = torch.as_tensor(atom_indices, dtype=torch.long, device=x.device).reshape(-1)
        x = x[..., idx, :]
    if remove_centroid:
        x = x - x.mean(-2, keepdim=True)
    T = x.shape[0]
    L = T - 1 if max_lag is None else int(max_lag)
    if L >= T:
        raise ValueError(f"max_lag {L} must be < number of frames {T}")
    out = [x.new_zeros(x.shape[1:-2])]
    for tau in range(1, L + 1):
        d = x[tau:] - x[:-tau]
        out.append((d * d).sum(-1).mean(dim=(0, -1)))
    return torch.stack(out, -1)


def diffusivity(frames: torch.Tensor, frame_spacing: float, max_lag: Optional[int] = None,
                atom_indices=None, remove_centroid: bool = True) -> torch.Tensor:
    """D(τ) = MSD(τ)/(6τ) for τ = 1 … max_lag frames, with τ in units of ``frame_spacing``.

    With frames 1 ps apart (frame_spacing=1.0) the result is in Å²/ps; multiply by
    :data:`ANG2_PER_PS_TO_1E9_M2_PER_S` for 1e-9 m²/s.  Returns (..., max_lag)."""
    m = msd(frames, max_lag, atom_indices, remove_centroid)[..., 1:]
    lags = torch.arange(1, m.shape[-1] + 1, dtype=m.dtype, device=m.device) * frame_spacing
    return m / (6.0 * lags)
