"""Statistics of correlated time series (MD observables).

Convention: the integrated autocorrelation time is ``tau = 1 + 2 * sum_{t>=1} rho(t)`` in
units of samples (the "statistical inefficiency"), so that the variance of the mean of n
correlated samples is ``var(x) * tau / n``.  For an AR(1) process with coefficient phi,
``rho(t) = phi**t`` and ``tau = (1 + phi) / (1 - phi)``.
"""
from __future__ import annotations

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
