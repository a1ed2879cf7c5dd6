"""GemNet-T (Gasteiger, Becker, Günnemann, NeurIPS 2021): the triplet variant of GemNet,
written here from the paper (the original StABlE water model; fairchem-core 2.x no longer
ships GemNet).

Notation: directed edge e = j→i (source j, target i), vector v_ji = r_i − r_j (+ periodic
shift), distance d_ji.  Triplet k→j→i: incoming edge kj, outgoing edge ji, angle θ_kji at atom
j between r_k − r_j and r_i − r_j (back-tracking k = i, same image, excluded).

Architecture (see docs/models.md, "gemnet_t"):

* radial basis e_RBF(d) = u(d/c)·exp(−(d/c − μ_n)²/2σ²): ``num_radial`` Gaussians with centres
  μ_n on [0, 1] of the scaled distance, times the polynomial envelope u (exponent p, zero with
  zero slope at the cutoff c);
* circular basis e_CBF(d_ji, θ_kji) = e_RBF,n(d_ji)·Y_l0(θ_kji), l < ``num_spherical``
  (real spherical harmonics of order 0 = normalised Legendre polynomials of cos θ).  The radial
  factor is that of the updated edge ji, so it comes out of the sum over k (GemNet's efficient
  bilinear form); the incoming edge kj is weighted by its own e_RBF(d_kj) before the sum;
* atom embedding h_i (element table), edge embedding m_ji = σ(W[h_j, h_i, e_RBF(d_ji)]);
* ``num_blocks`` interaction blocks: triplet interaction (down-projection, sum over k of
  Y_l0 x_kj, radial down-projection of the CBF, bilinear layer, up-projections of the edge and
  of its reverse edge), skip connection and residual layers, atom update (sum over incoming
  edges weighted by the RBF), atom-to-edge update (concatenation [h_j, h_i, m_ji]);
* ``num_blocks + 1`` output blocks (after the embedding and after each interaction), each a
  per-atom energy from the RBF-weighted sum of incoming edge embeddings; their sum is the
  (extensive) per-atom output.  Forces are −∂E/∂r by autograd (no direct-force head).

Activations are the scaled SiLU, silu(x)/0.6; dense layers have no bias; residual layers are
(x + σ(W₂σ(W₁x)))/√2 and every skip sum is divided by √2.  Weights use the HeOrthogonal
initialisation (:func:`he_orthogonal_`).

Scale factors: constants applied after each sum over neighbours/triplets and after the Hadamard
product with the RBF of the triplet interaction (names as in GemNet's scale files,
``TripInteraction_<b>_had_rbf``, ``TripInteraction_<b>_sum_cbf``, ``AtomUpdate_<b>_sum``,
``OutBlock_<b>_sum``).  They are buffers (saved in the state dict); without ``scale_file`` all
are 1.0, ``scale_file`` may be a JSON file (or a mapping) of these names, and
:func:`fit_scale_factors` fits them to data (``scale_file: auto`` in a config does that on the
training split, see :func:`mdsim.models.registry.resolve_hyperparameters`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .base import N_ELEMENTS, PotentialModel
from .dimenet_pp import triplets

INV_SQRT2 = 1.0 / math.sqrt(2.0)

#: keys of a scale file that belong to heads this model does not have (the direct-force head's
#: Hadamard factors ``OutBlock_<b>_had``) or carry no value; accepted and not used.
_UNUSED_SCALE_KEYS = ("comment",)


# ----------------------------------------------------------------------------- building blocks
def he_orthogonal_(weight: Tensor) -> Tensor:
    """HeOrthogonal initialisation (GemNet appendix): a random (semi-)orthogonal matrix, each
    output row then mean-centred and scaled to unit variance over its fan-in, finally scaled by
    1/√fan_in, so that Var(W x) ≈ Var(x) for unit-variance inputs.  ``weight`` is (out, in)."""
    with torch.no_grad():
        w = torch.empty(weight.shape, dtype=torch.float64)
        nn.init.orthogonal_(w)
        fan_in = w.shape[1]
        if fan_in > 1:
            w = (w - w.mean(dim=1, keepdim=True)) / w.std(dim=1, unbiased=False, keepdim=True).clamp_min(1e-12)
        w = w / math.sqrt(fan_in)
        weight.copy_(w.to(weight.dtype))
    return weight


class ScaledSiLU(nn.Module):
    """silu(x)/0.6: keeps the variance of unit-variance inputs near 1 (GemNet)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.silu(x) * (1.0 / 0.6)


