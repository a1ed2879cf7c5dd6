"""Statistics of correlated time series (MD observables).

Convention: the integrated autocorrelation time is ``tau = 1 + 2 * sum_{t>=1} rho(t)`` in
units of samples (the "statistical inefficiency"), so that the variance of the mean of n
correlated samples is ``var(x) * tau / n``.  For an AR(1) process with coefficient phi,
``rho(t) = phi**t`` and ``tau = (1 + phi) / (1 - phi)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def autocorrelation(x) -> np.ndarray:
    """Normalised autocorrelation function rho(t), t = 0..n-1, of a 1-d series (FFT, biased
    estimator as usual for windowed tau estimates)."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    n = x.size
    if n < 2:
        raise ValueError("autocorrelation needs at least 2 samples")
    x = x - x.mean()
    nfft = 1 << int(np.ceil(np.log2(2 * n)))
    f = np.fft.rfft(x, n=nfft)
    acf = np.fft.irfft(f * np.conj(f), n=nfft)[:n]
    if acf[0] <= 0:
        return np.concatenate([[1.0], np.zeros(n - 1)])  # constant series
    return acf / acf[0]


def integrated_autocorrelation_time(x, c: float = 5.0) -> float:
    """Integrated autocorrelation time with Sokal's automatic window: the smallest window M
    with M >= c * tau(M).  Returns at least 1.0."""
    rho = autocorrelation(x)
    taus = 2.0 * np.cumsum(rho) - 1.0  # tau(M) = 1 + 2 sum_{t=1..M} rho(t)
    m = np.arange(taus.size)
    ok = m >= c * taus
    M = int(np.argmax(ok)) if ok.any() else taus.size - 1
    return float(max(taus[M], 1.0))


@dataclass
class MeanEstimate:
    mean: float
    stderr: float
    tau: float  # integrated autocorrelation time (samples)
    n: int

    @property
    def n_effective(self) -> float:
        return self.n / self.tau


