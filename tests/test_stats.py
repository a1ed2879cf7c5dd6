"""Survival statistics (mdsim/stats.py): Kaplan–Meier, Greenwood, RMST, median CI, log-rank."""
import numpy as np
import pytest

from mdsim import stats

# Hand example (times; "+" = censored):  1, 2+, 3, 3, 4+, 5   (n = 6)
#   t=1: n=6 d=1  S = 5/6                 Greenwood sum 1/(6*5)            = 1/30
#   t=3: n=4 d=2  S = 5/6 * 2/4 = 5/12    Greenwood sum 1/30 + 2/(4*2)     = 17/60
#   t=5: n=1 d=1  S = 0
#   Var S(3) = (5/12)^2 * 17/60 = 425/8640
#   RMST to 5: 1*1 + (5/6)*2 + (5/12)*2 = 3.5
#   Var RMST: A_1 = ∫_1^5 S = 5/3 + 5/6 = 5/2 -> (5/2)^2 * 1/(6*5) = 5/24 = 30/144
#             A_3 = ∫_3^5 S = 5/6       -> (5/6)^2 * 2/(4*2) = 25/144
#             A_5 = 0                    -> total 55/144
#   median: S(1) = 5/6 > 1/2, S(3) = 5/12 <= 1/2 -> 3
HAND_T = np.array([1, 2, 3, 3, 4, 5.0])
HAND_E = np.array([1, 0, 1, 1, 0, 1], dtype=bool)


def test_kaplan_meier_hand_example():
    km = stats.kaplan_meier(HAND_T, HAND_E)
    np.testing.assert_allclose(km.times, [1, 3, 5])
    np.testing.assert_allclose(km.n_at_risk, [6, 4, 1])
    np.testing.assert_allclose(km.n_events, [1, 2, 1])
    np.testing.assert_allclose(km.survival, [5 / 6, 5 / 12, 0])
    np.testing.assert_allclose(km.variance[:2], [(5 / 6) ** 2 / 30, 425 / 8640])
    assert km.variance[2] == 0
    np.testing.assert_allclose(km([0.5, 1, 2.9, 3, 4.99, 5, 7]), [1, 5 / 6, 5 / 6, 5 / 12, 5 / 12, 0, 0])
    r = km.rmst(5.0)
    assert r.estimate == pytest.approx(3.5)
    assert r.stderr == pytest.approx(np.sqrt(55 / 144))
    assert (r.lower, r.upper) == pytest.approx((3.5 - 1.959964 * np.sqrt(55 / 144), 3.5 + 1.959964 * np.sqrt(55 / 144)), rel=1e-5)
    # shorter horizon inside the second piece: 1 + (5/6)*1 ; A_1 = 5/6 -> var (5/6)^2/30
    r2 = km.rmst(2.0)
    assert r2.estimate == pytest.approx(1 + 5 / 6)
    assert r2.stderr == pytest.approx((5 / 6) / np.sqrt(30))
    assert km.median()[0] == 3.0


def test_log_log_band_and_median_ci():
    km = stats.kaplan_meier(HAND_T, HAND_E)
    lo, hi = km.confidence_band(0.95)
    # Kalbfleisch–Prentice at t=1: S=5/6, w = z*sqrt(1/30)/|ln(5/6)|
    w = 1.959964 * np.sqrt(1 / 30) / abs(np.log(5 / 6))
    assert lo[0] == pytest.approx((5 / 6) ** np.exp(w), rel=1e-5)
    assert hi[0] == pytest.approx((5 / 6) ** np.exp(-w), rel=1e-5)
    assert np.all(lo <= km.survival + 1e-12) and np.all(km.survival <= hi + 1e-12)
    assert np.all((lo >= 0) & (hi <= 1))
    med, mlo, mhi = km.median()
    # lower limit: first time the lower band is <= 1/2; upper: first time the upper band is.
    # Here S(1) = 5/6 with n = 6: lo(1) = 0.27 already, so the median could be 1; the upper band at
    # t=3 is still > 1/2 (hi(3) = 0.77), it drops only at t=5 (S = 0).
    assert lo[0] < 0.5 < hi[1]
    assert (mlo, med, mhi) == (1.0, 3.0, 5.0)
    # median not reached: everyone censored after one early event
    km2 = stats.kaplan_meier([1, 10, 10, 10], [1, 0, 0, 0])
    assert km2.median()[0] is None and km2.median()[2] is None


