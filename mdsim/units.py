"""Unit conventions of the whole package.

Everything inside ``mdsim`` uses ASE's units: energy eV, length Å, mass amu,
temperature K, time in ASE's internal unit (configs give fs, converted with
:data:`FS`).  Conversions happen only at the edges (file readers/writers).
"""
from ase import units as _u

#: Boltzmann constant in eV/K.
KB = float(_u.kB)
#: one femtosecond in ASE time units.
FS = float(_u.fs)
#: one picosecond in ASE time units.
PS = 1000.0 * FS
#: 1 kcal/mol in eV (MD17/MD22 raw files are in kcal/mol and kcal/mol/Å).
KCAL_MOL = float(_u.kcal / _u.mol)


def kcal_mol_to_ev(x):
    """Convert energies (or forces per Å) from kcal/mol to eV."""
    return x * KCAL_MOL


def ev_to_kcal_mol(x):
    """Convert energies (or forces per Å) from eV to kcal/mol."""
    return x / KCAL_MOL


def velocity_ase_to_ang_per_fs(v):
    """ASE velocity unit (Å / ASE time) → Å/fs."""
    return v * FS


def velocity_ang_per_fs_to_ase(v):
    """Å/fs → ASE velocity unit (Å / ASE time)."""
    return v / FS