class Dense(nn.Module):
    """Bias-free linear layer with HeOrthogonal weights and an optional scaled SiLU."""

    def __init__(self, n_in: int, n_out: int, activation: bool = True, init: str = "HeOrthogonal"):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=False)
        if init == "zeros":
            nn.init.zeros_(self.linear.weight)
        else:
            he_orthogonal_(self.linear.weight)
        self.act = ScaledSiLU() if activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.linear(x))


class Residual(nn.Module):
    """(x + σ(W₂ σ(W₁ x)))/√2."""

    def __init__(self, units: int):
        super().__init__()
        self.mlp = nn.Sequential(Dense(units, units), Dense(units, units))

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.mlp(x)) * INV_SQRT2


class ScaleFactor(nn.Module):
    """A named constant factor (buffer ``scale``).  While ``fitting`` is set, the next call sets
    it to √(E[ref²]/E[x²]) so that the output keeps the second moment of the operation's
    input ``ref`` (then clears ``fitting``)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.fitting = False
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    def forward(self, x: Tensor, ref: Tensor) -> Tensor:
        if self.fitting:
            with torch.no_grad():
                num = ref.detach().double().pow(2).mean()
                den = x.detach().double().pow(2).mean()
                if den > 0 and num > 0:
                    self.scale.fill_(float(torch.sqrt(num / den)))
            self.fitting = False
        return x * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}, scale={float(self.scale):.6g}"


def _mlp(units: int, n: int) -> nn.Sequential:
    return nn.Sequential(*[Residual(units) for _ in range(n)])


# ----------------------------------------------------------------------------- bases
class GaussianRBF(nn.Module):
    """Gaussians on the scaled distance x = d/c ∈ [0, 1] times the polynomial envelope."""

    def __init__(self, num_radial: int, cutoff: float, exponent: int):
        super().__init__()
        self.cutoff = float(cutoff)
        self.p = int(exponent)
        self.register_buffer("offsets", torch.linspace(0.0, 1.0, num_radial, dtype=torch.float64),
                             persistent=False)
        delta = 1.0 / (num_radial - 1)
        self.coeff = -0.5 / delta ** 2

    def envelope(self, x: Tensor) -> Tensor:
        p = self.p
        a, b, c = -(p + 1) * (p + 2) / 2.0, p * (p + 2.0), -p * (p + 1) / 2.0
        xp = x.pow(p)
        u = 1.0 + xp * (a + x * (b + c * x))
        return torch.where(x < 1.0, u, torch.zeros_like(u))

    def forward(self, d: Tensor) -> Tensor:
        x = (d / self.cutoff).clamp(max=1.0)
        g = torch.exp(self.coeff * (x.unsqueeze(-1) - self.offsets.to(x.dtype)) ** 2)
        return self.envelope(x).unsqueeze(-1) * g


def legendre_sph(cos_theta: Tensor, num_spherical: int) -> Tensor:
    """Real spherical harmonics Y_l0(θ) = √((2l+1)/4π) P_l(cos θ), l = 0…L−1, shape (T, L)."""
    p = [torch.ones_like(cos_theta), cos_theta]
    for l in range(1, num_spherical - 1):
        p.append(((2 * l + 1) * cos_theta * p[l] - l * p[l - 1]) / (l + 1))
    p = p[:num_spherical]
    norm = [math.sqrt((2 * l + 1) / (4 * math.pi)) for l in range(num_spherical)]
    return torch.stack([n * q for n, q in zip(norm, p)], dim=-1)


# ----------------------------------------------------------------------------- blocks
class TripletInteraction(nn.Module):
    def __init__(self, b: int, emb_edge: int, emb_trip: int, emb_rbf: int, emb_cbf: int,
                 emb_bil: int, num_spherical: int):
        super().__init__()
        self.dense_in = Dense(emb_edge, emb_edge)
        self.rbf_proj = Dense(emb_rbf, emb_edge, activation=False)
        self.scale_rbf = ScaleFactor(f"TripInteraction_{b}_had_rbf")
        self.down = Dense(emb_edge, emb_trip)
        self.scale_cbf = ScaleFactor(f"TripInteraction_{b}_sum_cbf")
        self.bilinear = Dense(emb_cbf * emb_trip, emb_bil, activation=False)
        self.up_ji = Dense(emb_bil, emb_edge)
        self.up_ij = Dense(emb_bil, emb_edge)
        self.num_spherical = num_spherical

    def forward(self, m: Tensor, rbf3: Tensor, sph: Tensor, rad_cbf: Tensor, idx_kj: Tensor,
                idx_ji: Tensor, rev: Tensor) -> Tensor:
        x = self.dense_in(m)
        x = self.scale_rbf(x * self.rbf_proj(rbf3), x)
        x = self.down(x)  # (E, trip)
        x_kj = x.index_select(0, idx_kj)  # (T, trip)
        n_edges = m.shape[0]
        # s[ji, l, :] = Σ_k Y_l0(θ_kji) x_kj  (one l at a time: keeps memory at T·trip)
        s = torch.stack([torch.zeros(n_edges, x.shape[1], dtype=x.dtype, device=x.device)
                         .index_add(0, idx_ji, sph[:, l:l + 1] * x_kj) for l in range(self.num_spherical)], 1)
        s = self.scale_cbf(s, x)
        # radial part of the CBF (edge ji) contracted with s: (E, cbf, L) @ (E, L, trip)
        u = torch.bmm(rad_cbf.transpose(1, 2), s).reshape(n_edges, -1)
        y = self.bilinear(u)
        return (self.up_ji(y) + self.up_ij(y).index_select(0, rev)) * INV_SQRT2


class EdgeToAtom(nn.Module):
    """Σ over incoming edges of m_ji ⊙ W e_RBF(d_ji), scaled, then dense + residual layers."""

    def __init__(self, name: str, emb_edge: int, emb_atom: int, emb_rbf: int, num_atom: int):
        super().__init__()
        self.rbf_proj = Dense(emb_rbf, emb_edge, activation=False)
        self.scale_sum = ScaleFactor(name)
        self.dense = Dense(emb_edge, emb_atom)
        self.res = _mlp(emb_atom, num_atom)

    def forward(self, m: Tensor, rbf: Tensor, target: Tensor, n_atoms: int) -> Tensor:
        x = m * self.rbf_proj(rbf)
        h = torch.zeros(n_atoms, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, target, x)
        h = self.scale_sum(h, m)
        return self.res(self.dense(h))


class InteractionBlock(nn.Module):
    def __init__(self, b: int, emb_atom: int, emb_edge: int, emb_trip: int, emb_rbf: int, emb_cbf: int,
                 emb_bil: int, num_spherical: int, num_before_skip: int, num_after_skip: int,
                 num_concat: int, num_atom: int):
        super().__init__()
        self.dense_skip = Dense(emb_edge, emb_edge)
        self.trip = TripletInteraction(b, emb_edge, emb_trip, emb_rbf, emb_cbf, emb_bil, num_spherical)
        self.before_skip = _mlp(emb_edge, num_before_skip)
        self.after_skip = _mlp(emb_edge, num_after_skip)
        self.atom_update = EdgeToAtom(f"AtomUpdate_{b}_sum", emb_edge, emb_atom, emb_rbf, num_atom)
        self.concat = Dense(2 * emb_atom + emb_edge, emb_edge)
        self.concat_res = _mlp(emb_edge, num_concat)

    def forward(self, h, m, rbf3, rbf_h, sph, rad_cbf, idx_kj, idx_ji, rev, source, target):
        x = (self.dense_skip(m) + self.trip(m, rbf3, sph, rad_cbf, idx_kj, idx_ji, rev)) * INV_SQRT2
        m = (m + self.before_skip(x)) * INV_SQRT2
        m = self.after_skip(m)
        h = (h + self.atom_update(m, rbf_h, target, h.shape[0])) * INV_SQRT2
        m2 = self.concat(torch.cat([h.index_select(0, source), h.index_select(0, target), m], dim=-1))
        m = (m + self.concat_res(m2)) * INV_SQRT2
        return h, m


class OutputBlock(nn.Module):
    def __init__(self, b: int, emb_edge: int, emb_atom: int, emb_rbf: int, num_atom: int, output_init: str):
        super().__init__()
        self.edge_to_atom = EdgeToAtom(f"OutBlock_{b}_sum", emb_edge, emb_atom, emb_rbf, num_atom)
        self.out = Dense(emb_atom, 1, activation=False,
                         init="zeros" if output_init == "zeros" else "HeOrthogonal")

    def forward(self, m, rbf, target, n_atoms) -> Tensor:
        return self.out(self.edge_to_atom(m, rbf, target, n_atoms)).squeeze(-1)


# ----------------------------------------------------------------------------- graph helpers
def reverse_edges(edge_index: Tensor, n_atoms: int, vec: Optional[Tensor] = None) -> Tensor:
    """For every directed edge j→i the index of its reverse edge i→j (the same image: vector
    −v_ji when ``vec`` is given, matched on a 1e-4 Å grid).  Raises if an edge has none."""
    src, dst = edge_index[0], edge_index[1]
    n_edges = src.shape[0]
    fwd = [src, dst]
    bwd = [dst, src]
    if vec is not None:
        q = torch.round(vec.detach().double() * 1e4).long()
        fwd += list(q.T)
        bwd += list((-q).T)
    keys = torch.cat([torch.stack(fwd, 1), torch.stack(bwd, 1)])
    _, inv = torch.unique(keys, dim=0, return_inverse=True)
    table = torch.full((2 * n_edges,), -1, dtype=torch.long, device=src.device)
    table[inv[:n_edges]] = torch.arange(n_edges, device=src.device)
    rev = table[inv[n_edges:]]
    if n_edges and bool((rev < 0).any()):
        raise RuntimeError("gemnet_t: the edge list is not symmetric (an edge j→i has no reverse i→j)")
    return rev


#: per (atoms per structure, structures, device) graph templates of the static all-pairs list
_TEMPLATES: Dict[Tuple[int, int, str], Tuple[Tensor, Tensor, Tensor]] = {}


def _all_pairs_template(edge_index: Tensor, n_atoms: int, n_structures: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(idx_kj, idx_ji, rev) of the equal-size all-pairs list, built once from one structure's
    list and cached (local → global edge ids: :func:`mdsim.geometry.all_pairs_global_index`)."""
    key = (n_atoms, n_structures, str(edge_index.device))
    out = _TEMPLATES.get(key)
    if out is None:
        from mdsim.geometry import all_pairs_edges, all_pairs_global_index
        ei = all_pairs_edges(n_atoms, 1, edge_index.device)
        kj, ji = triplets(ei, n_atoms)
        rev = reverse_edges(ei, n_atoms)
        glob = lambda local: all_pairs_global_index(local, n_atoms, n_structures)  # noqa: E731
        rev_g = torch.empty(n_structures * ei.shape[1], dtype=torch.long, device=ei.device)
        rev_g[glob(torch.arange(ei.shape[1], device=ei.device)).reshape(-1)] = glob(rev).reshape(-1)
        out = (glob(kj).reshape(-1), glob(ji).reshape(-1), rev_g)
        if len(_TEMPLATES) >= 32:
            del _TEMPLATES[next(iter(_TEMPLATES))]
        _TEMPLATES[key] = out
    return out


