r"""Where a method lies against AdamW's reward/tax frontier, seed by seed.

The paper's claim is a better trade-off: more reward *at* less tax. A method
that only moves less than AdamW lands lower on AdamW's own curve, and a
comparison with AdamW at one setting cannot tell that from a better curve.
AdamW's curve on seed :math:`i` is the Pareto envelope of that seed's AdamW
runs and checkpoints (every learning rate of its search, every checkpoint
along the run) and its SFT model, joined by straight segments: the frontier
drawn on the Pareto figure. Along it the reward :math:`R_i(t)` rises with the
tax :math:`t`, so it has an inverse :math:`T_i(r)`. A method's point
:math:`(t_i, r_i)` gives two readings,

.. math::
  \Delta r_i = r_i - R_i(t_i) \quad \text{(reward over AdamW's at the same tax)},
  \qquad
  \Delta t_i = t_i - T_i(r_i) \quad \text{(tax over AdamW's at the same reward)},

each paired over the seeds with its 95 % interval (`stats.paired`). "Above the
frontier" is :math:`\Delta r > 0` and :math:`\Delta t < 0`.

No extrapolation: beyond the frontier's ends (a tax below its lowest or above
its highest, likewise the reward) there is no AdamW to compare with, so a
reading outside on any seed is reported as outside, with its seeds, and the
verdict rests on the other reading, or says "outside" when both are.
"""

from __future__ import annotations

import numpy as np

from experiments.alignment_tax import stats


def envelope(points):
  """The points no other point beats on both coordinates (higher is better on both), by increasing first one."""
  points = set(points)
  return sorted(
    p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)
  )


def seed_frontier(results: dict, seed: int) -> list[tuple[float, float]]:
  """AdamW's frontier on the ``seed``-th seed: ``(tax, reward)`` vertices by increasing tax."""
  rows = list(results.get("adamw_frontier") or []) + [results["methods"]["SFT"]]
  # Less tax is better: the envelope of (-tax, reward), read back from the low-tax end.
  points = [(-r["per_seed"]["tax"][seed], r["per_seed"]["reward"][seed]) for r in rows]
  return [(-t, r) for t, r in reversed(envelope(points))]


def _on_segments(x: float, xs, ys):
  """``y`` at ``x`` on the segments through ``(xs, ys)`` (``xs`` increasing); None outside ``[xs[0], xs[-1]]``."""
  if not xs[0] <= x <= xs[-1]:
    return None
  return float(np.interp(x, xs, ys))


def readings(results: dict, row: dict) -> dict:
  """Per seed, AdamW's reward at ``row``'s tax and AdamW's tax at ``row``'s reward (None outside the frontier)."""
  out = {"reward": [], "tax": []}
  for i, (tax, reward) in enumerate(
    zip(row["per_seed"]["tax"], row["per_seed"]["reward"], strict=True)
  ):
    taxes, rewards = zip(*seed_frontier(results, i), strict=True)
    out["reward"].append(_on_segments(tax, taxes, rewards))
    out["tax"].append(_on_segments(reward, rewards, taxes))
  return out


def compare(results: dict, row: dict) -> dict:
  """``row`` against AdamW's frontier.

  Returns ``reward`` and ``tax``: for each reading, ``adamw`` (AdamW's value
  per seed, None outside), ``outside`` (the seeds where it is) and ``diff``
  (`stats.paired` of ``row`` minus AdamW, None unless every seed is inside);
  and ``verdict``: "above AdamW's frontier" / "below AdamW's frontier" when
  every reading inside excludes zero on that side, "indistinguishable from
  AdamW's frontier" otherwise, "outside AdamW's frontier" when no reading is
  inside, and "undetermined (1 seed)" with one seed.
  """
  adamw = readings(results, row)
  out = {}
  for key in ("reward", "tax"):
    outside = [i for i, v in enumerate(adamw[key]) if v is None]
    diff = None if outside else stats.paired(row["per_seed"][key], adamw[key])
    out[key] = {"adamw": adamw[key], "outside": outside, "diff": diff}
  inside = [
    (out[key]["diff"], sign) for key, sign in (("reward", +1), ("tax", -1)) if out[key]["diff"]
  ]
  if not inside:
    out["verdict"] = "outside AdamW's frontier"
  elif inside[0][0]["n"] < 2:
    out["verdict"] = "undetermined (1 seed)"
  elif all(stats.reproduced(d, sign) for d, sign in inside):
    out["verdict"] = "above AdamW's frontier"
  elif all(stats.reproduced(d, -sign) for d, sign in inside):
    out["verdict"] = "below AdamW's frontier"
  else:
    out["verdict"] = "indistinguishable from AdamW's frontier"
  return out
