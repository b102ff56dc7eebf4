"""The seeds-to-latents rule, `aigc-latents/1`: one seed -> one latent row, the same everywhere.

Served images, `aigc-ray generate` and the offline ONNX generator (examples/offline_generate.py,
which carries its own copy of these few lines because it runs without this package) all draw
their latents here, so a seed gives the same image on every path. The rule is written out so
that any language can reproduce it (no library RNG whose stream may change between versions):

    for latent row of seed s (s taken modulo 2**64) and element k = 0, 1, ..., latent_dim - 1:
      pair j = k // 2 uses two SplitMix64 outputs a = mix(s + (2j + 1) * G), b = mix(s + (2j + 2) * G)
        with G = 0x9E3779B97F4A7C15 and mix(x) = the SplitMix64 finaliser (below), all mod 2**64
      u1 = ((a >> 11) + 1) / 2**53   in (0, 1]      u2 = (b >> 11) / 2**53   in [0, 1)
      r = sqrt(-2 ln u1), t = 2 pi u2               (Box-Muller, in float64)
      element 2j = r cos t, element 2j + 1 = r sin t, then rounded to float32

A class-conditional model asked for images without labels draws class `s mod num_classes` for seed
s (`seed_labels`), so a seed alone still names one image, and seeds 0..k-1 cover the classes evenly.

The integer part is exact on every machine; the float64 transcendentals can differ by an ulp
between maths libraries, which survives the rounding to float32 about once in 10^8 elements.
"""

from __future__ import annotations

import numpy as np

RULE = "aigc-latents/1"
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def seed_latents(seeds: list[int], latent_dim: int) -> np.ndarray:
    """(N, latent_dim) float32 standard-normal rows, row i from seeds[i] alone."""
    pairs = (latent_dim + 1) // 2
    base = np.array([s % 2**64 for s in seeds], dtype=np.uint64)[:, None]  # (N, 1)
    steps = np.arange(1, 2 * pairs + 1, dtype=np.uint64)[None, :]  # (1, 2 * pairs)
    raw = _mix(base + steps * _GAMMA)  # (N, 2 * pairs)
    u1 = ((raw[:, 0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    u2 = (raw[:, 1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r, t = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
    z = np.stack([r * np.cos(t), r * np.sin(t)], axis=2).reshape(len(seeds), 2 * pairs)  # interleaved
    return z[:, :latent_dim].astype(np.float32)


def seed_labels(seeds: list[int], num_classes: int) -> list[int]:
    """The class a conditional model draws for each seed when no labels are given: seed mod num_classes."""
    return [s % num_classes for s in seeds]
