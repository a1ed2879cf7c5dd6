"""Simulation output: extxyz trajectories and ``thermo.csv``.

* Trajectories: one extended-XYZ file per replica, ``<out_dir>/replica_<r>.extxyz``, one frame
  per dump (every ``n_dump`` steps).  Each frame holds positions (Å), masses, momenta (ASE
  units; ``atoms.get_velocities()`` gives Å/ASE-time, ×``mdsim.units.FS`` for Å/fs), energy
  and forces (SinglePointCalculator, eV and eV/Å), cell/pbc when periodic, and ``info``
  keys ``replica``, ``step``, ``time_fs``, ``stable``.  Read back with
  ``ase.io.read(path, ":")``.
* ``thermo.csv``: header ``time_fs,replica,epot,ekin,temperature,stable``; one line per
  replica per dump (eV, K, stable as 0/1).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from mdsim.md.state import kinetic_temperature

THERMO_HEADER = ("time_fs", "replica", "epot", "ekin", "temperature", "stable")


def state_to_host(state) -> dict:
    """Detached float64 numpy copies of what the writers need (one device→host transfer)."""
    ekin = state.kinetic_energy()
    out = {
        "positions": state.positions, "velocities": state.velocities, "forces": state.forces,
        "energy": state.energy, "ekin": ekin, "stable": state.stable, "replica": state.replica,
    }
    if state.cell is not None:
        out["cell"] = state.cell
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


class ThermoWriter:
    """Appends per-replica thermodynamic lines to ``thermo.csv``."""

    def __init__(self, path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        exists = self.path.is_file() and self.path.stat().st_size > 0
        self._fh = open(self.path, "a" if append else "w", newline="")
        self._w = csv.writer(self._fh)
        if not (append and exists):
            self._w.writerow(THERMO_HEADER)

    def write(self, time_fs: float, host: dict, dof: int, stable: Optional[np.ndarray] = None) -> None:
        """One line per replica; ``dof``: degrees of freedom of the kinetic temperature."""
        stable = host["stable"] if stable is None else stable
        temp = kinetic_temperature(host["ekin"], dof)
        for r in range(host["energy"].shape[0]):
            self._w.writerow((f"{time_fs:.6g}", int(host["replica"][r]), f"{host['energy'][r]:.10g}",
                              f"{host['ekin'][r]:.10g}", f"{temp[r]:.6g}", int(bool(stable[r]))))
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


class TrajectoryWriter:
    """Appends frames of selected replicas to one extxyz file per replica."""

    def __init__(self, out_dir, atomic_numbers, masses, replicas: Optional[Sequence[int]] = None,
                 pbc=False, append: bool = False, prefix: str = "replica_"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.numbers = np.asarray(torch.as_tensor(atomic_numbers).cpu().numpy(), dtype=np.int64)
        self.masses = np.asarray(torch.as_tensor(masses).detach().cpu().numpy(), dtype=np.float64)
        self.replicas = None if replicas is None else [int(r) for r in replicas]
        self.pbc = bool(pbc)
        self.prefix = prefix
        self._started = set() if not append else None

    def path(self, replica: int) -> Path:
        return self.out_dir / f"{self.prefix}{int(replica):04d}.extxyz"

    def write(self, time_fs: float, step: int, host: dict, stable: Optional[np.ndarray] = None) -> None:
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.io import write

        stable = host["stable"] if stable is None else stable
        R = host["positions"].shape[0]
        reps = range(R) if self.replicas is None else [r for r in self.replicas if r < R]
        for r in reps:
            rid = int(host["replica"][r])
            kw = {}
            if "cell" in host:
                kw = {"cell": host["cell"][r], "pbc": self.pbc}
            atoms = Atoms(numbers=self.numbers, positions=host["positions"][r], masses=self.masses, **kw)
            atoms.set_velocities(host["velocities"][r])
            atoms.calc = SinglePointCalculator(atoms, energy=float(host["energy"][r]), forces=host["forces"][r])
            atoms.info.update(replica=rid, step=int(step), time_fs=float(time_fs), stable=bool(stable[r]))
            p = self.path(rid)
            append = True
            if self._started is not None and rid not in self._started:
                append = False
                self._started.add(rid)
            write(p, atoms, format="extxyz", append=append)

    def close(self) -> None:
        pass
