"""Common interface of all interatomic potentials in ``mdsim``.

Every model is a :class:`PotentialModel`::

    energy = model(positions, atomic_numbers, batch, n_structures, cell=None)   # (S,) eV

* ``positions`` (A, 3) Å, ``atomic_numbers`` (A,) long, ``batch`` (A,) long structure index
  (atoms numbered consecutively structure by structure), ``n_structures`` = S (a Python int, so
  that shapes never depend on tensor values), ``cell`` (S, 3, 3) Å with cell vectors as rows, or
  ``None`` for molecules (no periodicity).
* Forces come from :func:`energy_and_forces` (autograd, F = −∂E/∂r).

Energy normalisation lives with the model in float64 buffers (saved in the state dict)::

    E = target_std * Σ_i net_i + target_mean + Σ_i atom_ref[z_i]

The returned energy is float64 whatever the model's dtype (a float32 model evaluated on a
−17,000 eV molecule would otherwise round the energy to ~1e-3 eV); forces have the dtype of
``positions``.  The normalisation buffers stay float64 under ``model.float()``/``.double()``.

Graphs (:mod:`mdsim.geometry.neighbors`): molecules use static all-pairs edge lists and
each model clamps distances at its cutoff, so that pairs beyond the cutoff get exactly zero
weight and zero gradient; periodic boxes use vesin neighbour lists.  Pass ``equal_size=True``
when every structure has the same number of atoms (MD replicas) to skip the host-side count.
"""
from __future__ import annotations

from contextlib import contextmanager

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from mdsim.geometry import all_pairs_edges, batch_all_pairs_edges, edge_vectors, periodic_edges

#: size of the per-element reference-energy table (atomic numbers 0..118).
N_ELEMENTS = 119

_NORM_BUFFERS = ("target_mean", "target_std", "atom_ref")


class ModelInputError(ValueError):
    """Inputs to a model have the wrong shape/type."""