def test_against_scipy_ecdf():
    from scipy.stats import CensoredData, ecdf
    rng = np.random.default_rng(3)
    t = np.round(rng.exponential(2.0, 80), 1)
    c = np.minimum(rng.uniform(0, 6, 80).round(1), 5.0)
    obs, ev = np.minimum(t, c), t <= c
    km = stats.kaplan_meier(obs, ev)
    res = ecdf(CensoredData(uncensored=obs[ev], right=obs[~ev])).sf
    np.testing.assert_allclose(km(km.times), res.evaluate(km.times), rtol=1e-12)
    ci = res.confidence_interval(0.95, method="log-log")
    lo, hi = km.confidence_band(0.95)
    ok = (km.survival > 0) & (km.survival < 1)
    np.testing.assert_allclose(lo[ok], ci.low.evaluate(km.times)[ok], rtol=1e-6)
    np.testing.assert_allclose(hi[ok], ci.high.evaluate(km.times)[ok], rtol=1e-6)


def test_no_censoring_is_empirical_survival_and_mean():
    rng = np.random.default_rng(0)
    t = np.round(rng.gamma(2.0, 1.5, 57), 2)  # ties included
    km = stats.kaplan_meier(t)
    grid = np.linspace(0, t.max() + 1, 400)
    np.testing.assert_allclose(km(grid), (t[None, :] > grid[:, None]).mean(1), atol=1e-12)
    for h in (1.0, 3.0, 100.0):
        assert km.rmst(h).estimate == pytest.approx(np.minimum(t, h).mean(), rel=1e-12)
    # with no censoring and the horizon past all times, Var RMST = (n-1)/n^2 * sample variance
    assert km.rmst(100.0).stderr ** 2 == pytest.approx(t.var() / t.size, rel=1e-9)
    srt = np.sort(t)
    assert km.median()[0] == srt[int(np.ceil(t.size / 2)) - 1]  # smallest t with S(t) <= 1/2


def _redistribute_to_the_right(t, e):
    """Efron's (1967) construction of the KM estimate, a different algorithm: every observation
    starts with mass 1/n; in time order (events before censorings at ties) a censored one hands
    its mass in equal parts to every observation strictly to its right.  S(x) = 1 − mass of the
    events at times <= x."""
    order = np.lexsort((~e, t))  # by time, events first at ties
    t, e = t[order], e[order]
    n = t.size
    mass = np.full(n, 1.0 / n)
    for i in range(n):
        if not e[i]:
            right = np.nonzero(t > t[i])[0]
            if right.size:
                mass[right] += mass[i] / right.size
                mass[i] = 0.0
    return lambda x: 1.0 - np.array([mass[(t <= xx) & e].sum() for xx in np.atleast_1d(x)])


@pytest.mark.parametrize("seed", range(5))
def test_censored_km_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 40))
    t = rng.integers(1, 12, n).astype(float)  # many ties
    e = rng.random(n) < 0.6
    km = stats.kaplan_meier(t, e)
    bf = _redistribute_to_the_right(t, e)
    grid = np.arange(0, 13, 0.5)
    np.testing.assert_allclose(km(grid), bf(grid), atol=1e-12)


def test_logrank_hand_example():
    # A = 1, 2, 3 (events); B = 2, 4, 5+.  Event times 1, 2, 3, 4:
    #  t=1: nA=3 nB=3 d=1 dA=1  E_A = 1/2   V = 1*(1/2)(1/2)*5/5   = 1/4
    #  t=2: nA=2 nB=3 d=2 dA=1  E_A = 4/5   V = 2*(2/5)(3/5)*3/4   = 9/25
    #  t=3: nA=1 nB=2 d=1 dA=1  E_A = 1/3   V = 1*(1/3)(2/3)*2/2   = 2/9
    #  t=4: nA=0 nB=2 d=1       E_A = 0     V = 0
    #  O_A − E_A = 3 − 49/30 = 41/30;  V = 1/4 + 9/25 + 2/9 = 749/900;  chi2 = (41/30)^2 / (749/900)
    r = stats.logrank_test([1, 2, 3], None, [2, 4, 5], [1, 1, 0])
    assert r.statistic == pytest.approx((41 / 30) ** 2 / (749 / 900))
    assert r.observed == (3, 2)
    assert r.expected[0] == pytest.approx(49 / 30)
    from scipy.stats import chi2
    assert r.pvalue == pytest.approx(chi2.sf(r.statistic, 1))


