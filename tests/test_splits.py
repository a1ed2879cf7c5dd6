"""Split sizes, index sets, layout and atomic writing."""
from pathlib import Path

import numpy as np
import pytest

from mdsim.data import splits as S
from mdsim.data.format import DataError, SplitData, load_metadata, load_split
from mdsim.units import KCAL_MOL

pytestmark = pytest.mark.filterwarnings("ignore::mdsim.data.splits.SplitWarning")
from conftest import SHARED as _SHARED_DIR  # noqa: E402

SHARED = _SHARED_DIR / "data" / "xtb_aspirin_500K.npz"


def test_paper_split_sizes():
    p = S.plan_split(211762, "1k")
    assert (p.n_train, p.n_val, p.n_test, p.shrunk) == (950, 50, 10000, "")
    p = S.plan_split(211762, "10k")
    assert (p.n_train, p.n_val, p.n_test) == (9500, 500, 10000)
    p = S.plan_split(100001, "90k")
    assert (p.n_train, p.n_val, p.n_test) == (85500, 4500, 10000)
    # MD22 Ac-Ala3-NHMe (85,109 frames), spec §1.2
    p = S.plan_split(85109, "25percent", "percent")
    assert (p.n_train, p.n_val, p.n_test) == (14894, 2127, 4256)
    p = S.plan_split(85109, "100percent", "percent")
    assert (p.n_train, p.n_val, p.n_test) == (59576, 8510, 85109 - 59576 - 8510)


def test_small_data_shrinks_with_warning():
    with pytest.warns(S.SplitWarning, match="only 15000 frames"):
        p = S.plan_split(15000, "10k")
    assert (p.n_train, p.n_val, p.n_test, p.shrunk) == (9500, 500, 5000, "test")
    with pytest.warns(S.SplitWarning):
        p = S.plan_split(200, "1k")
    assert (p.n_train, p.n_val, p.n_test, p.shrunk) == (152, 8, 40, "all")
    assert p.n_used == 200
    with pytest.raises(DataError):
        S.plan_split(100, "9k")
    with pytest.raises(DataError):
        S.plan_split(100, "3percent", "percent")


def test_fitting_sizes():
    assert S.fitting_sizes(20000) == ["1k", "10k"]
    assert S.fitting_sizes(1500) == ["1k"]
    assert S.fitting_sizes(200) == ["1k"]
    assert S.fitting_sizes(200, fallback="10k") == ["10k"]
    assert S.fitting_sizes(100000) == ["1k", "10k", "50k"]


@pytest.mark.parametrize("n,tr,va,te", [(1000, 95, 5, 300), (60, 38, 2, 20), (211762, 9500, 500, 10000)])
def test_random_split_disjoint_and_reproducible(n, tr, va, te):
    a = S.random_split_indices(n, tr, va, te, seed=123)
    b = S.random_split_indices(n, tr, va, te, seed=123)
    c = S.random_split_indices(n, tr, va, te, seed=7)
    assert [len(x) for x in a] == [tr, va, te]
    allidx = np.concatenate(a)
    assert len(np.unique(allidx)) == tr + va + te and allidx.min() >= 0 and allidx.max() < n
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    assert not np.all(np.diff(a[0]) == 1)  # shuffled, not a block


def test_random_split_follows_shufflesplit_algorithm():
    """Test = first n_test entries of RandomState(seed).permutation(n) (sklearn's ShuffleSplit);
    train/val = second draw over the first train+val frames of the remainder."""
    n, tr, va, te = 500, 57, 3, 100
    train, val, test = S.random_split_indices(n, tr, va, te, seed=123, use_sklearn=False)
    perm = np.random.RandomState(123).permutation(n)
    np.testing.assert_array_equal(test, perm[:te])
    assert set(train) | set(val) == set(perm[te:te + tr + va])
    if S._sklearn_split() is not None:  # bit-identical to sklearn when it is there
        for x, y in zip((train, val, test), S.random_split_indices(n, tr, va, te, 123, use_sklearn=True)):
            np.testing.assert_array_equal(x, y)


