"""Offline reference data: GFN2-xTB Langevin trajectories (tblite + ASE).

The trajectory is written as an MD17-format npz (``R`` Å, ``z``, ``E`` (T,1) kcal/mol,
``F`` kcal/mol/Å) plus ``V`` (Å/fs) and scalar metadata (``theory``, ``md_timestep_fs``,
``temperature_K``, ``thermostat``, ``seed``, ``mean_kinetic_temperature_K``, ...).  Every MD
step after the equilibration is one frame, so frames are consecutive ``timestep_fs`` apart.

Thermostat: ASE ``Langevin(fixcm=False)`` (with ``fixcm=True`` ASE removes the centre-of-mass
motion, which is wrong for a small isolated molecule's 3N-dof canonical ensemble).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mdsim.atomic import atomic_write
from mdsim.data.format import DataError
from mdsim.units import FS, KB, KCAL_MOL

STRUCTURE_DIR = Path(__file__).resolve().parent / "structures"

#: molecule name → ASE g2 name, or a file in :data:`STRUCTURE_DIR`.  Any other ASE g2 name
#: is accepted as well; anything else needs ``init=`` (an xyz or other ASE-readable file).
XTB_MOLECULES = {
    "ethanol": "CH3CH2OH",
    "benzene": "C6H6",
    "water": "H2O",
    "methane": "CH4",
    "acetic_acid": "CH3COOH",
    "aspirin": "aspirin.xyz",
}


class XTBError(DataError):
    """xTB generation failed (missing tblite, bad structure, SCF failure)."""


def known_xtb_molecules():
    from ase.collections import g2
    return sorted(XTB_MOLECULES), sorted(g2.names)


def initial_structure(molecule: str, init=None):
    """Starting geometry: ``init`` file if given, else :data:`XTB_MOLECULES` / ASE's g2 set."""
    from ase.build import molecule as ase_molecule
    from ase.io import read
    if init is not None:
        p = Path(init)
        if not p.is_file():
            raise XTBError(f"--init file {p} does not exist")
        try:
            atoms = read(str(p))
        except Exception as exc:
            raise XTBError(f"cannot read --init file {p}: {exc}") from exc
    else:
        key = XTB_MOLECULES.get(molecule, molecule)
        if key.endswith(".xyz"):
            atoms = read(str(STRUCTURE_DIR / key))
        else:
            from ase.collections import g2
            if key not in g2.names:
                raise XTBError(f"unknown xtb molecule '{molecule}'; valid: {', '.join(sorted(XTB_MOLECULES))} "
                               "or any ASE g2 name (ase.collections.g2.names), or give --init FILE")
            atoms = ase_molecule(key)
    atoms.pbc = False
    atoms.cell = None
    return atoms


def kinetic_temperature(V, z) -> np.ndarray:
    """Instantaneous kinetic temperature (K) of frames ``V`` (T,N,3) in Å/fs with 3N dof."""
    from ase.data import atomic_masses
    V = np.asarray(V, dtype=np.float64) / FS  # → Å / ASE time
    m = atomic_masses[np.asarray(z, dtype=np.int64)]
    ke = 0.5 * np.einsum("n,tnk->t", m, V * V)
    return 2.0 * ke / (3 * len(m) * KB)


def _make_calculator(method: str):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny molecules: threads only add overhead
    try:
        from tblite.ase import TBLite
    except Exception as exc:
        raise XTBError(f"tblite is not importable ({exc}); install it with `pip install tblite`") from exc
    return TBLite(method=method, verbosity=0)


def generate_xtb_trajectory(atoms, n_frames: int, temperature_K: float = 500.0,
                            timestep_fs: float = 0.5, friction_per_fs: float = 0.01,
                            equilibration_fs: float = 1000.0, seed: int = 0,
                            method: str = "GFN2-xTB", progress: bool = True, name: str = "") -> dict:
    """Run Langevin MD with tblite and return the raw MD17-format dict (see module doc)."""
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from tqdm.auto import tqdm

    if n_frames < 1:
        raise XTBError(f"--frames must be positive, got {n_frames}")
    if temperature_K <= 0 or timestep_fs <= 0 or friction_per_fs < 0 or equilibration_fs < 0:
        raise XTBError("temperature/timestep must be > 0 and friction/equilibration >= 0")
    atoms = atoms.copy()
    atoms.calc = _make_calculator(method)
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    dyn = Langevin(atoms, timestep_fs * FS, temperature_K=temperature_K,
                   friction=friction_per_fs / FS, fixcm=False, rng=rng)
    n_eq = int(round(equilibration_fs / timestep_fs))
    N = len(atoms)
    R = np.empty((n_frames, N, 3))
    F = np.empty((n_frames, N, 3))
    V = np.empty((n_frames, N, 3))
    E = np.empty((n_frames, 1))
    k = [0]
    bar = tqdm(total=n_eq + n_frames, desc=f"GFN2-xTB MD {name}".strip(), unit="step", disable=not progress)

    def record():
        bar.update(1)
        if dyn.nsteps >= n_eq and k[0] < n_frames:
            i = k[0]
            R[i] = atoms.positions
            E[i, 0] = atoms.get_potential_energy() / KCAL_MOL
            F[i] = atoms.get_forces() / KCAL_MOL
            V[i] = atoms.get_velocities() * FS
            k[0] += 1

    dyn.attach(record, interval=1)
    try:
        dyn.run(n_eq + n_frames - 1)  # observers also run on the initial state
    except XTBError:
        raise
    except Exception as exc:
        raise XTBError(f"xTB MD failed at step {dyn.nsteps}: {type(exc).__name__}: {exc}") from exc
    finally:
        bar.close()
    if k[0] != n_frames:
        raise XTBError(f"recorded {k[0]} frames, expected {n_frames}")
    z = atoms.numbers.astype(np.int64)
    return {
        "R": R, "z": z, "E": E, "F": F, "V": V,
        "name": name,
        "theory": f"{method} (tblite)",
        "md_timestep_fs": float(timestep_fs),
        "temperature_K": float(temperature_K),
        "thermostat": f"Langevin friction {friction_per_fs:g}/fs, fixcm=False",
        "friction_per_fs": float(friction_per_fs),
        "equilibration_fs": float(equilibration_fs),
        "seed": int(seed),
        "mean_kinetic_temperature_K": float(kinetic_temperature(V, z).mean()),
    }


def raw_xtb_path(data_root, molecule: str, temperature_K: float) -> Path:
    t = f"{temperature_K:g}"
    return Path(data_root) / "xtb" / molecule / f"xtb_{molecule}_{t}K.npz"


def save_raw_npz(path, raw: dict) -> Path:
    """Write the raw dict atomically (MD17-format npz)."""
    path = Path(path)

    def w(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: np.asarray(v) for k, v in raw.items()})

    atomic_write(path, w)
    return path