def test_logrank_vs_scipy():
    from scipy.stats import CensoredData, logrank
    rng = np.random.default_rng(5)
    a = np.round(rng.exponential(3, 40), 1)
    b = np.round(rng.exponential(5, 50), 1)
    ea, eb = a < 6, b < 6
    a, b = np.minimum(a, 6), np.minimum(b, 6)
    ours = stats.logrank_test(a, ea, b, eb)
    ref = logrank(CensoredData(uncensored=a[ea], right=a[~ea]), CensoredData(uncensored=b[eb], right=b[~eb]))
    assert ours.statistic == pytest.approx(ref.statistic ** 2, rel=1e-9)
    assert ours.pvalue == pytest.approx(ref.pvalue, rel=1e-9)


def test_logrank_power_and_null_calibration():
    rng = np.random.default_rng(11)
    # clearly separated: mean 1 vs mean 10, censored at 8
    a, b = rng.exponential(1, 30), rng.exponential(10, 30)
    assert stats.logrank_test(np.minimum(a, 8), a < 8, np.minimum(b, 8), b < 8).pvalue < 1e-6
    # null: same distribution, censoring at a horizon; p ~ uniform
    rng = np.random.default_rng(1)
    p = []
    for _ in range(600):
        x, y = rng.exponential(4, 25), rng.exponential(4, 25)
        p.append(stats.logrank_test(np.minimum(x, 6), x < 6, np.minimum(y, 6), y < 6).pvalue)
    p = np.array(p)
    from scipy.stats import kstest
    assert kstest(p, "uniform").pvalue > 1e-3
    assert 0.025 < (p < 0.05).mean() < 0.08


def test_rmst_ratio_and_censoring_helper():
    a = stats.RMST(6.0, 0.6, 0, 0, 10, 0.95)
    b = stats.RMST(2.0, 0.4, 0, 0, 10, 0.95)
    r, lo, hi = stats.rmst_ratio(a, b)
    s = np.hypot(0.1, 0.2)
    assert (r, lo, hi) == pytest.approx((3.0, 3 * np.exp(-1.959964 * s), 3 * np.exp(1.959964 * s)), rel=1e-5)
    e = stats.censored_at_horizon([1.0, 20.0, 20.0, 3.0, 20.0], 20.0, 2)
    assert e.tolist() == [True, False, False, True, True]
    with pytest.raises(ValueError):
        stats.censored_at_horizon([1.0, 20.0], 20.0, 2)
    with pytest.raises(ValueError):
        stats.kaplan_meier([1.0, -1.0])
    with pytest.raises(ValueError):
        stats.kaplan_meier([1.0, 2.0], [True])


def test_rmst_coverage():
    """The Greenwood-based RMST interval covers the true RMST ~95% of the time (censored data)."""
    rng = np.random.default_rng(2)
    lam, h = 1 / 3.0, 5.0
    true = (1 - np.exp(-lam * h)) / lam
    cover = 0
    for _ in range(300):
        x = rng.exponential(1 / lam, 60)
        c = rng.uniform(2, 12, 60)
        r = stats.kaplan_meier(np.minimum(x, c), x <= c).rmst(h)
        cover += r.lower <= true <= r.upper
    assert 0.90 < cover / 300 < 0.99


def _cox_partial_loglik(b, t1, e1, t2, e2):
    """Breslow log partial likelihood of a binary covariate (1 = sample 2), written out per event."""
    t = np.concatenate([t1, t2])
    e = np.concatenate([e1, e2])
    x = np.concatenate([np.zeros(t1.size), np.ones(t2.size)])
    ll = 0.0
    for i in np.nonzero(e)[0]:
        risk = t >= t[i]
        ll += b * x[i] - np.log(np.sum(np.exp(b * x[risk])))
    return ll


