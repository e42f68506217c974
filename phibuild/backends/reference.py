"""Correctly rounded float32 powers, cosines and sines, for the constants the toolchains store in artifacts.

The ONNX builder stores rotary cos/sin caches it computes with torch (``theta ** exponents`` through ATen's
CPU-dispatched pow, ``cos``/``sin`` through MKL's per-CPU code paths), and transformers computes Phi-3's default
rotary frequencies with the same pow, which OpenVINO's export then stores. Those kernels are accurate to about
one unit in the last place but not correctly rounded, so their bits depend on the CPU (measured: an AVX2 and an
AVX-512 machine differ in phi4-mini-tiny's ONNX caches; Intel's and AMD's MKL paths differ in phi35-tiny's).

A correctly rounded result is a mathematical function of its float32 input, the same on every machine: here the
float64 result of numpy (accurate to a few float64 units, whatever its SIMD path) is rounded to float32, and the
few values that lie so near a float32 rounding boundary that those float64 units could decide it are computed
again with mpmath at 120 bits and rounded exactly.
"""

from __future__ import annotations

import numpy as np

PRECISION = 120  # bits for the exact path: enough for arguments up to 2**40 and a float32 result
BOUNDARY = 2.0**-40  # relative distance to a float32 midpoint within which numpy's float64 cannot decide


def pow_f32(base: float, exponents: np.ndarray) -> np.ndarray:
    """``float32(base) ** e`` correctly rounded to float32, for each float32 ``e`` (what torch's
    ``base ** tensor`` computes)."""
    import mpmath

    with mpmath.workprec(PRECISION):
        b = mpmath.mpf(float(np.float32(base)))
        return np.array([_round_f32(b ** mpmath.mpf(float(e))) for e in np.asarray(exponents, np.float32)],
                        dtype=np.float32)


def cos_sin_f32(angles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of a float32 array, each correctly rounded to float32."""
    import mpmath

    x = np.ascontiguousarray(angles, np.float32).astype(np.float64)
    results = []
    for function, exact in ((np.cos, mpmath.cos), (np.sin, mpmath.sin)):
        wide = function(x)
        narrow = wide.astype(np.float32)
        with mpmath.workprec(PRECISION):
            for index in zip(*np.nonzero(_near_midpoint(wide)), strict=True):
                narrow[index] = _round_f32(exact(mpmath.mpf(float(x[index]))))
        results.append(narrow)
    return results[0], results[1]


def log_f64(value: float) -> float:
    """The natural logarithm, correctly rounded to float64 (numpy's depends on its SIMD path)."""
    import mpmath

    with mpmath.workprec(PRECISION):
        return float(mpmath.log(mpmath.mpf(float(value))))


def _near_midpoint(wide: np.ndarray) -> np.ndarray:
    """Where a float64 value lies within ``BOUNDARY`` (relative) of the midpoint between two float32 values."""
    narrow = wide.astype(np.float32)
    up = np.nextafter(narrow, np.float32(np.inf)).astype(np.float64)
    down = np.nextafter(narrow, np.float32(-np.inf)).astype(np.float64)
    middle = narrow.astype(np.float64)
    tolerance = np.abs(wide) * BOUNDARY
    return (np.abs(wide - (middle + up) / 2) <= tolerance) | (np.abs(wide - (middle + down) / 2) <= tolerance)


def _round_f32(value) -> np.float32:
    """The float32 nearest to an mpmath number, ties to even, decided exactly (not through float64, whose own
    rounding could land on a float32 midpoint)."""
    import mpmath

    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    distances = [abs(mpmath.mpf(float(c)) - value) for c in candidates]
    best = min(distances)
    nearest = [c for c, d in zip(candidates, distances, strict=True) if d == best]
    even = [c for c in nearest if int(np.array(c).view(np.uint32)) % 2 == 0]
    return (even or nearest)[0]
