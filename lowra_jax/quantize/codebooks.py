"""NormalFloat (NF-k) codebooks, bitsandbytes' construction.

NF-k has 2^(k-1) positive quantiles of N(0, 1) at linspace(offset, 0.5, 2^(k-1)+1)[:-1], 2^(k-1)-1
negative ones at linspace(offset, 0.5, 2^(k-1))[:-1], and an exact zero, all divided by the largest
(offset = 0.9677083, QLoRA). NF4 equals bitsandbytes' table; NF2 = {-1, 0, 0.3379, 1}.

The construction degenerates at k = 1 ({0, 1}). Our NF1 is the 1-bit Lloyd-Max quantizer of
N(0, 1), +-E|z| = +-sqrt(2/pi), on the same normalisation: +-sqrt(2/pi) / Phi^-1(offset) = +-0.4317.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import stats

NF_OFFSET = 0.9677083


@functools.cache
def nf_levels(bits: int) -> np.ndarray:
  """Sorted NF-`bits` levels in [-1, 1]: float32 [2**bits]."""
  if bits == 1:
    a = np.sqrt(2.0 / np.pi) / stats.norm.ppf(NF_OFFSET)
    levels = np.array([-a, a])
  else:
    half = 2 ** (bits - 1)
    pos = stats.norm.ppf(np.linspace(NF_OFFSET, 0.5, half + 1)[:-1])
    neg = -stats.norm.ppf(np.linspace(NF_OFFSET, 0.5, half)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    levels = levels / np.abs(levels).max()
  out = levels.astype(np.float32)
  out.setflags(write=False)
  return out
