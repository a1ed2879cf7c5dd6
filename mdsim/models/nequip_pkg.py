"""NequIP built by the ``nequip`` package (``pip install -e .[nequip]``), behind :class:`PotentialModel`.

``model: nequip``.  The network is nequip's own (``nequip.model.NequIPGNNModel``, the NequIP
framework ≥ 0.7 layout) built from our config keys, or loaded from a file written by nequip's
own tools (a training checkpoint ``*.ckpt`` or a packaged model ``*.nequip.zip``, through
nequip's ``ModelFromCheckpoint``/``ModelFromPackage``, the loaders nequip uses for fine-tuning).

Inputs are translated to nequip's data dict (``AtomicDataDict``): ``pos``, ``atom_types`` (index
into the model's ``type_names``), ``edge_index`` and ``edge_vectors`` from
:meth:`PotentialModel.edges` (both use ``vec = r[edge_index[1]] − r[edge_index[0]]`` (+ periodic
shift)), ``batch`` and ``num_atoms``.  Only nequip's energy part is evaluated (its per-atom
energies after the per-type scale/shift); forces are −∂E/∂r of our positions by autograd like
every other model here.  Molecules use all-pairs edges: nequip's polynomial cutoff is exactly zero
(with zero derivative) beyond ``r_max`` and its radial MLP has no bias, so those pairs contribute
nothing (checked in tests/test_nequip_pkg.py against a radius graph).

The nequip network keeps its own floating-point type (``model_dtype``): ``.to(dtype)``/
``.double()`` on this wrapper move it between devices but do not change its precision (nequip
modules cache their dtype at build time).  Inputs are cast to it and the energy returned in
float64; forces have the dtype of the positions.

``nequip`` is imported lazily: without it, building the model raises a one-line
:class:`~mdsim.models.registry.ModelConfigError`.
"""
from __future__ import annotations

import contextlib
import random
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor

from .base import N_ELEMENTS, ModelInputError, PotentialModel

MISSING_PACKAGE = "model: nequip needs `pip install -e .[nequip]` (the nequip package is not installed)"

#: suffixes of the files written by nequip's own tools that this backend loads
NEQUIP_FILE_SUFFIXES = (".ckpt", ".nequip.zip")


def _import_nequip():
    try:
        import nequip  # noqa: F401
    except ImportError:
        from .registry import ModelConfigError

        raise ModelConfigError(MISSING_PACKAGE) from None
    return nequip


def nequip_available() -> bool:
    try:
        import nequip  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _nequip_global_state():
    """nequip's ``set_global_state`` (required before building) without its process-wide side
    effects on our runs: it sets the default dtype to float64 and reseeds every RNG (seed 123);
    both are restored here.  (Its other settings — e3nn eager mode, JIT fuser choice, torch
    multiprocessing sharing strategy ``file_system`` — stay.)"""
    import numpy as np
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if global_state_initialized():
        yield
        return
    dtype = torch.get_default_dtype()
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        set_global_state(allow_tf32=False)
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_default_dtype(dtype)
    yield


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[int(z)]


def _atomic_number(name: str) -> int:
    from ase.data import atomic_numbers

    if name not in atomic_numbers:
        raise ModelInputError(f"nequip: type name {name!r} of the nequip model is not a chemical "
                              "symbol; only models whose type_names are element symbols can be used")
    return int(atomic_numbers[name])


