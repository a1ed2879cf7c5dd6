"""MD integrators as small functions over the batched :class:`~mdsim.md.state.MDState`.

Each step has the form ``step(state, force_fn, dt, **params, generator=None) -> MDState`` with
``force_fn(positions (R,N,3), cell) -> (energy (R,), forces (R,N,3))`` (a
:class:`~mdsim.md.forces.ForceField`), ``dt`` in ASE time units, temperatures in K and
friction rates in 1/ASE-time.  A step makes exactly one force call, returns a new state
(inputs are not modified), keeps shapes static and never synchronises with the host, so it
can run under CUDA graphs / ``torch.compile``.

``generator`` is a ``torch.Generator`` (one noise stream for the batch) or a sequence of R
generators (one stream per replica: a batched run then equals R single-replica runs with the
same seeds, at some cost).  :func:`make_integrator` converts config units (fs, ps⁻¹) and
returns an :class:`Integrator`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from mdsim.md.state import MDState
from mdsim.units import FS, KB, PS

ForceFn = Callable[[Tensor, Optional[Tensor]], Tuple[Tensor, Tensor]]
GeneratorLike = Union[None, torch.Generator, Sequence[torch.Generator]]


def randn_like_replicas(x: Tensor, generator: GeneratorLike = None) -> Tensor:
    """Standard normal noise shaped like ``x`` (R, ...).  With a sequence of generators,
    replica r draws from ``generator[r]``.  Noise is drawn on the generator's device (keep the
    generator on the simulation device to avoid copies)."""
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=generator.device).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"generator: got {len(gens)} per-replica generators for {x.shape[0]} replicas")
    return torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=g.device).to(x.device)
                        for g in gens])


def _inv_mass(state: MDState) -> Tensor:
    return (1.0 / state.masses).to(state.positions.dtype)[None, :, None]


def _advance(state: MDState, **kw) -> MDState:
    return replace(state, step=state.step + 1, **kw)


def velocity_verlet_step(state: MDState, force_fn: ForceFn, dt: float, generator: GeneratorLike = None) -> MDState:
    """Velocity Verlet (NVE): v½ = v + (dt/2)F/m; x' = x + dt v½; v' = v½ + (dt/2)F(x')/m."""
    im = _inv_mass(state)
    v_half = state.velocities + (0.5 * dt) * state.forces * im
    x = state.positions + dt * v_half
    e, f = force_fn(x, state.cell)
    v = v_half + (0.5 * dt) * f * im
    return _advance(state, positions=x, velocities=v, forces=f, energy=e)


def langevin_baoab_step(state: MDState, force_fn: ForceFn, dt: float, temperature: float, gamma: float,
                        generator: GeneratorLike = None, noise: Optional[Tensor] = None) -> MDState:
    """Langevin dynamics, BAOAB splitting (Leimkuhler & Matthews 2013).

    B: v += (dt/2)F/m;  A: x += (dt/2)v;  O: v ← c₁v + √((1−c₁²)k_BT/m)·ξ, c₁ = e^{−γdt};
    A: x += (dt/2)v;  F ← F(x);  B: v += (dt/2)F/m.
    The O step is the exact Ornstein–Uhlenbeck solution, so any γ ≥ 0 is stable; configurational
    sampling is exact for harmonic potentials and O(dt²) accurate in general.  ``gamma`` in
    1/ASE-time, ``temperature`` in K.  ``noise`` (R,N,3): the standard normal ξ to use instead
    of drawing it from ``generator`` (pre-drawn noise for compiled/captured steps)."""
    im = _inv_mass(state)
    c1 = math.exp(-gamma * dt)
    c2 = math.sqrt(max(1.0 - c1 * c1, 0.0) * KB * temperature)
    v = state.velocities + (0.5 * dt) * state.forces * im
    x = state.positions + (0.5 * dt) * v
    xi = randn_like_replicas(v, generator) if noise is None else noise
    v = c1 * v + c2 * im.sqrt() * xi
    x = x + (0.5 * dt) * v
    e, f = force_fn(x, state.cell)
    v = v + (0.5 * dt) * f * im
    return _advance(state, positions=x, velocities=v, forces=f, energy=e)


def langevin_original_step(state: MDState, force_fn: ForceFn, dt: float, temperature: float, gamma: float,
                           generator: GeneratorLike = None, noise: Optional[Tensor] = None) -> MDState:
    """The original implementation's Euler-type Langevin update (kept for comparison):
    x' = x + dt v;  v' = v + dt(F(x')/m − γv) + √(2γk_BT dt/m)·ξ.
    First order; its stationary temperature deviates from T by O(dt) (symplectic-Euler-like).
    ``noise``: pre-drawn standard normal ξ (R,N,3), as for :func:`langevin_baoab_step`."""
    im = _inv_mass(state)
    x = state.positions + dt * state.velocities
    e, f = force_fn(x, state.cell)
    xi = randn_like_replicas(x, generator) if noise is None else noise
    kick = math.sqrt(2.0 * gamma * KB * temperature * dt) * im.sqrt() * xi
    v = state.velocities + dt * (f * im - gamma * state.velocities) + kick
    return _advance(state, positions=x, velocities=v, forces=f, energy=e)


def nose_hoover_mass(n_atoms: int, temperature: float, ttime: float, dt: float, dof: Optional[int] = None) -> float:
    """Thermostat mass Q = g k_BT (ttime·dt)² (eV·ASE-time²) with g = ``dof`` degrees of
    freedom (default 3N, the original's)."""
    g = 3 * n_atoms if dof is None else dof
    return g * KB * temperature * (ttime * dt) ** 2


def nose_hoover_step(state: MDState, force_fn: ForceFn, dt: float, temperature: float, ttime: float = 20.0,
                     generator: GeneratorLike = None, fixed_dof: int = 0) -> MDState:
    """Single Nosé–Hoover thermostat per replica, the original's velocity-Verlet-like scheme:

    a = F/m;  x' = x + v dt + (a − ζv) dt²/2;  v½ = v + (dt/2)(a − ζv);  F' = F(x');
    ζ½ = ζ + dt(K₀ − K*)/(2Q);  ζ' = ζ½ + dt(½Σm v½² − K*)/(2Q);
    v' = (v½ + (dt/2)F'/m)/(1 + (dt/2)ζ'),
    with K₀ = ½Σmv², K* = (g/2)k_BT, Q = g k_BT (ttime·dt)², g = 3N − ``fixed_dof`` (3 when the
    net momentum is zero and conserved, 0 in the original).  ζ is (R,), in 1/ASE-time."""
    N = state.n_atoms
    g = 3 * N - fixed_dof if 3 * N > fixed_dof else 3 * N
    m = state.masses.to(state.positions.dtype)[None, :, None]
    im = 1.0 / m
    k_target = 0.5 * g * KB * temperature
    q = nose_hoover_mass(N, temperature, ttime, dt, dof=g)
    zeta = state.zeta.to(state.positions.dtype)
    z3 = zeta[:, None, None]
    v = state.velocities
    acc = state.forces * im - z3 * v
    x = state.positions + dt * v + (0.5 * dt * dt) * acc
    k0 = 0.5 * (m * v * v).sum(dim=(1, 2))
    v_half = v + (0.5 * dt) * acc
    e, f = force_fn(x, state.cell)
    zeta_half = zeta + dt * (k0 - k_target) / (2.0 * q)
    k_half = 0.5 * (m * v_half * v_half).sum(dim=(1, 2))
    zeta_new = zeta_half + dt * (k_half - k_target) / (2.0 * q)
    v_new = (v_half + (0.5 * dt) * f * im) / (1.0 + (0.5 * dt) * zeta_new)[:, None, None]
    return _advance(state, positions=x, velocities=v_new, forces=f, energy=e, zeta=zeta_new)


@dataclass(frozen=True)
class IntegratorSpec:
    """Registry entry: the step function, whether it draws noise, and whether the dynamics
    conserves the total momentum (then the zero net momentum set at initialisation stays zero
    and 3 of the 3N degrees of freedom are frozen)."""

    fn: Callable
    stochastic: bool
    conserves_momentum: bool


#: the integrators (config ``integrator``, ``simulator.py --integrator``): the one registry
INTEGRATORS = {
    "VelocityVerlet": IntegratorSpec(velocity_verlet_step, stochastic=False, conserves_momentum=True),
    "Langevin": IntegratorSpec(langevin_baoab_step, stochastic=True, conserves_momentum=False),
    "LangevinOriginal": IntegratorSpec(langevin_original_step, stochastic=True, conserves_momentum=False),
    "NoseHoover": IntegratorSpec(nose_hoover_step, stochastic=False, conserves_momentum=True),
}
INTEGRATOR_NAMES = tuple(INTEGRATORS)

#: degree-of-freedom conventions (config ``dof_convention``): ``physical`` counts 3N − 3 when
#: the dynamics conserves the (zeroed) net momentum, else 3N; ``original`` counts 3N always
DOF_CONVENTIONS = ("physical", "original")


def degrees_of_freedom(n_atoms: int, conserves_momentum: bool, convention: str = "physical") -> int:
    """Kinetic degrees of freedom g of ``n_atoms`` atoms (see :data:`DOF_CONVENTIONS`)."""
    if convention not in DOF_CONVENTIONS:
        raise ValueError(f"dof_convention: expected one of {DOF_CONVENTIONS}, got {convention!r}")
    if convention == "original" or not conserves_momentum or n_atoms < 2:
        return 3 * n_atoms
    return 3 * n_atoms - 3


@dataclass
class Integrator:
    """A configured integrator: ``integrator.step(state, force_fn, generator=None)``.

    Built by :func:`make_integrator`; ``params`` are in internal units (ASE time, K)."""

    name: str
    fn: Callable
    dt: float
    params: dict = field(default_factory=dict)
    stochastic: bool = False
    conserves_momentum: bool = False
    dof_convention: str = "physical"

    def dof(self, n_atoms: int) -> int:
        """Degrees of freedom g the dynamics has (kinetic temperature 2K/(g k_B), initial
        velocities rescaled to (g/2)k_BT): 3N − 3 if it conserves the zeroed net momentum
        (VelocityVerlet, NoseHoover), 3N under Langevin; 3N always with ``dof_convention``
        ``original``."""
        return degrees_of_freedom(n_atoms, self.conserves_momentum, self.dof_convention)

    @property
    def timestep_fs(self) -> float:
        return self.dt / FS

    def step(self, state: MDState, force_fn: ForceFn, generator: GeneratorLike = None,
             noise: Optional[Tensor] = None) -> MDState:
        """One step.  ``noise`` (stochastic integrators only): the pre-drawn standard normal
        (R,N,3) from :meth:`draw_noise`, used instead of drawing from ``generator``."""
        if noise is not None:
            if not self.stochastic:
                raise ValueError(f"integrator {self.name} is deterministic and takes no noise")
            return self.fn(state, force_fn, self.dt, generator=generator, noise=noise, **self.params)
        return self.fn(state, force_fn, self.dt, generator=generator, **self.params)

    def draw_noise(self, state: MDState, generator: GeneratorLike = None) -> Optional[Tensor]:
        """The standard normal noise one step would draw from ``generator`` (None for
        deterministic integrators): drawing it here and passing it to :meth:`step` gives the
        same result as letting the step draw it, and keeps the RNG outside compiled or
        captured code."""
        if not self.stochastic:
            return None
        return randn_like_replicas(state.velocities, generator)


def make_integrator(name: str, timestep_fs: float, temperature_K: Optional[float] = None,
                    integrator_config: Optional[dict] = None, dof_convention: str = "physical") -> Integrator:
    """Integrator from config units.

    ``name``: a key of :data:`INTEGRATORS` — VelocityVerlet | Langevin (BAOAB) |
    LangevinOriginal (the original's Euler-type scheme) | NoseHoover.  ``integrator_config``:
    ``gamma`` (ps⁻¹, γ = gamma/(1000 fs), default 0.1) for Langevin, ``ttime`` (in timesteps,
    default 20) for Nosé–Hoover.  ``dof_convention``: see :data:`DOF_CONVENTIONS` (sets the
    Nosé–Hoover target and :meth:`Integrator.dof`)."""
    cfg = dict(integrator_config or {})
    if not (isinstance(timestep_fs, (int, float)) and timestep_fs > 0):
        raise ValueError(f"timestep: expected a positive number of fs, got {timestep_fs!r}")
    dt = float(timestep_fs) * FS
    if name not in INTEGRATORS:
        raise ValueError(f"integrator: expected one of {INTEGRATOR_NAMES}, got {name!r}")
    if dof_convention not in DOF_CONVENTIONS:
        raise ValueError(f"dof_convention: expected one of {DOF_CONVENTIONS}, got {dof_convention!r}")
    spec = INTEGRATORS[name]
    if name != "VelocityVerlet":
        if temperature_K is None or not temperature_K > 0:
            raise ValueError(f"temperature: integrator {name} needs a positive temperature in K, got {temperature_K!r}")
    params: dict = {}
    if name in ("Langevin", "LangevinOriginal"):
        gamma_ps = float(cfg.get("gamma", 0.1))
        if gamma_ps < 0:
            raise ValueError(f"integrator_config.gamma: expected a friction >= 0 in 1/ps, got {gamma_ps}")
        params = {"temperature": float(temperature_K), "gamma": gamma_ps / PS}
    elif name == "NoseHoover":
        ttime = float(cfg.get("ttime", 20.0))
        if not ttime > 0:
            raise ValueError(f"integrator_config.ttime: expected a positive number of timesteps, got {ttime}")
        params = {"temperature": float(temperature_K), "ttime": ttime}
        if dof_convention == "physical":
            params["fixed_dof"] = 3
    return Integrator(name, spec.fn, dt, params, stochastic=spec.stochastic,
                      conserves_momentum=spec.conserves_momentum, dof_convention=dof_convention)
