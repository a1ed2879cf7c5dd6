"""Offline GFN2-xTB reference data and the correlated-statistics helper."""
import importlib.util

import numpy as np
import pytest

from mdsim import stats
from mdsim.data import xtb
from mdsim.data.download import main
from mdsim.data.format import load_metadata, load_split
from mdsim.units import KCAL_MOL

needs_tblite = pytest.mark.skipif(importlib.util.find_spec("tblite") is None, reason="tblite not installed")


def _ar1(phi, n, rng, m=1):
    from scipy.signal import lfilter
    e = rng.normal(size=(m, n + 2000))
    x = lfilter([1.0], [1.0, -phi], e, axis=1)[:, 2000:]  # drop the start-up transient
    return x


def test_tau_of_ar1():
    rng = np.random.default_rng(0)
    for phi in (0.0, 0.5, 0.9):
        tau = stats.integrated_autocorrelation_time(_ar1(phi, 200_000, rng)[0])
        assert tau == pytest.approx((1 + phi) / (1 - phi), rel=0.1)


def test_standard_error_covers_truth():
    """z-scores of the mean of 300 independent AR(1) runs (true mean 0) have unit spread."""
    rng = np.random.default_rng(1)
    xs = _ar1(0.9, 4000, rng, m=300)
    z = np.array([(e.mean) / e.stderr for e in map(stats.mean_with_error, xs)])
    assert 0.8 < z.std() < 1.25
    assert np.mean(np.abs(z) < 3) > 0.97
    # the naive (independent-sample) error would be ~sqrt(19) times too small
    naive = xs.std(axis=1, ddof=1) / np.sqrt(xs.shape[1])
    assert np.std(xs.mean(axis=1) / naive) > 3


@pytest.fixture(scope="module")
def ethanol_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("xtb")
    rc = main(["--dataset", "xtb", "--molecule", "ethanol", "--frames", "200", "--equilibration-fs", "50",
               "--data-dir", str(d), "--no-progress", "--seed", "3"])
    assert rc == 0
    return d


@needs_tblite
def test_raw_xtb_file_format(ethanol_run):
    raw = np.load(ethanol_run / "xtb" / "ethanol" / "xtb_ethanol_500K.npz")
    for k in ("R", "z", "E", "F", "V", "theory", "md_timestep_fs", "temperature_K", "thermostat", "seed",
              "mean_kinetic_temperature_K"):
        assert k in raw.files
    assert raw["R"].shape == (200, 9, 3) and raw["E"].shape == (200, 1) and raw["F"].shape == (200, 9, 3)
    assert sorted(raw["z"].tolist()) == [1] * 6 + [6, 6, 8]
    assert float(raw["md_timestep_fs"]) == 0.5 and float(raw["temperature_K"]) == 500.0
    assert int(raw["seed"]) == 3 and "fixcm=False" in str(raw["thermostat"])
    # GFN2-xTB ethanol total energy is about -309.5 eV: the file is in kcal/mol
    assert raw["E"].mean() * KCAL_MOL == pytest.approx(-309.5, abs=1.0)
    R, V, E, F = raw["R"], raw["V"], raw["E"][:, 0], raw["F"]
    dt = 0.5
    # consecutive frames 0.5 fs apart: displacement ≈ dt · mean velocity (Å/fs)
    disp = R[1:] - R[:-1]
    vdt = 0.5 * (V[1:] + V[:-1]) * dt
    assert np.abs(disp - vdt).max() < 0.05 * np.abs(disp).max()
    # E and F consistent (same units, F = -dE/dR): trapezoid work along the path
    dE = E[1:] - E[:-1]
    work = -np.einsum("tnk,tnk->t", 0.5 * (F[1:] + F[:-1]), disp)
    assert np.abs(dE - work).max() < 0.02 * np.abs(dE).max() + 1e-3
    Tk = xtb.kinetic_temperature(V, raw["z"])
    assert float(raw["mean_kinetic_temperature_K"]) == pytest.approx(Tk.mean())
    assert 150 < Tk.mean() < 1200


@needs_tblite
def test_xtb_splits_in_ev_both_layouts(ethanol_run):
    raw = np.load(ethanol_run / "xtb" / "ethanol" / "xtb_ethanol_500K.npz")
    for top in ("xtb", "contiguous-xtb"):
        base = ethanol_run / top / "ethanol" / "1k"  # fallback tag, shrunk: 152/8/40
        parts = [load_split(base / s) for s in ("train", "val", "test")]
        assert [len(p) for p in parts] == [152, 8, 40]
        for p in parts:
            np.testing.assert_allclose(p.E, raw["E"][p.fid, 0] * KCAL_MOL)
            np.testing.assert_allclose(p.V, raw["V"][p.fid])
            assert p.frame_spacing_fs == 0.5 and p.temperature_K == 500.0
        assert load_metadata(base)["shrunk"] == "all"
    np.testing.assert_array_equal(load_split(ethanol_run / "contiguous-xtb/ethanol/1k/val").fid, np.arange(152, 160))


@needs_tblite
def test_split_forces_match_direct_tblite(ethanol_run):
    from ase import Atoms
    from tblite.ase import TBLite
    p = load_split(ethanol_run / "xtb" / "ethanol" / "1k" / "test")
    a = Atoms(numbers=p.z, positions=p.R[0])
    a.calc = TBLite(method="GFN2-xTB", verbosity=0)
    np.testing.assert_allclose(a.get_forces(), p.F[0], atol=2e-3)  # SCF restart differences
    assert a.get_potential_energy() == pytest.approx(p.E[0], abs=1e-4)


def test_structures_and_bad_molecule():
    a = xtb.initial_structure("aspirin")
    assert a.get_chemical_formula(mode="hill") == "C9H8O4"
    assert xtb.initial_structure("ethanol").get_chemical_formula(mode="hill") == "C2H6O"
    with pytest.raises(xtb.XTBError, match="valid: .*aspirin"):
        xtb.initial_structure("unobtainium")


@pytest.mark.slow
@needs_tblite
def test_langevin_ensemble_temperature():
    """20 ps GFN2-xTB ethanol at 500 K: mean kinetic temperature within 3 standard errors
    (error from the integrated autocorrelation time) of the target."""
    traj = xtb.generate_xtb_trajectory(xtb.initial_structure("ethanol"), 40000, 500.0,
                                       equilibration_fs=1000.0, seed=11, progress=False)
    T = xtb.kinetic_temperature(traj["V"], traj["z"])
    est = stats.mean_with_error(T)
    assert abs(est.mean - 500.0) < 3 * est.stderr, est
