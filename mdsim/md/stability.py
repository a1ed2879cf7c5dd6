"""Stability criteria and per-replica stability bookkeeping.

The criterion is data on the :class:`~mdsim.md.system.System` (``stability_criterion``,
``stability_tolerance``, bonds, reference bond lengths, molecule membership, cell); code never
looks at a system's name.

* ``bond_length_deviation``: value = max over bonds of |d_b − d̄_b| (Å); unstable if
  value ≥ tolerance.
* ``imd``: value = min over pairs of atoms in different molecules of the minimum-image distance
  (Å); unstable if value < tolerance.
* ``rdf``: needs a caller-supplied ``value_fn(positions, cell) -> value`` (e.g. the RDF MAE
  against a reference, from ``mdsim.observables``); unstable if value > tolerance.

Non-finite positions (or energies, when given) are always unstable.  All functions are
vectorised over any leading dimensions (replicas, frames) and stay on the input's device.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from mdsim.md.system import System, bond_lengths

#: criteria for which a larger value is worse (others: smaller is worse).
HIGHER_IS_WORSE = {"bond_length_deviation": True, "imd": False, "rdf": True}


def max_bond_deviation(positions: Tensor, system: System, cell: Optional[Tensor] = None) -> Tensor:
    """max_b |d_b − d̄_b| (Å) for positions (..., N, 3); 0 if the system has no bonds."""
    bonds = system.bonds.to(positions.device)
    if bonds.numel() == 0:
        return torch.zeros(positions.shape[:-2], dtype=positions.dtype, device=positions.device)
    if cell is not None:
        vec = positions[..., bonds[:, 1], :] - positions[..., bonds[:, 0], :]
        vec = _min_image(vec, cell)
        d = vec.norm(dim=-1)
    else:
        d = bond_lengths(positions, bonds)
    ref = system.ref_bond_lengths.to(device=positions.device, dtype=positions.dtype)
    dev = (d - ref).abs()
    # NaN-propagating max (torch.amax propagates NaN)
    return dev.amax(dim=-1)


def _min_image(vec: Tensor, cell: Tensor) -> Tensor:
    """Minimum-image vectors (..., K, 3); cell (3,3) or (..., 3, 3) matching vec's leading dims."""
    cell = cell.to(vec)
    inv = torch.linalg.inv(cell)
    frac = vec @ inv
    frac = frac - torch.round(frac)
    return frac @ cell


def min_intermolecular_distance(positions: Tensor, system: System, cell: Optional[Tensor] = None,
                                chunk: int = 64) -> Tensor:
    """Minimum minimum-image distance (Å) between atoms of different molecules, for positions
    (..., N, 3); +inf if there is a single molecule.  ``cell`` (3,3) or (..., 3, 3)."""
    if system.molecule_index is None:
        raise ValueError("stability criterion 'imd' needs System.molecule_index")
    lead = positions.shape[:-2]
    N = positions.shape[-2]
    mol = system.molecule_index.to(positions.device)
    inter = mol[:, None] != mol[None, :]
    if not bool(inter.any()):
        return torch.full(lead, float("inf"), dtype=positions.dtype, device=positions.device)
    iu = torch.triu(torch.ones(N, N, dtype=torch.bool, device=positions.device), diagonal=1)
    ii, jj = torch.nonzero(inter & iu, as_tuple=True)
    pos = positions.reshape(-1, N, 3)
    cells = None
    if cell is not None:
        cells = cell.to(positions).expand(*lead, 3, 3).reshape(-1, 3, 3)
    out = []
    for s in range(0, pos.shape[0], chunk):
        p = pos[s:s + chunk]
        vec = p[:, jj] - p[:, ii]  # (c, P, 3)
        if cells is not None:
            vec = _min_image(vec, cells[s:s + chunk])
        d = vec.norm(dim=-1)
        # NaN-propagating min
        out.append(d.amin(dim=-1))
    return torch.cat(out).reshape(lead)


def stability_values(positions: Tensor, system: System, cell: Optional[Tensor] = None,
                     energy: Optional[Tensor] = None,
                     value_fn: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None
                     ) -> Tuple[Tensor, Tensor]:
    """Per-structure ``(unstable, value)`` for positions (..., N, 3) by ``system.stability_criterion``.

    ``cell``: (3,3) or (..., 3, 3); defaults to ``system.cell`` for periodic systems.
    ``energy`` (...): non-finite energies flag instability too.  ``value`` is the monitored
    quantity (max bond deviation, min IMD or ``value_fn``'s value), NaN-propagating."""
    crit = system.stability_criterion
    tol = float(system.stability_tolerance)
    if cell is None and system.pbc and system.cell is not None:
        cell = system.cell
    if value_fn is not None:
        value = value_fn(positions, cell)
    elif crit == "bond_length_deviation":
        value = max_bond_deviation(positions, system, cell)
    elif crit == "imd":
        value = min_intermolecular_distance(positions, system, cell)
    else:
        raise ValueError(f"stability_criterion {crit!r} needs a value_fn (e.g. the RDF MAE from "
                         "mdsim.observables)")
    unstable = (value >= tol) if HIGHER_IS_WORSE.get(crit, True) else (value < tol)
    finite = torch.isfinite(positions).all(dim=-1).all(dim=-1) & torch.isfinite(value)
    if energy is not None:
        finite = finite & torch.isfinite(energy)
    return unstable | ~finite, value


