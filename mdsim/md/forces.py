"""Force fields: one interface ``compute(positions (R,N,3), cell (R,3,3)|None) -> (energy (R,),
forces (R,N,3))`` for learned models and analytic potentials.

A :class:`ModelForceField` evaluates all replicas with one batched model call (replicas are
the structures of one batch).  Integrators only see the ``force_fn`` callable
(``ForceField.__call__`` is ``compute``), so any function with that signature also works.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor


def wrap_positions(positions: Tensor, cell: Tensor) -> Tensor:
    """Positions (R,N,3) wrapped into the cell (R,3,3) (fractional coordinates in [0,1))."""
    frac = positions @ torch.linalg.inv(cell)
    return positions - torch.floor(frac) @ cell


class ForceField:
    """Base class.  Subclasses implement :meth:`compute`."""

    def compute(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def __call__(self, positions: Tensor, cell: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        return self.compute(positions, cell)


class PotentialForceField(ForceField):
    """Adapter for a callable potential.

    ``potential(positions (R,N,3), cell)`` returns either ``(energy, forces)`` (analytic forces)
    or only the energy (R,), in which case forces come from autograd."""

    def __init__(self, potential: Callable):
        self.potential = potential

    def compute(self, positions, cell=None):
        with torch.enable_grad():
            pos = positions.detach().requires_grad_(True)
            out = self.potential(pos, cell)
            if isinstance(out, tuple):
                e, f = out
                return e.detach(), f.detach()
            (g,) = torch.autograd.grad(out.sum(), pos)
        return out.detach(), (-g).detach()


def equal_size_kwargs(model) -> dict:
    """``{"equal_size": True}`` for models that take it (the package's PotentialModel: skips a
    host-side atom count when building the all-pairs graph of equal-size structures), else {}."""
    import inspect
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        params = {}
    return {"equal_size": True} if "equal_size" in params else {}


def make_neighbor_list(model, skin: Optional[float]):
    """A :class:`~mdsim.geometry.VerletList` for ``model`` with ``skin`` (Å), or None when
    ``skin`` is None or the model does not support neighbour lists."""
    if skin is None or not getattr(model, "supports_neighbor_list", False):
        return None
    from mdsim.geometry import VerletList
    return VerletList(float(model.cutoff), float(skin))


def neighbors_of(model, neighbors):
    """Context in which ``model`` takes its edges from ``neighbors`` (no-op for None)."""
    if neighbors is None:
        return contextlib.nullcontext()
    return model.using_neighbors(neighbors)


def radial_table_of(model, spacing: Optional[float]):
    """Context in which ``model`` reads its radial functions from tables with grid ``spacing``
    (Å) (:meth:`mdsim.models.base.PotentialModel.using_radial_table`; no-op for None or a
    model without tables)."""
    if spacing is None or not getattr(model, "supports_radial_table", False):
        return contextlib.nullcontext()
    return model.using_radial_table(spacing)


class ModelForceField(ForceField):
    """Wraps a model with the package interface ``model(positions [A,3], atomic_numbers [A],
    batch [A], n_structures, cell [S,3,3]|None) -> energy [S]`` (eV).

    All R replicas go through one model call as R structures.  Forces are −∂E/∂x by autograd;
    outputs are detached unless ``create_graph``.  Energies keep the model's output dtype.  ``dtype`` is the model's dtype (positions are
    cast to it and results cast back).  With a cell, positions are wrapped into the box before
    the model sees them when ``wrap=True`` (energies/forces are invariant).

    ``neighbor_skin`` (Å, config ``neighbor_skin``): for models that support it
    (``model.supports_neighbor_list``, SchNet), edges come from a
    :class:`~mdsim.geometry.VerletList` within ``cutoff + skin`` that is rebuilt only when an
    atom has moved more than ``skin/2`` since the last build (checked here, at the positions the
    forces are evaluated at, so forces equal the all-pairs ones to rounding).  ``None`` (or a
    model without support): the static all-pairs graph (molecules) / a fresh vesin list per call
    (periodic).

    ``radial_table_spacing`` (Å, config ``radial_table_spacing``): models that support it
    (SchNet's filters) evaluate their radial functions from a cubic Hermite table with this grid
    spacing, rebuilt from the current parameters whenever they changed
    (:mod:`mdsim.models.radial_table`); forces equal the network's to float rounding.  Not used
    with ``create_graph`` (parameter gradients need the network).  ``None``: the network."""

    def __init__(self, model, atomic_numbers: Tensor, create_graph: bool = False,
                 dtype: Optional[torch.dtype] = None, wrap: bool = True,
                 neighbor_skin: Optional[float] = None, radial_table_spacing: Optional[float] = None):
        self.model = model
        self.atomic_numbers = torch.as_tensor(atomic_numbers, dtype=torch.long).reshape(-1)
        self.create_graph = bool(create_graph)
        if dtype is None:
            p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            dtype = p.dtype if p is not None else None
        self.dtype = dtype
        self.wrap = bool(wrap)
        self._cache = {}
        self._model_kw = equal_size_kwargs(model)
        self.neighbor_skin = neighbor_skin
        self.neighbors = make_neighbor_list(model, neighbor_skin)
        self.radial_table_spacing = None if radial_table_spacing is None else float(radial_table_spacing)
        if self.radial_table_spacing is not None and not self.radial_table_spacing > 0:
            raise ValueError(f"radial_table_spacing: expected a positive spacing in Å or None, "
                             f"got {radial_table_spacing!r}")

    def renewed(self) -> "ModelForceField":
        """The same force field with its own Verlet list and caches (for another replica count:
        a list keeps the capacity of its largest build, so a smaller batch would still pay for
        the larger one's pair slots)."""
        return ModelForceField(self.model, self.atomic_numbers, create_graph=self.create_graph, dtype=self.dtype,
                               wrap=self.wrap, neighbor_skin=self.neighbor_skin,
                               radial_table_spacing=self.radial_table_spacing)

    def tables(self):
        """The context of this force field's radial tables (no-op without; see class doc)."""
        return radial_table_of(self.model, None if self.create_graph else self.radial_table_spacing)

    def _inputs(self, R: int, device):
        key = (R, str(device))
        if key not in self._cache:
            N = self.atomic_numbers.shape[0]
            z = self.atomic_numbers.to(device).repeat(R)
            batch = torch.arange(R, device=device).repeat_interleave(N)
            self._cache = {key: (z, batch)}  # keep one entry: R rarely changes
        return self._cache[key]

    def compute(self, positions, cell=None):
        R, N, _ = positions.shape
        if N != self.atomic_numbers.shape[0]:
            raise ValueError(f"positions have {N} atoms per replica, the force field's "
                             f"atomic_numbers {self.atomic_numbers.shape[0]}")
        out_dtype = positions.dtype
        dtype = self.dtype or out_dtype
        z, batch = self._inputs(R, positions.device)
        c = None if cell is None else cell.to(dtype)
        nl = self.neighbors
        with torch.enable_grad(), neighbors_of(self.model, nl), self.tables():
            pos = positions.detach().to(dtype)
            if nl is not None:  # a Verlet list is built on unwrapped positions: never wrap
                nl.update(pos, c)
            elif c is not None and self.wrap:
                pos = wrap_positions(pos, c)
            pos = pos.reshape(R * N, 3).requires_grad_(True)
            energy = self.model(pos, z, batch, R, c, **self._model_kw)
            (g,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.create_graph)
        forces = -g.reshape(R, N, 3)
        energy = energy.reshape(R)
        if not self.create_graph:
            energy, forces = energy.detach(), forces.detach()
        # energies keep the model's output dtype (float64 for PotentialModel: large molecular
        # energies would lose ~1e-3 eV in float32); forces take the state's dtype
        return energy, forces.to(out_dtype)


def as_force_field(obj, atomic_numbers: Optional[Tensor] = None,
                   neighbor_skin: Optional[float] = None,
                   radial_table_spacing: Optional[float] = None) -> ForceField:
    """A ForceField from a ForceField, a ``torch.nn.Module`` model (needs ``atomic_numbers``;
    ``neighbor_skin`` as :class:`ModelForceField`) or a potential callable."""
    if isinstance(obj, ForceField):
        return obj
    if isinstance(obj, torch.nn.Module):
        if atomic_numbers is None:
            raise ValueError("wrapping a model needs the atomic_numbers of the system")
        return ModelForceField(obj, atomic_numbers, neighbor_skin=neighbor_skin,
                               radial_table_spacing=radial_table_spacing)
    if callable(obj):
        return PotentialForceField(obj)
    raise TypeError(f"force_field: expected a ForceField, a model or a callable, got {type(obj).__name__}")
