"""Where the paper's datasets come from, and what we know about them (spec §1.1).

Pure tables, no I/O.  ``download.py`` and ``splits.py`` read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

#: Base URL of the sGDML collection (MD17 and MD22 npz files).
SGDML_BASE_URL = "http://www.quantum-machine.org/gdml/data/npz/"
#: Water data set of "Forces are not enough" (Fu et al.), Zenodo record 7196767.
WATER_URL = "https://zenodo.org/records/7196767/files/water.npy"
WATER_FILE = "water.npy"

#: MD17 molecule name → file name on the sGDML server.
MD17_FILES: Dict[str, str] = {
    "aspirin": "md17_aspirin.npz",
    "benzene": "md17_benzene2017.npz",
    "ethanol": "md17_ethanol.npz",
    "malonaldehyde": "md17_malonaldehyde.npz",
    "naphthalene": "md17_naphthalene.npz",
    "salicylic_acid": "md17_salicylic.npz",
    "toluene": "md17_toluene.npz",
    "uracil": "md17_uracil.npz",
}

#: MD22 molecule name → file name (the server uses dashes).
MD22_FILES: Dict[str, str] = {
    "DHA": "md22_DHA.npz",
    "double_walled_nanotube": "md22_double-walled_nanotube.npz",
    "stachyose": "md22_stachyose.npz",
    "AT_AT": "md22_AT-AT.npz",
    "AT_AT_CG_CG": "md22_AT-AT-CG-CG.npz",
    "buckyball_catcher": "md22_buckyball-catcher.npz",
    "ac_Ala3_NHMe": "md22_Ac-Ala3-NHMe.npz",
}

#: Known sha256 digests of the raw files (file name → hex digest).  Empty entries are
#: simply not checked; add digests here once verified against an official download.
KNOWN_SHA256: Dict[str, str] = {}

#: Known sizes in bytes of the raw files (file name → size).  Only used when a server
#: sends no Content-Length.
KNOWN_SIZES: Dict[str, int] = {}


@dataclass(frozen=True)
class SystemInfo:
    """What the split writer needs to know about one data set family."""

    name: str  # folder name: md17, md22, water, xtb
    size_scheme: str  # "frames" (1k/10k/…, test 10,000) or "percent" (md22)
    default_sizes: Tuple[str, ...]
    frame_spacing_fs: Optional[float]  # time between consecutive frames
    temperature_K: Optional[float]  # temperature the data were generated at
    has_molecule_level: bool = True
    files: Dict[str, str] = field(default_factory=dict)
    default_molecule: Optional[str] = None


SYSTEMS: Dict[str, SystemInfo] = {
    "md17": SystemInfo("md17", "frames", ("1k", "10k"), 0.5, 500.0, True, MD17_FILES, "aspirin"),
    "md22": SystemInfo("md22", "percent", ("25percent", "100percent"), 1.0, 500.0, True, MD22_FILES,
                       "ac_Ala3_NHMe"),
    "water": SystemInfo("water", "frames", ("1k", "10k"), 10.0, 300.0, False, {}, None),
    # xtb: spacing/temperature are read from the raw file's metadata.
    "xtb": SystemInfo("xtb", "frames", ("1k", "10k"), None, None, True, {}, "ethanol"),
}

#: Size tags of the "frames" scheme → train+val frames (train 95 %, val 5 %).
FRAME_SIZES: Dict[str, int] = {"1k": 1000, "10k": 10000, "50k": 50000, "90k": 90000}
#: Size tags of MD22's percent scheme → fraction of all frames.
PERCENT_SIZES: Dict[str, float] = {"100percent": 1.0, "50percent": 0.5, "25percent": 0.25,
                                   "10percent": 0.1, "5percent": 0.05}
#: Test-set size of the "frames" scheme.
FRAMES_TEST_SIZE = 10000
#: Seed of the original's sklearn ``train_test_split`` calls.
SPLIT_SEED = 123


def source_url(system: str, molecule: Optional[str]) -> str:
    """Default download URL of one raw file."""
    if system == "water":
        return WATER_URL
    return SGDML_BASE_URL + SYSTEMS[system].files[molecule]


def raw_file_name(system: str, molecule: Optional[str]) -> str:
    if system == "water":
        return WATER_FILE
    return SYSTEMS[system].files[molecule]
