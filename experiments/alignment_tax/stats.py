r"""Paired comparisons over seeds: mean differences, 95 % intervals, verdicts.

Every method runs from the same base and SFT models on each seed, so the
comparison of method A with method B is the per-seed difference
:math:`d_i = m_A(i) - m_B(i)`, which cancels the seed's own luck (its SFT
model, its data). With :math:`n` seeds the interval is Student's t:

.. math::
  \bar d \pm t_{0.975,\,n-1}\, s_d / \sqrt{n}.

A verdict reads the interval, never the point estimate: "better" or "worse"
only when it excludes zero, otherwise "indistinguishable", and with one seed,
where there is no interval, "undetermined (1 seed)"; a claim of the paper is
"reproduced" only when the interval excludes zero in the paper's direction.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as scipy_stats

LEVEL = 0.95


def paired(a: list[float], b: list[float]) -> dict:
  """Mean of ``a[i] - b[i]`` with its 95 % t-interval (``lo``, ``hi``) and ``n``.

  With one seed there is no interval: ``lo`` and ``hi`` are -inf and +inf, so
  no claim is reproduced and every `verdict` is "undetermined (1 seed)".
  """
  if len(a) != len(b) or not a:
    raise ValueError(
      f"paired differences need two equal, non-empty lists; got {len(a)} and {len(b)}"
    )
  d = np.asarray(a, float) - np.asarray(b, float)
  n, mean = len(d), float(np.mean(d))
  if n < 2:
    return {"mean": mean, "lo": -math.inf, "hi": math.inf, "n": n}
  half = float(scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1) * np.std(d, ddof=1) / math.sqrt(n))
  return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n}


def verdict(diff: dict, higher_is_better: bool = True) -> str:
  """ "better", "worse" or "indistinguishable" from a `paired` interval; "undetermined (1 seed)" without one."""
  if diff["n"] < 2:
    return "undetermined (1 seed)"
  if diff["lo"] > 0:
    return "better" if higher_is_better else "worse"
  if diff["hi"] < 0:
    return "worse" if higher_is_better else "better"
  return "indistinguishable"


def reproduced(diff: dict, paper_sign: int) -> bool:
  """Whether the interval excludes zero on the side the paper claims (+1 or -1)."""
  return diff["lo"] > 0 if paper_sign > 0 else diff["hi"] < 0


def fmt(diff: dict, digits: int = 1) -> str:
  """``+1.2 [-0.3, +2.7]``: the mean difference and its interval."""
  if not math.isfinite(diff["lo"]):
    return f"{diff['mean']:+.{digits}f} [no interval: 1 seed]"
  return f"{diff['mean']:+.{digits}f} [{diff['lo']:+.{digits}f}, {diff['hi']:+.{digits}f}]"
