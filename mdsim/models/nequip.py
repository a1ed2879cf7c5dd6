"""A compact NequIP-style E(3)-equivariant interatomic potential written with e3nn.

Architecture (after Batzner et al. 2022, written from the paper's description):

* species one-hot → linear embedding to ``num_features`` scalars;
* edge features: real spherical harmonics Y_l(r̂) for l ≤ ``l_max`` and a Bessel radial basis
  (2/r_c)·sin(nπr/r_c)/r (``num_basis`` functions, trainable frequencies) times the
  polynomial cutoff u(r/r_c) of degree ``polynomial_p``;
* ``num_layers`` interaction blocks: linear → tensor-product convolution (``uvu`` paths with
  per-edge weights from a radial MLP), sum over neighbours / ``avg_num_neighbors`` → linear,
  plus a self-connection (tensor product of features with the species one-hot), then a gated
  nonlinearity (SiLU on even scalars and gates, tanh on odd scalars);
* readout: two linear layers on the scalars to one per-atom energy; per-species shift/scale are
  the model's ``atom_ref``/``target_std`` normalisation (see :mod:`mdsim.models.base`).

Hidden features carry ``num_features`` channels of every irrep l ≤ ``l_max`` (both parities if
``parity`` is True, otherwise only (−1)^l), restricted in each layer to what the tensor product
can reach.  NequIP's own checkpoints are not loadable here; ``model: nequip`` (mdsim.models.nequip_pkg)
uses the nequip package itself.  Registered as ``nequip_e3nn`` (checkpoints written under the
old name ``nequip`` are still loaded, see mdsim.models.checkpoint).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .base import N_ELEMENTS, ModelInputError, PotentialModel


class BesselBasis(nn.Module):
    """(2/r_c) sin(w_n r / r_c) / r with w_n = nπ (trainable if requested)."""

    def __init__(self, r_max: float, num_basis: int = 8, trainable: bool = True):
        super().__init__()
        self.r_max = float(r_max)
        w = math.pi * torch.arange(1, num_basis + 1, dtype=torch.get_default_dtype())
        if trainable:
            self.bessel_weights = nn.Parameter(w)
        else:
            self.register_buffer("bessel_weights", w)

    def forward(self, r: Tensor) -> Tensor:
        x = r.unsqueeze(-1) / self.r_max
        return (2.0 / self.r_max) * torch.sin(self.bessel_weights * x) / r.unsqueeze(-1)


def polynomial_cutoff(r: Tensor, r_max: float, p: float = 6.0) -> Tensor:
    """u(x) = 1 − (p+1)(p+2)/2 x^p + p(p+2) x^{p+1} − p(p+1)/2 x^{p+2} for x = r/r_max < 1, 0 beyond."""
    x = r / r_max
    out = (1.0 - (p + 1.0) * (p + 2.0) / 2.0 * x.pow(p) + p * (p + 2.0) * x.pow(p + 1.0)
           - p * (p + 1.0) / 2.0 * x.pow(p + 2.0))
    return out * (x < 1.0).to(r.dtype)


def _hidden_irreps(num_features: int, l_max: int, parity: bool):
    from e3nn import o3

    items = []
    for l in range(l_max + 1):
        pars = (1, -1) if parity else ((-1) ** l,)
        for p in pars:
            items.append((num_features, (l, p)))
    return o3.Irreps(items)


def _tp_path_exists(irreps_in1, irreps_in2, ir_out) -> bool:
    from e3nn import o3

    ir_out = o3.Irrep(ir_out)
    for _, ir1 in irreps_in1:
        for _, ir2 in irreps_in2:
            if ir_out in ir1 * ir2:
                return True
    return False


class InteractionLayer(nn.Module):
    """Convolution + self-connection + gate (one NequIP layer)."""

    def __init__(self, irreps_in, irreps_hidden, irreps_sh, irreps_attr, num_basis: int,
                 radial_mlp_layers: int, radial_mlp_neurons: int, avg_num_neighbors: float,
                 resnet: bool):
        super().__init__()
        from e3nn import o3
        from e3nn.nn import FullyConnectedNet, Gate

        irreps_in = o3.Irreps(irreps_in)
        # what the tensor product can produce; scalars and gated irreps of the hidden set
        scalars = o3.Irreps([(m, ir) for m, ir in irreps_hidden
                             if ir.l == 0 and _tp_path_exists(irreps_in, irreps_sh, ir)]).simplify()
        gated = o3.Irreps([(m, ir) for m, ir in irreps_hidden
                           if ir.l > 0 and _tp_path_exists(irreps_in, irreps_sh, ir)]).simplify()
        gate_ir = "0e" if _tp_path_exists(irreps_in, irreps_sh, "0e") else "0o"
        gates = o3.Irreps([(m, gate_ir) for m, _ in gated]).simplify()
        act = {1: torch.nn.functional.silu, -1: torch.tanh}
        self.gate = Gate(scalars, [act[ir.p] for _, ir in scalars],
                         gates, [act[o3.Irrep(gate_ir).p] for _ in gates], gated)
        irreps_conv_out = self.gate.irreps_in

        self.linear_1 = o3.Linear(irreps_in, irreps_in)
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_in):
            for j, (_, ir_edge) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_edge:
                    if ir_out in irreps_conv_out:
                        k = len(mid)
                        mid.append((mul, ir_out))
                        instructions.append((i, j, k, "uvu", True))
        irreps_mid = o3.Irreps(mid)
        irreps_mid, perm, _ = irreps_mid.sort()
        instructions = [(i1, i2, perm[io], mode, w) for i1, i2, io, mode, w in instructions]
        self.tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid, instructions,
                                   shared_weights=False, internal_weights=False)
        self.radial = FullyConnectedNet([num_basis] + [radial_mlp_neurons] * radial_mlp_layers
                                        + [self.tp.weight_numel], torch.nn.functional.silu)
        self.linear_2 = o3.Linear(irreps_mid.simplify(), irreps_conv_out)
        self.self_connection = o3.FullyConnectedTensorProduct(irreps_in, irreps_attr, irreps_conv_out)
        self.inv_sqrt_nn = 1.0 / math.sqrt(float(avg_num_neighbors))
        self.irreps_out = self.gate.irreps_out
        self.resnet = bool(resnet) and irreps_in == self.irreps_out

    def forward(self, h: Tensor, attrs: Tensor, src: Tensor, dst: Tensor, sh: Tensor,
                radial: Tensor) -> Tensor:
        sc = self.self_connection(h, attrs)
        x = self.linear_1(h)
        w = self.radial(radial)
        msg = self.tp(x.index_select(0, src), sh, w)
        agg = torch.zeros(h.shape[0], msg.shape[1], dtype=msg.dtype, device=msg.device)
        agg = agg.index_add(0, dst, msg) * self.inv_sqrt_nn
        out = self.gate(self.linear_2(agg) + sc)
        return h + out if self.resnet else out


class NequIPModel(PotentialModel):
    model_name = "nequip_e3nn"

    def __init__(self, r_max: float = 5.0, num_layers: int = 3, l_max: int = 1, parity: bool = True,
                 num_features: int = 32, num_basis: int = 8, trainable_bessel: bool = True,
                 polynomial_p: float = 6.0, radial_mlp_layers: int = 2, radial_mlp_neurons: int = 64,
                 avg_num_neighbors: Optional[float] = None, species: Sequence[int] = (1, 6, 7, 8),
                 resnet: bool = False):
        super().__init__(r_max)
        from e3nn import o3

        if avg_num_neighbors in ("auto",):
            raise ModelInputError("nequip_e3nn: avg_num_neighbors='auto' must be resolved from data first "
                                  "(mdsim.models.resolve_hyperparameters)")
        species = [int(z) for z in species]
        if not species or len(set(species)) != len(species) or min(species) < 1 or max(species) >= N_ELEMENTS:
            raise ModelInputError(f"nequip_e3nn: species must be distinct atomic numbers 1..118, got {species}")
        if int(l_max) < 0 or int(num_layers) < 1:
            raise ModelInputError(f"nequip_e3nn: need l_max >= 0 and num_layers >= 1, got {l_max}, {num_layers}")
        self.hyperparameters = dict(r_max=float(r_max), num_layers=int(num_layers), l_max=int(l_max),
                                    parity=bool(parity), num_features=int(num_features),
                                    num_basis=int(num_basis), trainable_bessel=bool(trainable_bessel),
                                    polynomial_p=float(polynomial_p),
                                    radial_mlp_layers=int(radial_mlp_layers),
                                    radial_mlp_neurons=int(radial_mlp_neurons),
                                    avg_num_neighbors=None if avg_num_neighbors is None else float(avg_num_neighbors),
                                    species=species, resnet=bool(resnet))
        self.polynomial_p = float(polynomial_p)
        n_types = len(species)
        z_to_type = torch.full((N_ELEMENTS,), -1, dtype=torch.long)
        z_to_type[torch.tensor(species)] = torch.arange(n_types)
        self.register_buffer("z_to_type", z_to_type, persistent=False)
        self.n_types = n_types

        self.irreps_sh = o3.Irreps.spherical_harmonics(int(l_max))
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        self.radial_basis = BesselBasis(r_max, num_basis, trainable_bessel)
        irreps_attr = o3.Irreps(f"{n_types}x0e")
        irreps = o3.Irreps(f"{int(num_features)}x0e")
        self.embedding = o3.Linear(irreps_attr, irreps)
        hidden = _hidden_irreps(int(num_features), int(l_max), bool(parity))
        self.layers = nn.ModuleList()
        for _ in range(int(num_layers)):
            layer = InteractionLayer(irreps, hidden, self.irreps_sh, irreps_attr, int(num_basis),
                                     int(radial_mlp_layers), int(radial_mlp_neurons),
                                     1.0 if avg_num_neighbors is None else float(avg_num_neighbors),
                                     resnet)
            self.layers.append(layer)
            irreps = layer.irreps_out
        half = max(1, int(num_features) // 2)
        self.readout_hidden = o3.Linear(irreps, o3.Irreps(f"{half}x0e"))
        self.readout = o3.Linear(o3.Irreps(f"{half}x0e"), o3.Irreps("1x0e"))

    def atomic_outputs(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                       n_structures: int, cell: Optional[Tensor] = None,
                       equal_size: Optional[bool] = None) -> Tensor:
        types = self.z_to_type[atomic_numbers]
        if positions.device.type == "cpu" and bool((types < 0).any()):
            bad = sorted(set(atomic_numbers[types < 0].tolist()))
            raise ModelInputError(f"nequip_e3nn: atomic numbers {bad} not in the model's species "
                                  f"{self.hyperparameters['species']}")
        attrs = (types.unsqueeze(-1) == torch.arange(self.n_types, device=types.device)).to(positions.dtype)
        edge_index, vec = self.edges(positions, batch, n_structures, cell, equal_size)
        # e3nn convention: vector from the receiving (centre) atom to its neighbour
        vec = -vec
        src, dst = edge_index[0], edge_index[1]
        r = vec.norm(dim=-1).clamp(max=self.cutoff)
        sh = self.sh(vec)
        radial = self.radial_basis(r) * polynomial_cutoff(r, self.cutoff, self.polynomial_p).unsqueeze(-1)
        h = self.embedding(attrs)
        for layer in self.layers:
            h = layer(h, attrs, src, dst, sh, radial)
        out = self.readout(self.readout_hidden(h))
        return out.squeeze(-1)


def average_num_neighbors(R, r_max: float, cell=None) -> float:
    """Mean number of neighbours within ``r_max`` per atom over frames R (n, N, 3) (periodic
    images included when ``cell`` (n,3,3) or (3,3) is given) — NequIP's ``avg_num_neighbors:
    auto``."""
    import numpy as np

    from mdsim.geometry import periodic_edges

    R = np.asarray(R, dtype=np.float64)
    if R.ndim == 2:
        R = R[None]
    n, N, _ = R.shape
    if cell is None:
        d = np.linalg.norm(R[:, None, :, :] - R[:, :, None, :], axis=-1)
        pairs = (d < r_max).sum() - n * N  # minus the diagonal
        return float(pairs) / (n * N)
    c = np.asarray(cell, dtype=np.float64).reshape(-1, 3, 3)
    c = np.broadcast_to(c, (n, 3, 3)) if c.shape[0] == 1 else c
    ei, _ = periodic_edges(torch.as_tensor(R.reshape(-1, 3)), torch.as_tensor(np.ascontiguousarray(c)),
                           torch.arange(n).repeat_interleave(N), float(r_max))
    return float(ei.shape[1]) / (n * N)