def neighbor_rank(target: Tensor, dist: Tensor, n_atoms: int) -> Tensor:
    """Rank of each edge by distance among the edges arriving at the same atom (0 = nearest)."""
    order = torch.argsort(dist.detach(), stable=True)
    order = order[torch.argsort(target[order], stable=True)]
    counts = torch.zeros(n_atoms, dtype=torch.long, device=target.device).index_add(
        0, target, torch.ones_like(target))  # bincount's shape is data-dependent under compile
    ptr = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device) - ptr[target[order]]
    return rank


# ----------------------------------------------------------------------------- model
def _option_name(value, key: str, default: str) -> Tuple[str, dict]:
    if value is None:
        return default, {}
    if isinstance(value, str):
        return value.lower(), {}
    if isinstance(value, Mapping) and "name" in value:
        rest = {k: v for k, v in value.items() if k != "name"}
        return str(value["name"]).lower(), rest
    raise ValueError(f"gemnet_t: {key} must be a name or a mapping with a 'name' key, got {value!r}")


def read_scale_file(scale_file: Union[str, Path, Mapping]) -> Dict[str, float]:
    """Scale factors from a JSON file ({name: value}) or a mapping."""
    if isinstance(scale_file, Mapping):
        data = dict(scale_file)
    else:
        p = Path(scale_file)
        if not p.is_file():
            raise FileNotFoundError(f"gemnet_t: scale_file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"gemnet_t: scale_file {p} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ValueError(f"gemnet_t: scale_file {p} must hold a JSON object of name: value")
    out = {}
    for k, v in data.items():
        if k in _UNUSED_SCALE_KEYS:
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"gemnet_t: scale factor {k!r} must be a finite number, got {v!r}")
        out[str(k)] = float(v)
    return out


