"""The batched MD state: R replicas of one system stepped together."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
from torch import Tensor

from mdsim.units import KB


def kinetic_energy(velocities: Tensor, masses: Tensor) -> Tensor:
    """(R,) kinetic energy ½Σmv² in eV of velocities (R,N,3) with masses (N,)."""
    return 0.5 * (masses[None, :, None] * velocities ** 2).sum(dim=(1, 2))


def kinetic_temperature(ekin, dof):
    """Instantaneous kinetic temperature 2K/(g k_B) in K: ``ekin`` in eV (tensor or array),
    ``dof`` g the degrees of freedom of the dynamics (see
    :meth:`mdsim.md.integrators.Integrator.dof`).  The one place this is computed."""
    return 2.0 * ekin / (dof * KB)


@dataclass
class MDState:
    positions: Tensor  # (R, N, 3) Å, unwrapped
    velocities: Tensor  # (R, N, 3) Å / ASE time
    forces: Tensor  # (R, N, 3) eV/Å at ``positions``
    energy: Tensor  # (R,) eV potential energy at ``positions``
    masses: Tensor  # (N,) amu
    cell: Optional[Tensor] = None  # (R, 3, 3) Å or None
    zeta: Optional[Tensor] = None  # (R,) Nosé–Hoover friction (1/ASE time)
    step: Optional[Tensor] = None  # (R,) long, steps since the replica's last (re)start
    stable: Optional[Tensor] = None  # (R,) bool, False once a replica went unstable
    replica: Optional[Tensor] = None  # (R,) long, replica id

    def __post_init__(self):
        R = self.positions.shape[0]
        dev = self.positions.device
        if self.zeta is None:
            self.zeta = torch.zeros(R, dtype=self.positions.dtype, device=dev)
        if self.step is None:
            self.step = torch.zeros(R, dtype=torch.long, device=dev)
        if self.stable is None:
            self.stable = torch.ones(R, dtype=torch.bool, device=dev)
        if self.replica is None:
            self.replica = torch.arange(R, device=dev)

    @property
    def n_replicas(self) -> int:
        return int(self.positions.shape[0])

    @property
    def n_atoms(self) -> int:
        return int(self.positions.shape[1])

    def kinetic_energy(self) -> Tensor:
        """(R,) eV."""
        return kinetic_energy(self.velocities, self.masses)

    def temperature(self, dof: Optional[int] = None) -> Tensor:
        """(R,) instantaneous kinetic temperature in K over ``dof`` degrees of freedom — pass
        the integrator's (:meth:`~mdsim.md.integrators.Integrator.dof`); default 3N."""
        return kinetic_temperature(self.kinetic_energy(), 3 * self.n_atoms if dof is None else dof)

    def clone(self) -> "MDState":
        return replace(self, **{f.name: (getattr(self, f.name).clone() if getattr(self, f.name) is not None
                                         and f.name != "masses" else getattr(self, f.name))
                                for f in fields(self)})

    def put(self, idx, other: "MDState") -> "MDState":
        """A copy whose replicas ``idx`` are ``other``'s (``other`` holds exactly those, in order);
        the others are this state's (masses shared)."""
        kw = {}
        for f in fields(self):
            v, w = getattr(self, f.name), getattr(other, f.name)
            if v is None or f.name == "masses":
                kw[f.name] = v
            else:
                v = v.clone()
                v[idx] = w.to(v)
                kw[f.name] = v
        return MDState(**kw)

    def select(self, idx) -> "MDState":
        """State restricted to replicas ``idx`` (masses shared)."""
        kw = {}
        for f in fields(self):
            v = getattr(self, f.name)
            kw[f.name] = v if (v is None or f.name == "masses") else v[idx]
        return MDState(**kw)