def _per_type(value, species: Sequence[int], key: str):
    """A number, or a mapping {Z or symbol: value} over ``species`` → nequip's float/dict form."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            z = int(k) if str(k).isdigit() else _atomic_number(str(k))
            if z not in species:
                raise ModelInputError(f"nequip: {key} has an entry for Z={z}, not in species {list(species)}")
            out[_symbol(z)] = float(v)
        missing = [z for z in species if _symbol(z) not in out]
        if missing:
            raise ModelInputError(f"nequip: {key} lacks entries for atomic numbers {missing}")
        return out
    raise ModelInputError(f"nequip: {key} must be a number, a mapping {{Z or symbol: value}} or null, "
                          f"got {value!r}")


def _energy_module(graph_model):
    """The energy part of a nequip ``GraphModel`` (skips its ``ForceStressOutput``; class names
    are compared because packaged models carry their own copies of nequip's classes)."""
    inner = graph_model.model
    if type(inner).__name__ == "ForceStressOutput":
        inner = inner.func
    return inner


def _load_nequip_file(path: Path):
    """nequip ``GraphModel`` from a ``.ckpt``/``.nequip.zip`` written by nequip's tools (eager)."""
    from nequip.model import ModelFromCheckpoint, ModelFromPackage

    name = path.name
    if not path.is_file():
        raise ModelInputError(f"nequip_file: file not found: {path}")
    try:
        with _nequip_global_state():
            model = (ModelFromPackage(str(path)) if name.endswith(".nequip.zip")
                     else ModelFromCheckpoint(str(path)))
    except Exception as exc:
        raise ModelInputError(f"nequip_file: cannot load {path} with nequip: {exc}") from exc
    if isinstance(model, torch.nn.ModuleDict):
        if len(model) != 1:
            raise ModelInputError(f"nequip_file: {path} holds {len(model)} models {list(model)}; "
                                  "expected one")
        model = next(iter(model.values()))
    return model


class NequIPPackageModel(PotentialModel):
    """NequIP from the ``nequip`` package (see the module docstring and docs/models.md)."""

    model_name = "nequip"

    def __init__(self, r_max: float = 5.0, num_layers: int = 3, l_max: int = 1, parity: bool = True,
                 num_features: Union[int, Sequence[int]] = 32, num_bessels: int = 8,
                 bessel_trainable: bool = True, polynomial_cutoff_p: int = 6,
                 radial_mlp_depth: int = 2, radial_mlp_width: int = 64,
                 avg_num_neighbors: Optional[float] = None, species: Sequence[int] = (1, 6, 7, 8),
                 per_type_energy_scales=None, per_type_energy_shifts=None,
                 per_type_energy_scales_trainable: bool = False,
                 per_type_energy_shifts_trainable: bool = False,
                 model_dtype: str = "float32", nequip_file: Optional[str] = None):
        _import_nequip()
        arch = dict(r_max=float(r_max), num_layers=int(num_layers), l_max=int(l_max), parity=bool(parity),
                    num_features=(int(num_features) if isinstance(num_features, (int, float))
                                  else [int(n) for n in num_features]),
                    num_bessels=int(num_bessels), bessel_trainable=bool(bessel_trainable),
                    polynomial_cutoff_p=int(polynomial_cutoff_p),
                    radial_mlp_depth=int(radial_mlp_depth), radial_mlp_width=int(radial_mlp_width),
                    avg_num_neighbors=None if avg_num_neighbors is None else avg_num_neighbors,
                    species=species, per_type_energy_scales=per_type_energy_scales,
                    per_type_energy_shifts=per_type_energy_shifts,
                    per_type_energy_scales_trainable=bool(per_type_energy_scales_trainable),
                    per_type_energy_shifts_trainable=bool(per_type_energy_shifts_trainable),
                    model_dtype=str(model_dtype))
        if nequip_file is not None:
            defaults = NequIPPackageModel._defaults()
            changed = sorted(k for k, v in arch.items() if _norm(v) != _norm(defaults[k]))
            if changed:
                raise ModelInputError(f"nequip: nequip_file is given, so the architecture comes from "
                                      f"the file; remove the keys {changed}")
            net = _load_nequip_file(Path(nequip_file))
            species = [_atomic_number(t) for t in net.type_names]
            r_max = float(net._metadata.get("r_max", r_max)) if hasattr(net, "_metadata") else r_max
            self._init_common(float(r_max), species)
            self.hyperparameters = {"nequip_file": str(nequip_file)}
        else:
            if avg_num_neighbors == "auto" or species == "auto" or "auto" in (per_type_energy_scales,
                                                                               per_type_energy_shifts):
                raise ModelInputError("nequip: 'auto' values must be resolved from data first "
                                      "(mdsim.models.resolve_hyperparameters)")
            if arch["model_dtype"] not in ("float32", "float64"):
                raise ModelInputError(f"nequip: model_dtype must be 'float32' or 'float64', got {model_dtype!r}")
            species = [int(z) for z in species]
            if (not species or len(set(species)) != len(species) or min(species) < 1
                    or max(species) >= N_ELEMENTS):
                raise ModelInputError(f"nequip: species must be distinct atomic numbers 1..118, got {species}")
            if arch["l_max"] < 0 or arch["num_layers"] < 1:
                raise ModelInputError(f"nequip: need l_max >= 0 and num_layers >= 1, got {l_max}, {num_layers}")
            arch["species"] = species
            arch["avg_num_neighbors"] = None if avg_num_neighbors is None else float(avg_num_neighbors)
            for key in ("per_type_energy_scales", "per_type_energy_shifts"):
                v = arch[key]
                arch[key] = ({int(k) if str(k).isdigit() else k: float(x) for k, x in v.items()}
                             if isinstance(v, dict) else (None if v is None else float(v)))
            self._init_common(arch["r_max"], species)
            net = self._build(arch)
            self.hyperparameters = arch
        self.net = net
        self.net_dtype = next(iter(net.parameters())).dtype

    @staticmethod
    def _defaults() -> Dict:
        import inspect

        sig = inspect.signature(NequIPPackageModel.__init__)
        return {k: p.default for k, p in sig.parameters.items() if k not in ("self", "nequip_file")}

    def _init_common(self, r_max: float, species):
        super().__init__(r_max)
        z_to_type = torch.full((N_ELEMENTS,), -1, dtype=torch.long)
        z_to_type[torch.tensor(species)] = torch.arange(len(species))
        self.register_buffer("z_to_type", z_to_type, persistent=False)
        self.species = list(species)

    def _build(self, hp: Dict):
        from nequip.model import NequIPGNNModel

        species = hp["species"]
        kwargs = dict(
            seed=int(torch.randint(0, 2**31 - 1, ()).item()),  # follows our seed (torch RNG)
            model_dtype=hp["model_dtype"], type_names=[_symbol(z) for z in species],
            r_max=hp["r_max"], num_layers=hp["num_layers"], l_max=hp["l_max"], parity=hp["parity"],
            num_features=hp["num_features"], radial_mlp_depth=hp["radial_mlp_depth"],
            radial_mlp_width=hp["radial_mlp_width"], num_bessels=hp["num_bessels"],
            bessel_trainable=hp["bessel_trainable"], polynomial_cutoff_p=hp["polynomial_cutoff_p"],
            avg_num_neighbors=1.0 if hp["avg_num_neighbors"] is None else hp["avg_num_neighbors"],
            per_type_energy_scales=_per_type(hp["per_type_energy_scales"], species, "per_type_energy_scales"),
            per_type_energy_shifts=_per_type(hp["per_type_energy_shifts"], species, "per_type_energy_shifts"),
            per_type_energy_scales_trainable=hp["per_type_energy_scales_trainable"],
            per_type_energy_shifts_trainable=hp["per_type_energy_shifts_trainable"],
            do_derivatives=False,
        )
        import warnings

        with _nequip_global_state(), warnings.catch_warnings():
            # nequip warns when per-type scales/shifts are unset; ours default to target_mean/std
            warnings.filterwarnings("ignore", message=".*per_type_energy_s.*")
            try:
                return NequIPGNNModel(**kwargs)
            except AssertionError as exc:
                raise ModelInputError(f"nequip: cannot build NequIPGNNModel: {exc}") from exc

    # ------------------------------------------------------------------ precision
    def _apply(self, fn, recurse=True):
        """Move the nequip network between devices but keep its dtype (see module docstring)."""
        device = fn(torch.zeros(1)).device
        mods = self._modules
        self._modules = OrderedDict((k, m) for k, m in mods.items() if k != "net")
        try:
            out = super()._apply(fn, recurse)
        finally:
            self._modules = mods
        if "net" in mods:
            mods["net"]._apply(lambda t: t.to(device=device))
        return out

    def set_normalization(self, mean=None, std=None, atom_ref=None) -> None:
        if "nequip_file" in self.hyperparameters and (
                (mean is not None and float(mean) != 0.0) or (std is not None and float(std) != 1.0)
                or atom_ref is not None):
            raise ModelInputError("nequip: a model loaded from nequip_file carries its own per-type "
                                  "energy shifts/scales; its energy normalisation cannot be reset "
                                  "(fine-tune it with nequip-train, or use it in StABlE training)")
        super().set_normalization(mean, std, atom_ref)

    # ------------------------------------------------------------------ forward
    def nequip_data(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor, n_structures: int,
                    cell: Optional[Tensor] = None, equal_size: Optional[bool] = None,
                    edges=None) -> Dict[str, Tensor]:
        """nequip's data dict for our inputs (``edges``: optional (edge_index, vectors))."""
        from nequip.data import AtomicDataDict as K

        types = self.z_to_type[atomic_numbers]
        if positions.device.type == "cpu" and bool((types < 0).any()):
            bad = sorted(set(atomic_numbers[types < 0].tolist()))
            raise ModelInputError(f"nequip: atomic numbers {bad} not in the model's species {self.species}")
        edge_index, vec = edges if edges is not None else self.edges(
            positions, batch, n_structures, cell, equal_size)
        a = positions.shape[0]
        if equal_size:
            counts = torch.full((n_structures,), a // n_structures, dtype=torch.long, device=positions.device)
        else:
            counts = torch.bincount(batch, minlength=n_structures)
        return {K.POSITIONS_KEY: positions.to(self.net_dtype), K.ATOM_TYPE_KEY: types,
                K.EDGE_INDEX_KEY: edge_index, K.EDGE_VECTORS_KEY: vec.to(self.net_dtype),
                K.BATCH_KEY: batch, K.NUM_NODES_KEY: counts}

    def atomic_outputs(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                       n_structures: int, cell: Optional[Tensor] = None,
                       equal_size: Optional[bool] = None) -> Tensor:
        from nequip.data import AtomicDataDict as K

        data = self.nequip_data(positions, atomic_numbers, batch, n_structures, cell, equal_size)
        out = _energy_module(self.net)(data)
        return out[K.PER_ATOM_ENERGY_KEY].reshape(-1)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff}, species={self.species}, net_dtype={self.net_dtype}"


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def is_nequip_file(path) -> bool:
    """Whether ``path`` names a file of nequip's own tools (``*.ckpt``, ``*.nequip.zip``)."""
    return str(path).endswith(NEQUIP_FILE_SUFFIXES)


def model_from_nequip_file(path, device="cpu"):
    """(model, checkpoint-like dict) for a ``.ckpt``/``.nequip.zip`` written by nequip's tools."""
    _import_nequip()
    model = NequIPPackageModel(nequip_file=str(path))
    model.to(device).eval()
    ckpt = {"format": "nequip-file", "model_name": model.model_name,
            "hyperparameters": dict(model.hyperparameters), "normalizers": model.normalizers()}
    return model, ckpt


def forces_rms(F) -> float:
    """Root mean square of all force components (nequip's ``dataset_forces_rms``; the original's
    per-species scale)."""
    import numpy as np

    F = np.asarray(F, dtype=np.float64)
    return float(np.sqrt(np.mean(F * F)))