def test_contiguous_blocks():
    tr, va, te = S.contiguous_split_indices(9500, 500, 10000)
    np.testing.assert_array_equal(tr, np.arange(9500))
    np.testing.assert_array_equal(va, np.arange(9500, 10000))
    np.testing.assert_array_equal(te, np.arange(10000, 20000))


def _synthetic(n=120, N=4, seed=0):
    rng = np.random.default_rng(seed)
    return SplitData(R=rng.normal(size=(n, N, 3)), z=[1, 6, 7, 8], E=rng.normal(size=n),
                     F=rng.normal(size=(n, N, 3)), fid=np.arange(n), frame_spacing_fs=0.5, temperature_K=500.0)


def test_make_splits_layout_and_metadata(tmp_path):
    data = _synthetic()
    out = S.make_splits(data, tmp_path, "md17", "mol", ["40"], layouts=("random", "contiguous"))
    assert out == [tmp_path / "md17/mol/40", tmp_path / "contiguous-md17/mol/40"]
    for folder in out:
        parts = [load_split(folder / s) for s in ("train", "val", "test")]
        assert [len(p) for p in parts] == [38, 2, 80]
        for p in parts:
            np.testing.assert_array_equal(p.R, data.R[p.fid])
            np.testing.assert_array_equal(p.E, data.E[p.fid])
        meta = load_metadata(folder)
        assert meta["n_train"] == 38 and meta["n_test"] == 80
        assert meta["e_mean"] == pytest.approx(parts[0].E.mean())
        assert meta["frame_spacing_fs"] == 0.5
        assert not list(folder.parent.glob(".*"))  # no staging leftovers
    w = S.make_splits(data, tmp_path, "water", None, ["40"])
    assert w == [tmp_path / "water/40"]


def test_failed_write_leaves_no_partial_folder(tmp_path, monkeypatch):
    data = _synthetic()
    real = S.save_split

    def flaky(directory, d):
        if Path(directory).name == "test":
            raise OSError("disk full")
        return real(directory, d)

    monkeypatch.setattr(S, "save_split", flaky)
    with pytest.raises(OSError):
        S.make_splits(data, tmp_path, "md17", "mol", ["40"])
    assert not (tmp_path / "md17" / "mol" / "40").exists()
    assert not list((tmp_path / "md17" / "mol").iterdir())
    # an existing complete folder survives a failed rewrite
    monkeypatch.setattr(S, "save_split", real)
    S.make_splits(data, tmp_path, "md17", "mol", ["40"])
    monkeypatch.setattr(S, "save_split", flaky)
    with pytest.raises(OSError):
        S.make_splits(data, tmp_path, "md17", "mol", ["40"])
    assert len(load_split(tmp_path / "md17/mol/40/test")) == 80


def test_bad_plan_is_rejected_before_writing(tmp_path):
    with pytest.raises(DataError):
        S.make_splits(_synthetic(), tmp_path, "md17", "mol", ["40", "bogus"])
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not SHARED.is_file(), reason="shared xTB data not available")
def test_split_shared_xtb_file(tmp_path):
    out = S.split_raw_file(SHARED, tmp_path, "xtb", "aspirin", sizes=["10k"], layouts=("contiguous",))
    assert out == [tmp_path / "contiguous-xtb/aspirin/10k"]
    val = load_split(out[0] / "val")
    np.testing.assert_array_equal(val.fid, np.arange(9500, 10000))
    with np.load(SHARED) as f:
        np.testing.assert_allclose(val.E, f["E"][9500:10000, 0] * KCAL_MOL)
        np.testing.assert_array_equal(val.R, f["R"][9500:10000])
    assert val.frame_spacing_fs == 0.5 and val.temperature_K == 500.0
    assert len(load_split(out[0] / "test")) == 10000
