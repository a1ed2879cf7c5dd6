"""Stability criteria (a registry) and per-replica stability bookkeeping.

The criterion is data on the :class:`~mdsim.md.system.System` (``stability_criterion``,
``stability_tolerance``, bonds, reference bond lengths, molecule membership, cell, reference
RDF); code never looks at a system's name.  :data:`CRITERIA` maps each name (the config's
``stability_criterion`` choices) to a :class:`Criterion`: its value function
``(positions, system, cell) -> values``, direction, tolerance key and log label.

* ``bond_length_deviation``: value = max over bonds of |d_b − d̄_b| (Å); unstable if
  value ≥ tolerance (``bond_dev_tol``).
* ``imd``: value = min over pairs of atoms in different molecules of the minimum-image distance
  (Å); unstable if value < tolerance (``imd_tol``).
* ``rdf``: value = RDF MAE r_max·mean_k|g − g*| against ``System.rdf_reference`` (max over the
  element pairs of a periodic system: OO, HH, HO for water); unstable if value ≥ tolerance
  (``imd_tol``, 3.0 in the original's water evaluation).  A *window* criterion: given frames
  (F, R, N, 3) its value is that of each replica's RDF averaged over the F frames, and holds for
  all of them; given single structures (R, N, 3) (or (N, 3)) it is the RDF of each structure.

Non-finite positions (or energies, when given) are always unstable.  All functions are
vectorised over leading dimensions (replicas, frames) and stay on the input's device.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from mdsim import geometry as geo
from mdsim import observables as obs
from mdsim.md.system import System


# ----------------------------------------------------------------------------- value functions
# ``cell`` (3,3) or (..., 3, 3); None means the system's cell for a periodic system.

def _cell(system: System, cell: Optional[Tensor]) -> Optional[Tensor]:
    return system.cell if (cell is None and system.pbc) else cell


def max_bond_deviation(positions: Tensor, system: System, cell: Optional[Tensor] = None) -> Tensor:
    """max_b |d_b − d̄_b| (Å) for positions (..., N, 3); 0 if the system has no bonds."""
    return geo.bond_length_deviation(positions, system.bonds.to(positions.device), system.ref_bond_lengths,
                                     _cell(system, cell))


def min_intermolecular_distance(positions: Tensor, system: System, cell: Optional[Tensor] = None) -> Tensor:
    """Minimum minimum-image distance (Å) between atoms of different molecules, for positions
    (..., N, 3); +inf if there is a single molecule."""
    if system.molecule_index is None:
        raise ValueError("stability criterion 'imd' needs System.molecule_index")
    return geo.min_intermolecular_distance(positions, system.molecule_index.to(positions.device),
                                           _cell(system, cell))


@dataclass(frozen=True)
class RDFReference:
    """Reference of the ``rdf`` criterion: rows ``g`` (P, K) of reference g(r) on the grid
    (``r_max``, ``dr``) and which RDF they are: periodic element-pair g(r) of ``pairs``
    ((Z_a, Z_b), one row each, :func:`mdsim.observables.element_pair_rdf`), or with
    ``pairs=None`` one row of the molecular histogram RDF (:func:`mdsim.observables.histogram_rdf`,
    the RDF of the evaluation metrics)."""

    g: Tensor
    r_max: float
    dr: float
    pairs: Optional[Tuple[Tuple[int, int], ...]] = None

    def __post_init__(self):
        rows = 1 if self.pairs is None else len(self.pairs)
        if self.g.dim() != 2 or self.g.shape[0] != rows:
            raise ValueError(f"RDFReference: g must have shape ({rows}, bins), got {tuple(self.g.shape)}")

    def rows(self, positions: Tensor, atomic_numbers: Tensor, cell=None) -> Tensor:
        """(..., P, K) RDF rows of structures (..., N, 3) on this reference's grid."""
        return _rdf_rows(positions, atomic_numbers, cell, self.r_max, self.dr, self.pairs)

    def to(self, device=None) -> "RDFReference":
        return replace(self, g=self.g.to(device))


def _rdf_rows(positions, atomic_numbers, cell, r_max: float, dr: float, pairs) -> Tensor:
    if pairs is None:
        return obs.histogram_rdf(positions, r_max, dr, cell=cell)[..., None, :]
    return torch.stack([obs.element_pair_rdf(positions, atomic_numbers, p, cell, r_max, dr) for p in pairs], -2)