def test_hazard_ratio_maximises_partial_likelihood_and_recovers_truth():
    """The estimate maximises the Cox partial likelihood (independent per-event sum, ties
    included), its curvature gives the interval, and it recovers a known exponential hazard
    ratio far from 1 under heavy censoring, where an RMST ratio saturates at the horizon."""
    rng = np.random.default_rng(5)
    a, b = np.round(rng.exponential(2.0, 40), 1), np.round(rng.exponential(5.0, 40), 1)  # ties
    H = 6.0
    t1, e1, t2, e2 = np.minimum(a, H), a < H, np.minimum(b, H), b < H
    r = stats.hazard_ratio(t1, e1, t2, e2)
    beta, h = np.log(r.estimate), 1e-4
    ll = [_cox_partial_loglik(beta + k * h, t1, e1, t2, e2) for k in (-1, 0, 1)]
    assert abs(ll[2] - ll[0]) / (2 * h) < 1e-6  # score zero at the estimate
    info = -(ll[2] - 2 * ll[1] + ll[0]) / h**2
    assert r.log_stderr == pytest.approx(1 / np.sqrt(info), rel=1e-3)
    assert r.lower < r.estimate < r.upper
    # truth far from 1 with most of sample 2 censored
    x, y = rng.exponential(1.0, 3000), rng.exponential(20.0, 3000)
    r = stats.hazard_ratio(np.minimum(x, 4), x < 4, np.minimum(y, 4), y < 4)
    assert r.lower < 0.05 < r.upper and 0.04 < r.estimate < 0.06
    rm = stats.rmst_ratio(stats.kaplan_meier(np.minimum(y, 4), y < 4).rmst(4),
                          stats.kaplan_meier(np.minimum(x, 4), x < 4).rmst(4))
    assert rm[0] < 4.0  # the RMST ratio cannot exceed horizon / RMST(sample 1)
    # no events in sample 2: estimate 0 with a finite upper bound
    z = stats.hazard_ratio([1.0, 2.0, 3.0], None, [5.0, 5.0], [False, False])
    assert z.estimate == 0.0 and np.isfinite(z.upper)


def test_hazard_ratio_interval_coverage():
    rng = np.random.default_rng(6)
    hit = 0
    for _ in range(300):
        x, y = rng.exponential(2.0, 60), rng.exponential(6.0, 60)
        r = stats.hazard_ratio(np.minimum(x, 8), x < 8, np.minimum(y, 8), y < 8)
        hit += r.lower < 1 / 3 < r.upper
    assert 0.91 < hit / 300 < 0.985


def test_hazard_ratio_window_detects_non_proportional_hazards():
    """Sample 2's hazard is 0.2x sample 1's before t = 2 and equal after: the two windows recover
    0.2 and 1 (delayed entry after t = 2), the whole-range window equals hazard_ratio."""
    rng = np.random.default_rng(7)
    n = 4000
    x = rng.exponential(1.0, n)
    y = rng.exponential(5.0, n)
    y = np.where(y > 2.0, 2.0 + rng.exponential(1.0, n), y)  # memoryless: hazard 1 after t = 2
    H = 5.0
    t1, e1, t2, e2 = np.minimum(x, H), x < H, np.minimum(y, H), y < H
    early = stats.hazard_ratio_window(t1, e1, t2, e2, 0.0, 2.0)
    late = stats.hazard_ratio_window(t1, e1, t2, e2, 2.0, H)
    assert early.lower < 0.2 < early.upper and late.lower < 1.0 < late.upper
    assert late.estimate > 3 * early.estimate
    full = stats.hazard_ratio(t1, e1, t2, e2)
    assert stats.hazard_ratio_window(t1, e1, t2, e2, 0.0, H).estimate == pytest.approx(full.estimate, rel=1e-12)


def test_exponential_rate_recovers_constant_hazard_and_covers():
    """Events / time at risk recovers an exponential rate under censoring in every window (a
    constant hazard), not for a hazard that rises, and its exact interval covers ~95 %."""
    rng = np.random.default_rng(8)
    x = rng.exponential(4.0, 5000)  # rate 0.25
    t, e = np.minimum(x, 6.0), x < 6.0
    for lo, hi in ((0.0, 3.0), (3.0, 6.0), (0.0, 6.0)):
        r = stats.exponential_rate(t, e, lo, hi)
        assert r.lower < 0.25 < r.upper and abs(r.estimate - 0.25) < 0.02
    w = rng.weibull(3.0, 5000) * 4.0  # rising hazard
    tw, ew = np.minimum(w, 6.0), w < 6.0
    assert stats.exponential_rate(tw, ew, 3.0, 6.0).lower > 3 * stats.exponential_rate(tw, ew, 0.0, 3.0).upper
    hit = 0
    for _ in range(400):
        y = rng.exponential(2.0, 20)
        r = stats.exponential_rate(np.minimum(y, 3.0), y < 3.0)
        hit += r.lower < 0.5 < r.upper
    assert 0.92 < hit / 400 < 0.985
    with pytest.raises(ValueError):
        stats.exponential_rate([1.0, 2.0], None, 5.0, 8.0)  # nobody at risk after 5