def mean_with_error(x, c: float = 5.0) -> MeanEstimate:
    """Mean of a correlated series and its standard error ``sqrt(var * tau / n)``."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    tau = integrated_autocorrelation_time(x, c=c)
    n = x.size
    return MeanEstimate(float(x.mean()), float(np.sqrt(x.var(ddof=1) * tau / n)), tau, n)


# ----------------------------------------------------------------------------- survival analysis
# Right-censored times (e.g. how long an MD replica stays stable: a replica still stable when the
# simulation ends is censored at that time).  Conventions, as in most textbooks and R's survival:
# at a time where events and censorings tie, the censored subjects count as still at risk (events
# happen first); the median is the smallest time with S(t) <= 1/2.

def _survival_input(times, events):
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    e = np.ones(t.shape, dtype=bool) if events is None else np.asarray(events, dtype=bool).reshape(-1)
    if t.shape != e.shape:
        raise ValueError(f"times ({t.size}) and events ({e.size}) must have the same length")
    if t.size == 0:
        raise ValueError("survival estimates need at least one observation")
    if not np.all(np.isfinite(t)) or np.any(t < 0):
        raise ValueError("survival times must be finite and >= 0")
    return t, e


def _z(level: float) -> float:
    from scipy.stats import norm
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2.0))


@dataclass
class KaplanMeier:
    """Kaplan–Meier estimate S(t) = prod_{t_i <= t} (1 - d_i / n_i) over the distinct event
    times t_i (d_i events, n_i at risk), with Greenwood's variance
    Var S(t) = S(t)^2 sum_{t_i <= t} d_i / (n_i (n_i - d_i)).  Build with :func:`kaplan_meier`."""
    times: np.ndarray      # distinct event times t_i (increasing)
    n_at_risk: np.ndarray  # n_i
    n_events: np.ndarray   # d_i
    survival: np.ndarray   # S(t_i)
    greenwood: np.ndarray  # sum_{t_j <= t_i} d_j / (n_j (n_j - d_j)) (inf once S reaches 0)
    n: int                 # observations
    t_max: float           # largest observed time (event or censoring)

    @property
    def variance(self) -> np.ndarray:
        """Greenwood variance of S at each event time (0 where S = 0)."""
        with np.errstate(invalid="ignore"):
            v = self.survival ** 2 * self.greenwood
        return np.where(self.survival > 0, v, 0.0)

    def _index(self, t) -> np.ndarray:
        return np.searchsorted(self.times, np.asarray(t, dtype=np.float64), side="right") - 1

    def __call__(self, t) -> np.ndarray:
        """S(t) (right-continuous step function; 1 before the first event)."""
        if not self.times.size:
            return np.ones_like(np.asarray(t, dtype=np.float64))
        i = self._index(t)
        return np.where(i >= 0, self.survival[np.maximum(i, 0)], 1.0)

    def confidence_band(self, level: float = 0.95, transform: str = "log-log"):
        """Pointwise confidence limits (lower, upper) of S at ``self.times``.
        ``transform``: "log-log" (Kalbfleisch–Prentice: S^exp(±z se/(S ln S)), stays in [0, 1],
        the usual default) or "linear" (S ± z·se, clipped to [0, 1])."""
        z = _z(level)
        s = self.survival
        se = np.sqrt(self.variance)
        if transform == "linear":
            return np.clip(s - z * se, 0, 1), np.clip(s + z * se, 0, 1)
        if transform != "log-log":
            raise ValueError(f"transform: expected 'log-log' or 'linear', got {transform!r}")
        lo, hi = np.zeros_like(s), np.ones_like(s)
        inner = (s > 0) & (s < 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = z * np.sqrt(self.greenwood[inner]) / np.abs(np.log(s[inner]))
        lo[inner] = s[inner] ** np.exp(w)
        hi[inner] = s[inner] ** np.exp(-w)
        lo[s >= 1] = 1.0
        hi[s <= 0] = 0.0
        return lo, hi

    def quantile_time(self, p: float = 0.5, level: float = 0.95, transform: str = "log-log"):
        """Time where S first drops to <= 1 - p (p = 0.5: the median) and its confidence interval
        by the method of Brookmeyer & Crowley (1982) applied to the pointwise band (the times
        whose band contains 1 - p): the lower limit is the first time the band's lower limit is
        <= 1 - p, the upper limit the first time its upper limit is.  ``None`` where S (or the band) never gets there (not reached by the end
        of follow-up).  Returns (estimate, lower, upper)."""
        q = 1.0 - p
        lo, hi = self.confidence_band(level, transform)

        def first(x):
            k = np.nonzero(x <= q + 1e-12)[0]
            return float(self.times[k[0]]) if k.size else None
        return first(self.survival), first(lo), first(hi)

    def median(self, level: float = 0.95, transform: str = "log-log"):
        """(median, lower, upper): see :meth:`quantile_time`."""
        return self.quantile_time(0.5, level, transform)

    def rmst(self, horizon: float, level: float = 0.95) -> "RMST":
        """Restricted mean survival time ∫_0^horizon S(t) dt and its standard error from the
        Greenwood-type variance (Klein & Moeschberger 2003, eq. 4.5.1):
        Var = sum_{t_i <= horizon} A_i^2 d_i / (n_i (n_i - d_i)),  A_i = ∫_{t_i}^horizon S(t) dt
        (terms with n_i = d_i vanish: S = 0 after them, so A_i = 0).  Beyond the largest
        observation S is held at its last value (report horizons within follow-up)."""
        if horizon <= 0:
            raise ValueError(f"RMST horizon must be > 0, got {horizon}")
        keep = self.times <= horizon
        t, s = self.times[keep], self.survival[keep]
        grid = np.concatenate([[0.0], t, [horizon]])
        heights = np.concatenate([[1.0], s])
        pieces = heights * np.diff(grid)          # area of each constant piece
        area = float(pieces.sum())
        tail = np.cumsum(pieces[::-1])[::-1][1:]  # A_i = area from t_i to the horizon
        d, n = self.n_events[keep], self.n_at_risk[keep]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(n > d, tail ** 2 * d / (n * (n - d)), 0.0)
        se = float(np.sqrt(terms.sum()))
        z = _z(level)
        return RMST(area, se, area - z * se, area + z * se, float(horizon), level)


@dataclass
class RMST:
    estimate: float
    stderr: float
    lower: float
    upper: float
    horizon: float
    level: float


def kaplan_meier(times, events=None) -> KaplanMeier:
    """Kaplan–Meier estimator of right-censored data: ``times`` (n,), ``events`` (n,) bool, True
    where the time is an event (e.g. the replica went unstable), False where it is censored
    (still stable when observation stopped); None = all events."""
    t, e = _survival_input(times, events)
    ut = np.unique(t[e])
    d = np.array([np.sum(e & (t == x)) for x in ut], dtype=np.float64)
    n = np.array([np.sum(t >= x) for x in ut], dtype=np.float64)
    s = np.cumprod(1.0 - d / n)
    with np.errstate(divide="ignore"):
        g = np.cumsum(np.where(n > d, d / np.maximum(n * (n - d), 1e-300), np.inf))
    return KaplanMeier(ut, n, d, s, g, int(t.size), float(t.max()))


@dataclass
class LogRank:
    statistic: float  # chi-square, 1 degree of freedom
    pvalue: float
    observed: tuple   # events in each sample
    expected: tuple   # expected events under equal hazards


def logrank_test(times1, events1, times2, events2) -> LogRank:
    """Two-sample log-rank (Mantel–Cox) test of equal hazard functions, with the hypergeometric
    variance sum_i d_i (n1_i/n_i)(n2_i/n_i)(n_i - d_i)/(n_i - 1).  ``events`` None = all events."""
    from scipy.stats import chi2
    t1, e1 = _survival_input(times1, events1)
    t2, e2 = _survival_input(times2, events2)
    ut = np.unique(np.concatenate([t1[e1], t2[e2]]))
    o1 = ex1 = var = 0.0
    for x in ut:
        n1, n2 = np.sum(t1 >= x), np.sum(t2 >= x)
        d1, d2 = np.sum(e1 & (t1 == x)), np.sum(e2 & (t2 == x))
        n, d = n1 + n2, d1 + d2
        o1 += d1
        ex1 += d * n1 / n
        if n > 1:
            var += d * (n1 / n) * (n2 / n) * (n - d) / (n - 1)
    stat = (o1 - ex1) ** 2 / var if var > 0 else 0.0
    total = float(e1.sum() + e2.sum())
    return LogRank(float(stat), float(chi2.sf(stat, 1)) if var > 0 else 1.0,
                   (float(e1.sum()), float(e2.sum())), (float(ex1), total - float(ex1)))


@dataclass
class HazardRatio:
    estimate: float   # hazard of sample 2 / hazard of sample 1
    lower: float
    upper: float
    log_stderr: float


def hazard_ratio(times1, events1, times2, events2, level: float = 0.95, max_iter: int = 50) -> HazardRatio:
    """Proportional-hazards ratio of sample 2 to sample 1: the maximum of the Cox partial likelihood
    with one binary covariate (Breslow ties), by Newton's method on beta = log HR; the Wald interval
    exp(beta ± z / sqrt(I(beta))).  Unlike an RMST ratio it does not saturate at the horizon: with
    exponential survival 1 / HR is the ratio of mean stability times.  Its score at beta = 0 is the
    log-rank O2 - E2.  No events in one sample (an infinite log HR) gives a one-sided interval
    (estimate 0 or inf) rather than an error."""
    t1, e1 = _survival_input(times1, events1)
    t2, e2 = _survival_input(times2, events2)
    ut = np.unique(np.concatenate([t1[e1], t2[e2]]))
    if ut.size == 0:
        raise ValueError("hazard ratio needs at least one event")
    n1 = np.array([np.sum(t1 >= x) for x in ut], dtype=np.float64)
    n2 = np.array([np.sum(t2 >= x) for x in ut], dtype=np.float64)
    d2 = np.array([np.sum(e2 & (t2 == x)) for x in ut], dtype=np.float64)
    d = d2 + np.array([np.sum(e1 & (t1 == x)) for x in ut], dtype=np.float64)

    def score_info(b):
        w = n2 * np.exp(b)
        frac = w / (n1 + w)
        return float(np.sum(d2 - d * frac)), float(np.sum(d * frac * (1.0 - frac)))

    z = _z(level)
    if d2.sum() == 0:
        _, info0 = score_info(0.0)
        return HazardRatio(0.0, 0.0, float(np.exp(z / np.sqrt(info0))) if info0 > 0 else math.inf, math.inf)
    if d2.sum() == d.sum():
        _, info0 = score_info(0.0)
        return HazardRatio(math.inf, float(np.exp(-z / np.sqrt(info0))) if info0 > 0 else 0.0, math.inf, math.inf)
    b = 0.0
    for _ in range(max_iter):
        u, i = score_info(b)
        step = u / i
        b += float(np.clip(step, -2.0, 2.0))
        if abs(step) < 1e-10:
            break
    _, i = score_info(b)
    se = 1.0 / np.sqrt(i)
    return HazardRatio(float(np.exp(b)), float(np.exp(b - z * se)), float(np.exp(b + z * se)), float(se))


def hazard_ratio_window(times1, events1, times2, events2, start: float, stop: float,
                        level: float = 0.95) -> HazardRatio:
    """``hazard_ratio`` over the time window (start, stop]: only replicas still at risk at
    ``start`` enter (delayed entry, times counted from ``start``), and events after ``stop`` are
    censored there.  Ratios that differ between windows flag non-proportional hazards."""
    def cut(times, events):
        t, e = _survival_input(times, events)
        keep = t > start
        t, e = t[keep], e[keep]
        return np.minimum(t, stop) - start, e & (t <= stop)
    t1, e1 = cut(times1, events1)
    t2, e2 = cut(times2, events2)
    return hazard_ratio(t1, e1, t2, e2, level)


@dataclass
class Rate:
    estimate: float   # events per unit time at risk
    lower: float
    upper: float
    events: int
    time_at_risk: float


def exponential_rate(times, events=None, start: float = 0.0, stop: float = math.inf,
                     level: float = 0.95) -> Rate:
    """Constant-hazard (exponential) rate over the window (start, stop]: events in it divided by
    the time at risk in it (each replica from ``start``, or not at all if it failed before, to its
    time or ``stop``), the maximum-likelihood estimate under right-censoring, with the exact
    Poisson (chi-square) interval.  Similar rates over successive windows mean a constant hazard:
    survival is then exponential, its mean 1 / rate."""
    from scipy.stats import chi2
    t, e = _survival_input(times, events)
    at_risk = np.clip(np.minimum(t, stop) - start, 0.0, None)
    d = int(np.sum(e & (t > start) & (t <= stop)))
    total = float(at_risk.sum())
    if total <= 0:
        raise ValueError(f"no time at risk in ({start}, {stop}]")
    a = 1.0 - level
    lo = float(chi2.ppf(a / 2, 2 * d) / (2 * total)) if d > 0 else 0.0
    hi = float(chi2.ppf(1 - a / 2, 2 * d + 2) / (2 * total))
    return Rate(d / total, lo, hi, d, total)


def rmst_ratio(a: RMST, b: RMST, level: float = 0.95):
    """a / b with a confidence interval from the delta method on the log scale, treating the two
    estimates as independent: Var log(a/b) = (se_a/a)^2 + (se_b/b)^2.  Returns (ratio, lower, upper)."""
    if a.estimate <= 0 or b.estimate <= 0:
        raise ValueError("RMST ratio needs positive RMSTs")
    r = a.estimate / b.estimate
    s = float(np.hypot(a.stderr / a.estimate, b.stderr / b.estimate))
    z = _z(level)
    return float(r), float(r * np.exp(-z * s)), float(r * np.exp(z * s))


def censored_at_horizon(times, horizon: float, n_censored: int):
    """Event flags for stability times that cannot tell "still stable at the end" from "went
    unstable at the last check": both are recorded as ``horizon``.  ``n_censored`` (the replicas
    still stable at the end, e.g. round(Fraction Stable · n)) of those at the horizon are marked
    censored, the rest events (which of them does not matter to the Kaplan–Meier estimate, the
    log-rank test or the RMST: tied times enter only through their counts).  Returns events (bool)."""
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    at = np.nonzero(np.isclose(t, horizon, rtol=1e-9, atol=1e-9))[0]
    if n_censored < 0 or n_censored > at.size:
        raise ValueError(f"{n_censored} censored replicas but {at.size} stability times equal the horizon {horizon}")
    e = np.ones(t.size, dtype=bool)
    e[at[:n_censored]] = False
    return e