class StabilityTracker:
    """Per-replica first instability, frozen once set (stays on the flags' device; no host sync).

    ``first_unstable_step[r]`` is the step at which replica r was first flagged (−1: never);
    ``worst_value[r]`` the worst monitored value seen (max bond deviation or min IMD)."""

    def __init__(self, n_replicas: int, criterion: str = "bond_length_deviation", device=None,
                 dtype=torch.float64):
        self.higher_is_worse = HIGHER_IS_WORSE.get(criterion, True)
        self.first_unstable_step = torch.full((n_replicas,), -1, dtype=torch.long, device=device)
        fill = -float("inf") if self.higher_is_worse else float("inf")
        self.worst_value = torch.full((n_replicas,), fill, dtype=dtype, device=device)

    @property
    def n_replicas(self) -> int:
        return int(self.first_unstable_step.shape[0])

    @property
    def stable(self) -> Tensor:
        """(R,) bool: never flagged."""
        return self.first_unstable_step < 0

    def update(self, unstable: Tensor, step, value: Optional[Tensor] = None) -> Tensor:
        """Record flags (R,) at ``step`` (int or (R,) long).  Returns the newly unstable mask."""
        unstable = unstable.to(self.first_unstable_step.device)
        step_t = torch.as_tensor(step, dtype=torch.long, device=unstable.device).expand_as(self.first_unstable_step)
        new = unstable & (self.first_unstable_step < 0)
        self.first_unstable_step = torch.where(new, step_t, self.first_unstable_step)
        if value is not None:
            v = value.to(self.worst_value)
            frozen = ~self.stable & ~new  # keep the value seen at (or before) the first instability
            better = torch.maximum(self.worst_value, v) if self.higher_is_worse else torch.minimum(self.worst_value, v)
            better = torch.where(torch.isnan(v), v, better)
            self.worst_value = torch.where(frozen, self.worst_value, better)
        return new

    def update_frames(self, unstable: Tensor, steps: Tensor, values: Optional[Tensor] = None) -> Tensor:
        """Record flags for several frames at once: ``unstable`` (T,R), ``steps`` (T,) or (T,R)
        in increasing order, ``values`` (T,R).  Returns the newly unstable mask (R,)."""
        T = unstable.shape[0]
        steps = torch.as_tensor(steps, dtype=torch.long, device=unstable.device)
        if steps.ndim == 1:
            steps = steps[:, None].expand(T, unstable.shape[1])
        any_u = unstable.any(dim=0)
        first_idx = torch.argmax(unstable.to(torch.int8), dim=0)  # first True (0 if none)
        first_step = steps.gather(0, first_idx[None]).squeeze(0)
        if values is not None:
            # values up to (and including) the first unstable frame
            t = torch.arange(T, device=unstable.device)[:, None]
            upto = (t <= first_idx[None]) | ~any_u[None]
            fill = -float("inf") if self.higher_is_worse else float("inf")
            v = torch.where(upto, values.to(self.worst_value), torch.full_like(values, fill).to(self.worst_value))
            nan = torch.isnan(v).any(dim=0)
            red = v.amax(dim=0) if self.higher_is_worse else v.amin(dim=0)
            red = torch.where(nan, torch.full_like(red, float("nan")), red)
            frozen = ~self.stable
            better = torch.maximum(self.worst_value, red) if self.higher_is_worse else torch.minimum(self.worst_value, red)
            better = torch.where(nan, red, better)
            self.worst_value = torch.where(frozen, self.worst_value, better)
        new = any_u & self.stable
        self.first_unstable_step = torch.where(new, first_step, self.first_unstable_step)
        return new

    def stability_time_ps(self, total_steps: int, timestep_fs: float) -> Tensor:
        """(R,) ps until the first instability; ``total_steps``·dt for replicas never flagged."""
        steps = torch.where(self.stable, torch.full_like(self.first_unstable_step, int(total_steps)),
                            self.first_unstable_step)
        return steps.to(torch.float64) * (float(timestep_fs) / 1000.0)

    def reset(self, mask: Tensor) -> None:
        """Forget the instability of replicas ``mask`` (e.g. after they were restarted)."""
        mask = mask.to(self.first_unstable_step.device)
        self.first_unstable_step = torch.where(mask, torch.full_like(self.first_unstable_step, -1),
                                               self.first_unstable_step)
        fill = -float("inf") if self.higher_is_worse else float("inf")
        self.worst_value = torch.where(mask, torch.full_like(self.worst_value, fill), self.worst_value)