class PotentialModel(nn.Module):
    """Base class: subclasses implement :meth:`atomic_outputs` (normalised per-atom outputs).

    Class attributes set by subclasses: ``model_name`` (registry name) and ``cutoff`` (Å).
    ``self.hyperparameters`` (a plain dict) is what :func:`mdsim.models.build_model` needs to
    rebuild the architecture; it is stored in checkpoints.
    """

    model_name: str = "base"

    def __init__(self, cutoff: float):
        super().__init__()
        self.cutoff = float(cutoff)
        self.hyperparameters: Dict = {}
        self.register_buffer("target_mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("target_std", torch.ones((), dtype=torch.float64))
        self.register_buffer("atom_ref", torch.zeros(N_ELEMENTS, dtype=torch.float64))

    # ------------------------------------------------------------------ normalisation
    def set_normalization(self, mean: Optional[float] = None, std: Optional[float] = None,
                          atom_ref=None) -> None:
        """Set the energy normalisation (``E = std·net + mean + Σ atom_ref[z]``).

        ``atom_ref`` may be a dict {Z: eV} or a sequence indexed by Z (length ≤ 119)."""
        with torch.no_grad():
            if mean is not None:
                self.target_mean.fill_(float(mean))
            if std is not None:
                if not float(std) > 0:
                    raise ValueError(f"target_std must be > 0, got {std}")
                self.target_std.fill_(float(std))
            if atom_ref is not None:
                self.atom_ref.zero_()
                if isinstance(atom_ref, dict):
                    for z, e in atom_ref.items():
                        self.atom_ref[int(z)] = float(e)
                else:
                    t = torch.as_tensor(atom_ref, dtype=torch.float64).reshape(-1)
                    if t.numel() > N_ELEMENTS:
                        raise ValueError(f"atom_ref has {t.numel()} entries, at most {N_ELEMENTS} expected")
                    self.atom_ref[: t.numel()] = t.to(self.atom_ref.device)

    def normalizers(self) -> Dict[str, Dict[str, float]]:
        """Normalisers in the original's checkpoint layout ({target: {mean, std}})."""
        return {"target": {"mean": float(self.target_mean), "std": float(self.target_std)},
                "grad_target": {"mean": 0.0, "std": float(self.target_std)}}

    def _apply(self, fn, recurse=True):
        # keep the normalisation buffers in float64 (only move them between devices)
        saved = {k: self._buffers[k] for k in _NORM_BUFFERS if self._buffers.get(k) is not None}
        out = super()._apply(fn, recurse)
        for k, old in saved.items():
            new = self._buffers[k]
            if new.dtype != torch.float64:
                self._buffers[k] = old.to(device=new.device)
        return out

    # ------------------------------------------------------------------ graph
    _neighbors = None  # the active VerletList (set by using_neighbors), None: build per call
    #: whether the model's forward is exact with a padded Verlet list (padded slots carry edge
    #: vectors beyond the cutoff); models that build triplets/reverse edges from the list say no
    supports_neighbor_list = False

    @contextmanager
    def using_neighbors(self, neighbors):
        """Use ``neighbors`` (a :class:`~mdsim.geometry.VerletList` whose cutoff covers the
        model's, built for the positions passed in) for the edges of calls inside the block."""
        if neighbors is not None and neighbors.cutoff < self.cutoff:
            raise ModelInputError(f"neighbour list cutoff {neighbors.cutoff} Å is below the model "
                                  f"cutoff {self.cutoff} Å")
        old, self._neighbors = self._neighbors, neighbors
        try:
            yield self
        finally:
            self._neighbors = old

    #: whether the model can evaluate smooth radial functions from a table in MD
    #: (:meth:`using_radial_table`, config ``radial_table_spacing``)
    supports_radial_table = False

    @contextmanager
    def using_radial_table(self, spacing: Optional[float]):
        """MD with fixed parameters: inside the block, models that support it
        (``supports_radial_table``, SchNet) read their radial functions of the pair distance
        from cubic Hermite tables (:class:`~mdsim.models.radial_table.RadialTable`, grid
        ``spacing`` Å), rebuilt on entry when the parameters changed.  Forces equal the
        network's to float rounding; parameter gradients do not flow through the tables, so
        only force fields of MD enter this block.  ``spacing`` None, or a model without tables:
        no change."""
        yield self

    def edges(self, positions: Tensor, batch: Tensor, n_structures: int, cell: Optional[Tensor],
              equal_size: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
        """Edge list and edge vectors (target − source [+ shift]), symmetric: ``[half; reversed
        half]`` (edge p and edge p + E/2 are one pair in opposite directions).

        Inside :meth:`using_neighbors` (MD): the active :class:`~mdsim.geometry.VerletList`.
        Otherwise molecules: all pairs inside each structure (the model clamps distances at
        its cutoff); periodic: pairs within ``self.cutoff`` from vesin."""
        nl = self._neighbors
        if nl is not None:
            return nl.edges(positions, cell)
        if cell is not None:
            edge_index, shifts = periodic_edges(positions, cell.reshape(-1, 3, 3), batch, self.cutoff)
            return edge_index, edge_vectors(positions, edge_index, shifts)
        n_atoms = positions.shape[0]
        if equal_size:
            if n_atoms % n_structures:
                raise ModelInputError(f"equal_size=True but {n_atoms} atoms do not split into "
                                      f"{n_structures} equal structures")
            edge_index = all_pairs_edges(n_atoms // n_structures, n_structures, positions.device)
        else:
            edge_index = batch_all_pairs_edges(batch, n_structures)
        # index_select (backward: index_add) rather than advanced indexing (backward: a sorted
        # index_put): same values, cheaper and plainly capture-safe on GPUs
        vec = positions.index_select(0, edge_index[1]) - positions.index_select(0, edge_index[0])
        return edge_index, vec

    # ------------------------------------------------------------------ forward
    def atomic_outputs(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                       n_structures: int, cell: Optional[Tensor] = None,
                       equal_size: Optional[bool] = None) -> Tensor:
        """Normalised per-atom network outputs (A,) (before std/mean/atom_ref)."""
        raise NotImplementedError

    def atomic_energies(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                        n_structures: int, cell: Optional[Tensor] = None,
                        equal_size: Optional[bool] = None) -> Tensor:
        """Per-atom energies (A,) float64 eV, ``std·net_i + atom_ref[z_i]`` (``target_mean`` is a
        per-structure constant and not included).  Their per-structure sum + ``target_mean`` is
        the energy returned by :meth:`forward`."""
        _check_inputs(positions, atomic_numbers, batch, n_structures, cell)
        net = self.atomic_outputs(positions, atomic_numbers, batch, n_structures, cell, equal_size)
        return net.to(torch.float64) * self.target_std + self.atom_ref[atomic_numbers]

    def forward(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor, n_structures: int,
                cell: Optional[Tensor] = None, equal_size: Optional[bool] = None) -> Tensor:
        e_atom = self.atomic_energies(positions, atomic_numbers, batch, n_structures, cell, equal_size)
        if equal_size:  # a plain reduction: no float64 scatter in a compiled float32 step
            return e_atom.reshape(n_structures, -1).sum(dim=1) + self.target_mean
        energy = torch.zeros(n_structures, dtype=torch.float64, device=positions.device)
        energy = energy.index_add(0, batch, e_atom)
        return energy + self.target_mean

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}"


#: former name of :func:`mdsim.geometry.all_pairs_edges` (the compiled MD stepper, md/compiled.py, imports it)
static_all_pairs = all_pairs_edges


def _check_inputs(positions, atomic_numbers, batch, n_structures, cell):
    if not isinstance(positions, Tensor) or positions.dim() != 2 or positions.shape[1] != 3:
        raise ModelInputError(f"positions must be a tensor of shape (atoms, 3), got "
                              f"{getattr(positions, 'shape', type(positions))}")
    a = positions.shape[0]
    if atomic_numbers.shape != (a,) or atomic_numbers.dtype not in (torch.int64, torch.int32):
        raise ModelInputError(f"atomic_numbers must be an integer tensor of shape ({a},), got "
                              f"{tuple(atomic_numbers.shape)} {atomic_numbers.dtype}")
    if batch.shape != (a,) or batch.dtype not in (torch.int64, torch.int32):
        raise ModelInputError(f"batch must be an integer tensor of shape ({a},), got "
                              f"{tuple(batch.shape)} {batch.dtype}")
    if not isinstance(n_structures, int) or n_structures < 1:
        raise ModelInputError(f"n_structures must be a positive Python int, got {n_structures!r}")
    if cell is not None and (cell.dim() not in (2, 3) or cell.shape[-2:] != (3, 3)
                             or cell.reshape(-1, 3, 3).shape[0] != n_structures):
        raise ModelInputError(f"cell must have shape ({n_structures}, 3, 3) or be None, got "
                              f"{tuple(cell.shape)}")


def energy_and_forces(model: PotentialModel, positions: Tensor, atomic_numbers: Tensor,
                      batch: Tensor, n_structures: int, cell: Optional[Tensor] = None,
                      create_graph: bool = False,
                      equal_size: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Energies (S,) float64 eV and forces (A, 3) eV/Å (dtype of ``positions``) = −∂E/∂r.

    ``create_graph=True`` keeps the graph so that losses on forces can be differentiated with
    respect to the parameters (training).  Without it the returned tensors are detached."""
    with torch.enable_grad():
        pos = positions if positions.requires_grad else positions.detach().requires_grad_(True)
        energy = model(pos, atomic_numbers, batch, n_structures, cell, equal_size=equal_size)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph,
                                      allow_unused=True)
    if grad is None:  # a model whose energy does not depend on positions (e.g. one atom)
        grad = torch.zeros_like(pos)
    forces = -grad
    if not create_graph:
        energy, forces = energy.detach(), forces.detach()
    return energy, forces


def batch_from_frames(R, z, cell=None, device=None, dtype=torch.float32) -> Dict:
    """Model inputs for B frames of one system: R (B, N, 3), z (N,), cell (B, 3, 3) or None.

    Returns a dict with ``positions`` (B·N, 3), ``atomic_numbers``, ``batch``, ``n_structures``,
    ``cell`` and ``equal_size=True``, ready for ``model(**inputs)``/``energy_and_forces``."""
    R = torch.as_tensor(R, dtype=dtype, device=device)
    if R.dim() == 2:
        R = R.unsqueeze(0)
    if R.dim() != 3 or R.shape[-1] != 3:
        raise ModelInputError(f"R must have shape (frames, atoms, 3), got {tuple(R.shape)}")
    B, N, _ = R.shape
    z = torch.as_tensor(z, dtype=torch.long, device=device).reshape(-1)
    if z.shape[0] != N:
        raise ModelInputError(f"z has {z.shape[0]} atoms but R has {N}")
    out = {
        "positions": R.reshape(B * N, 3),
        "atomic_numbers": z.repeat(B),
        "batch": torch.arange(B, device=R.device).repeat_interleave(N),
        "n_structures": int(B),
        "cell": None,
        "equal_size": True,
    }
    if cell is not None:
        c = torch.as_tensor(cell, dtype=dtype, device=device)
        out["cell"] = c.reshape(-1, 3, 3).expand(B, 3, 3).contiguous() if c.numel() == 9 else c.reshape(B, 3, 3)
    return out