class GemNetTModel(PotentialModel):
    model_name = "gemnet_t"

    def __init__(self, num_spherical: int = 7, num_radial: int = 6, num_blocks: int = 4,
                 emb_size_atom: int = 128, emb_size_edge: int = 128, emb_size_trip: int = 64,
                 emb_size_rbf: int = 16, emb_size_cbf: int = 16, emb_size_bil_trip: int = 64,
                 num_before_skip: int = 1, num_after_skip: int = 1, num_concat: int = 1,
                 num_atom: int = 2, cutoff: float = 5.0, max_neighbors: Optional[int] = 50,
                 rbf=None, envelope=None, cbf=None, output_init: str = "HeOrthogonal",
                 activation: str = "silu", scale_file=None, extensive: bool = True,
                 direct_forces: bool = False):
        super().__init__(cutoff)
        rbf_name, rbf_rest = _option_name(rbf, "rbf", "gaussian")
        env_name, env_rest = _option_name(envelope, "envelope", "polynomial")
        cbf_name, cbf_rest = _option_name(cbf, "cbf", "spherical_harmonics")
        if rbf_name != "gaussian" or rbf_rest:
            raise ValueError(f"gemnet_t: rbf must be {{name: gaussian}} (the original's setting), got {rbf!r}")
        if env_name != "polynomial" or set(env_rest) - {"exponent"}:
            raise ValueError(f"gemnet_t: envelope must be {{name: polynomial, exponent: p}}, got {envelope!r}")
        if cbf_name != "spherical_harmonics" or cbf_rest:
            raise ValueError(f"gemnet_t: cbf must be {{name: spherical_harmonics}}, got {cbf!r}")
        exponent = int(env_rest.get("exponent", 5))
        if exponent < 1:
            raise ValueError(f"gemnet_t: envelope.exponent must be >= 1, got {exponent}")
        if str(activation).lower() not in ("silu", "swish"):
            raise ValueError(f"gemnet_t: activation must be 'silu' (scaled SiLU), got {activation!r}")
        if output_init not in ("HeOrthogonal", "zeros"):
            raise ValueError(f"gemnet_t: output_init must be 'HeOrthogonal' or 'zeros', got {output_init!r}")
        if not extensive:
            raise ValueError("gemnet_t: extensive: false (mean readout) is not supported; energies are sums of "
                             "per-atom terms")
        if direct_forces:
            raise ValueError("gemnet_t: direct_forces: true is not supported; forces are −∂E/∂r (autograd)")
        if num_radial < 2 or num_spherical < 1 or num_blocks < 1:
            raise ValueError(f"gemnet_t: need num_radial >= 2, num_spherical >= 1, num_blocks >= 1, got "
                             f"{num_radial}, {num_spherical}, {num_blocks}")
        if max_neighbors is not None and int(max_neighbors) < 1:
            raise ValueError(f"gemnet_t: max_neighbors must be >= 1 or null, got {max_neighbors}")
        self.max_neighbors = None if max_neighbors is None else int(max_neighbors)
        self.num_spherical = int(num_spherical)
        self.emb_size_cbf = int(emb_size_cbf)

        self.rbf_basis = GaussianRBF(num_radial, cutoff, exponent)
        # shared projections of the bases (computed once per forward, used by every block)
        self.mlp_rbf3 = Dense(num_radial, emb_size_rbf, activation=False)
        self.mlp_cbf3 = Dense(num_radial, num_spherical * emb_size_cbf, activation=False)
        self.mlp_rbf_h = Dense(num_radial, emb_size_rbf, activation=False)
        self.mlp_rbf_out = Dense(num_radial, emb_size_rbf, activation=False)

        self.atom_emb = nn.Embedding(N_ELEMENTS, emb_size_atom)
        nn.init.uniform_(self.atom_emb.weight, -math.sqrt(3.0), math.sqrt(3.0))
        self.edge_emb = Dense(2 * emb_size_atom + num_radial, emb_size_edge)
        self.int_blocks = nn.ModuleList([
            InteractionBlock(b + 1, emb_size_atom, emb_size_edge, emb_size_trip, emb_size_rbf, emb_size_cbf,
                             emb_size_bil_trip, num_spherical, num_before_skip, num_after_skip, num_concat,
                             num_atom) for b in range(num_blocks)])
        self.out_blocks = nn.ModuleList([
            OutputBlock(b, emb_size_edge, emb_size_atom, emb_size_rbf, num_atom, output_init)
            for b in range(num_blocks + 1)])

        if isinstance(scale_file, str) and scale_file == "auto":
            raise ValueError("gemnet_t: scale_file 'auto' is resolved from training data by "
                             "mdsim.models.resolve_hyperparameters (or call fit_scale_factors)")
        if scale_file is not None:
            self.load_scale_factors(read_scale_file(scale_file))
        self.hyperparameters = dict(
            num_spherical=int(num_spherical), num_radial=int(num_radial), num_blocks=int(num_blocks),
            emb_size_atom=int(emb_size_atom), emb_size_edge=int(emb_size_edge), emb_size_trip=int(emb_size_trip),
            emb_size_rbf=int(emb_size_rbf), emb_size_cbf=int(emb_size_cbf),
            emb_size_bil_trip=int(emb_size_bil_trip), num_before_skip=int(num_before_skip),
            num_after_skip=int(num_after_skip), num_concat=int(num_concat), num_atom=int(num_atom),
            cutoff=float(cutoff), max_neighbors=self.max_neighbors,
            rbf={"name": "gaussian"}, envelope={"name": "polynomial", "exponent": exponent},
            cbf={"name": "spherical_harmonics"}, output_init=str(output_init), activation="silu",
            # the factors themselves (not a path), so that checkpoints rebuild anywhere
            scale_file=None if scale_file is None else self.scale_factor_values(),
            extensive=True, direct_forces=False)

    # ------------------------------------------------------------------ scale factors
    def scale_factors(self) -> Dict[str, ScaleFactor]:
        return {m.name: m for m in self.modules() if isinstance(m, ScaleFactor)}

    def scale_factor_values(self) -> Dict[str, float]:
        """{name: value} of all scale factors (the layout of a scale file)."""
        return {k: float(m.scale) for k, m in self.scale_factors().items()}

    def load_scale_factors(self, values: Mapping[str, float]) -> None:
        """Set the scale factors by name; every factor must be given, unknown names raise
        (``OutBlock_<b>_had``, the direct-force head's factors, are accepted and unused)."""
        factors = self.scale_factors()
        unused = {k for k in values if k.startswith("OutBlock_") and k.endswith("_had")}
        unknown = sorted(set(values) - set(factors) - unused)
        missing = sorted(set(factors) - set(values))
        if unknown or missing:
            raise ValueError(f"gemnet_t: scale factors do not fit the model: unknown {unknown}, missing {missing}")
        with torch.no_grad():
            for k, m in factors.items():
                m.scale.fill_(float(values[k]))

    # ------------------------------------------------------------------ graph
    def _graph(self, positions, batch, n_structures, cell, equal_size):
        edge_index, vec = self.edges(positions, batch, n_structures, cell, equal_size)
        n_atoms = positions.shape[0]
        if cell is None and equal_size:
            idx_kj, idx_ji, rev = _all_pairs_template(edge_index, n_atoms // n_structures, n_structures)
        else:
            # vectors serve as image labels: v_kj + v_ji is exactly 0 for a back-tracking pair
            idx_kj, idx_ji = triplets(edge_index, n_atoms, vec.detach())
            rev = reverse_edges(edge_index, n_atoms, vec if cell is not None else None)
        return edge_index, vec, idx_kj, idx_ji, rev

    def atomic_outputs(self, positions: Tensor, atomic_numbers: Tensor, batch: Tensor,
                       n_structures: int, cell: Optional[Tensor] = None,
                       equal_size: Optional[bool] = None) -> Tensor:
        edge_index, vec, idx_kj, idx_ji, rev = self._graph(positions, batch, n_structures, cell, equal_size)
        source, target = edge_index[0], edge_index[1]
        n_atoms = positions.shape[0]
        dist = vec.norm(dim=-1)
        if self.max_neighbors is not None:
            # only the nearest max_neighbors edges arriving at each atom count: the others get
            # the cutoff distance, where every basis function vanishes (no energy, no force)
            far = neighbor_rank(target, dist, n_atoms) >= self.max_neighbors
            dist = torch.where(far, torch.full_like(dist, self.cutoff), dist)
        dist = dist.clamp(max=self.cutoff)
        # angle θ_kji at j between r_k − r_j = −v_kj and r_i − r_j = v_ji
        v_ji, v_kj = vec.index_select(0, idx_ji), vec.index_select(0, idx_kj)
        cos = -(v_ji * v_kj).sum(-1) / (v_ji.norm(dim=-1) * v_kj.norm(dim=-1))
        sph = legendre_sph(cos, self.num_spherical)  # (T, L)

        rbf = self.rbf_basis(dist)  # (E, R)
        rbf3 = self.mlp_rbf3(rbf)
        rbf_h = self.mlp_rbf_h(rbf)
        rbf_out = self.mlp_rbf_out(rbf)
        rad_cbf = self.mlp_cbf3(rbf).reshape(-1, self.num_spherical, self.emb_size_cbf)  # (E, L, cbf)

        h = self.atom_emb(atomic_numbers)
        m = self.edge_emb(torch.cat([h.index_select(0, source), h.index_select(0, target), rbf], dim=-1))
        energy = self.out_blocks[0](m, rbf_out, target, n_atoms)
        for block, out in zip(self.int_blocks, self.out_blocks[1:]):
            h, m = block(h, m, rbf3, rbf_h, sph, rad_cbf, idx_kj, idx_ji, rev, source, target)
            energy = energy + out(m, rbf_out, target, n_atoms)
        return energy


# ----------------------------------------------------------------------------- fitting
def fit_scale_factors(model: GemNetTModel, inputs: Mapping) -> Dict[str, float]:
    """Fit every scale factor on one batch (``inputs``: keyword arguments of the model, e.g.
    from :func:`mdsim.models.batch_from_frames` with several frames) in a single forward pass:
    factors are set in forward order, each to √(E[ref²]/E[x²]) of its operation (the sum over
    neighbours or triplets, the product with the RBF) with the factors before it already fitted,
    so that each keeps the second moment of its input.  Returns {name: value}."""
    factors = model.scale_factors()
    for m in factors.values():
        m.scale.fill_(1.0)
        m.fitting = True
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for m in factors.values():
            m.fitting = False
    return model.scale_factor_values()


def fit_scale_factors_on_split(hyperparameters: Mapping, data, n_frames: int = 16) -> Dict[str, float]:
    """Scale factors for a GemNet-T with these hyperparameters, fitted (:func:`fit_scale_factors`)
    on the first ``n_frames`` frames of a split (:class:`mdsim.data.format.SplitData`) with a
    freshly initialised float64 model.  The global RNG state is left untouched, so the model
    built afterwards gets the same initial weights as without fitting."""
    from .base import batch_from_frames

    import inspect

    accepted = set(inspect.signature(GemNetTModel.__init__).parameters) - {"self", "scale_file"}
    hp = {k: v for k, v in hyperparameters.items() if k in accepted}  # inert config keys dropped
    with torch.random.fork_rng(devices=[]):
        model = GemNetTModel(**hp).double()
    idx = slice(0, min(len(data), int(n_frames)))
    cell = None if data.cell is None else data.cell[idx]
    inputs = batch_from_frames(data.R[idx], data.z, cell=cell, dtype=torch.float64)
    return fit_scale_factors(model, inputs)