def rdf_reference(frames, atomic_numbers, cell=None, r_max: float = 6.0, dr: float = 0.24,
                  weights: Optional[Tensor] = None, chunk: int = 64) -> RDFReference:
    """The ``rdf`` criterion's reference from data frames (T, N, 3) Å (weights (T,) summing to
    1, e.g. Boltzmann reweighting; default uniform).

    Periodic (``cell`` (3,3) or per frame (T,3,3)): element-pair g(r) of every unordered pair of
    the elements present (water: HH, HO, OO, as the original's criterion); ``r_max`` must fit
    in the box (≤ half its smallest width).  No cell: the molecular histogram RDF."""
    frames = torch.as_tensor(frames, dtype=torch.float64)
    z = torch.as_tensor(atomic_numbers, dtype=torch.long).reshape(-1)
    pairs = None
    if cell is not None:
        half = 0.5 * float(geo.perpendicular_widths(cell, frames).min())
        if r_max > half + 1e-9:
            raise ValueError(f"rdf stability criterion: max_rdf_dist {r_max} Å exceeds half the periodic box "
                             f"({half:.4g} Å); minimum-image distances beyond it are incomplete")
        el = sorted(set(z.tolist()))
        pairs = tuple((a, b) for k, a in enumerate(el) for b in el[k:])
        cell = torch.as_tensor(cell, dtype=torch.float64)
    T = frames.shape[0]
    w = torch.full((T,), 1.0 / T, dtype=torch.float64) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64).reshape(T)
    g = 0.0
    for s in range(0, T, chunk):
        c = cell[s:s + chunk] if (cell is not None and cell.dim() == 3) else cell
        g = g + (w[s:s + chunk, None, None] * _rdf_rows(frames[s:s + chunk], z, c, r_max, dr, pairs)).sum(0)
    return RDFReference(g=g, r_max=float(r_max), dr=float(dr), pairs=pairs)


def rdf_error(positions: Tensor, system: System, cell: Optional[Tensor] = None) -> Tensor:
    """RDF MAE vs ``system.rdf_reference`` (max over its rows).  positions (F, R, N, 3): one
    value per replica (R,) from the RDF averaged over the F frames; otherwise (...) one value
    per structure.  NaN where a structure (or a frame of the window) is not finite."""
    ref = system.rdf_reference
    if ref is None:
        raise ValueError("stability_criterion 'rdf' needs a reference RDF (System.rdf_reference)")
    g = ref.rows(positions, system.atomic_numbers.to(positions.device), _cell(system, cell))  # (..., P, K)
    bad = ~torch.isfinite(positions).all(dim=-1).all(dim=-1)
    if positions.dim() == 4:  # the frames of a check window
        g, bad = g.mean(0), bad.any(0)
    mae = obs.rdf_mae(g, ref.g, ref.r_max).amax(-1)
    return torch.where(bad.to(mae.device), torch.full_like(mae, float("nan")), mae)


# ----------------------------------------------------------------------------- the registry

@dataclass(frozen=True)
class Criterion:
    """One stability criterion: ``value(positions (..., N, 3), system, cell) -> values``;
    ``higher_is_worse`` (unstable if value ≥ tolerance, else if value < tolerance); the config
    key of its tolerance; its label in logs and TensorBoard; what the System must provide."""

    name: str
    value: Callable[[Tensor, System, Optional[Tensor]], Tensor]
    higher_is_worse: bool
    tolerance_key: str
    label: str
    needs_molecules: bool = False
    needs_reference: bool = False

    def is_unstable(self, value: Tensor, tolerance: float) -> Tensor:
        return (value >= tolerance) if self.higher_is_worse else (value < tolerance)


CRITERIA: Dict[str, Criterion] = {c.name: c for c in (
    Criterion("bond_length_deviation", max_bond_deviation, True, "bond_dev_tol", "Max Bond Length Deviation"),
    Criterion("imd", min_intermolecular_distance, False, "imd_tol", "Min Intermolecular Distances",
              needs_molecules=True),
    Criterion("rdf", rdf_error, True, "imd_tol", "RDF MAE", needs_reference=True),
)}


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name`` (ValueError naming the choices otherwise)."""
    if name not in CRITERIA:
        raise ValueError(f"stability_criterion must be one of {tuple(CRITERIA)}, got {name!r}")
    return CRITERIA[name]


def stability_values(positions: Tensor, system: System, cell: Optional[Tensor] = None,
                     energy: Optional[Tensor] = None,
                     value_fn: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None
                     ) -> Tuple[Tensor, Tensor]:
    """Per-structure ``(unstable, value)`` for positions (..., N, 3) by ``system.stability_criterion``.

    ``cell``: (3,3) or (..., 3, 3); defaults to ``system.cell`` for periodic systems.
    ``energy`` (...): non-finite energies flag instability too.  ``value`` is the monitored
    quantity (the criterion's value, or ``value_fn(positions, cell)`` instead), NaN-propagating;
    a window value (one per replica for frames (F, R, N, 3)) is repeated over the frames."""
    crit = get_criterion(system.stability_criterion)
    cell = _cell(system, cell)
    value = value_fn(positions, cell) if value_fn is not None else crit.value(positions, system, cell)
    if value.shape != positions.shape[:-2]:
        value = value.expand(positions.shape[:-2]).clone()
    unstable = crit.is_unstable(value, float(system.stability_tolerance))
    finite = torch.isfinite(positions).all(dim=-1).all(dim=-1) & torch.isfinite(value)
    if energy is not None:
        finite = finite & torch.isfinite(energy)
    return unstable | ~finite, value


class StabilityTracker:
    """Per-replica first instability, frozen once set (stays on the flags' device; no host sync).

    ``first_unstable_step[r]`` is the step at which replica r was first flagged (−1: never);
    ``worst_value[r]`` the worst monitored value seen (the criterion's direction)."""

    def __init__(self, n_replicas: int, criterion: str = "bond_length_deviation", device=None,
                 dtype=torch.float64):
        self.higher_is_worse = get_criterion(criterion).higher_is_worse
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
