r"""The comparisons read along the learning rate: where AdamW pays a real tax, and whether a claim holds at every rate.

Each method reports the setting its own search selected, and at the selected
settings AdamW may pay almost no tax (0.7 points in the run behind
docs/RESULTS.md): "does online merging mitigate a real tax?" then has little
to answer, and a verdict seen at one learning rate may not hold at the next.
Two readings put every method at one learning rate
:math:`\eta_s = s \cdot \texttt{pref\_lr}`, with :math:`s` a scale of AdamW's
search (``config.LR_SCALES``: 0.5, 1, 2) and every other setting as the
method selected:

- **The common learning rate** (`common_scale`, ``Config.common_lr_band``):
  the scale at which AdamW's mean test tax lies in a band, 3 to 10 points in
  the ``paper`` preset (`RULE`). It is read from AdamW's runs alone, before
  any other method trains, so no method's result can move it; it picks where
  the methods are compared, never which setting a method reports. A band no
  scale reaches gives no comparison, said so: nothing is extrapolated and no
  learning rate outside the search is run.
- **The claims over the learning rate** (`robustness`, ``Config.lr_sweep``):
  each claim's verdict at every scale of AdamW's search, with the sweeps'
  values the claims compare (``Config.lr_sweep_sweeps``) repeated at each.
  Those scales are three values spanning 4x, fixed before any run and the
  same for every method: AdamW's own search. Picking them from results (say,
  where AdamW's tax lies in a band) would let the runs decide which rates
  count, and any rate outside the search would train every method anew. A
  claim is "stable" only when its verdict is the same at all of them.

What they cost, in runs of ``pref_steps`` per seed, in the ``paper`` preset:
every method's grid is its learning-rate search (``config.lr_search``), so
each method at any scale is a run the search already made (`runner.Runner.run`
memoises runs). The common learning rate trains nothing (it evaluates the
three offline merges of AdamW at that rate); the claims' sweep trains 14: the
7 sweep runs the claims compare (OnDARE at p = 5e-4, alpha = 1e-3 and K = 200;
OnTIES at p = 5e-4, alpha = 0, alpha = 1e-3 and K = 200) at each of the two
scales other than that merge's selected one. With GRPO's own learning-rate
search (`runner.OWN_LR_SEARCH`, 6 more GRPO runs), the preset trains 60 runs
per seed where it trained 40 (tested with a scored runner).
"""

from __future__ import annotations

RULE = (
  "the scale of AdamW's learning-rate search whose mean test tax (over seeds, at the end of the run) "
  "lies in the band, the one nearest the band's middle if several do; none if none does "
  "(no extrapolation, no learning rate outside the search)"
)

SWEEP_RULE = (
  "every scale of AdamW's learning-rate search, fixed before any run: each method at its selected "
  "setting with that scale, the sweeps of lr_sweep_sweeps through it, paired with AdamW at that scale"
)


def common_scale(taxes: dict, band: tuple) -> dict:
  """The common learning rate chosen from AdamW's mean tax at each scale of its search.

  Args:
    taxes: ``{lr_scale: AdamW's mean tax in points}``, one entry per scale of its search.
    band: ``(lo, hi)``, the tax in points at which AdamW counts as paying a real tax.

  Returns:
    The record ``results.json`` keeps: ``lr_scale`` and ``adamw_tax`` (both
    None when no scale lies in the band), ``band``, ``adamw_taxes`` (every
    scale's), ``rule`` (`RULE`) and ``reason`` (the choice in words).

  Example::

    common_scale({0.5: 0.8, 1.0: 4.9, 2.0: 21.9}, (3.0, 10.0))["lr_scale"]   # 1.0
  """
  lo, hi = band
  record = {
    "band": [lo, hi],
    "adamw_taxes": [{"lr_scale": s, "tax": t} for s, t in sorted(taxes.items())],
    "rule": RULE,
  }
  seen = ", ".join(f"{t:.1f} at lr × {s:g}" for s, t in sorted(taxes.items()))
  inside = {s: t for s, t in taxes.items() if lo <= t <= hi}
  if not inside:
    return dict(
      record,
      lr_scale=None,
      adamw_tax=None,
      reason=f"no scale of AdamW's search has a mean tax in [{lo:g}, {hi:g}] ({seen}): "
      "no common-learning-rate comparison",
    )
  middle = (lo + hi) / 2
  scale = min(inside, key=lambda s: (abs(inside[s] - middle), s))
  reason = (
    f"AdamW's mean tax is {inside[scale]:.1f} at lr × {scale:g}, inside [{lo:g}, {hi:g}] ({seen})"
  )
  if len(inside) > 1:
    reason += f"; of the {len(inside)} scales inside, the one nearest {middle:g}"
  return dict(record, lr_scale=scale, adamw_tax=inside[scale], reason=reason)


def robustness(verdicts: list[str]) -> str:
  """ "stable" when a claim's verdict is the same at every learning rate, else "fragile".

  With one seed every verdict is "undetermined (1 seed)", and so is this:
  an unanimity of non-answers says nothing about the claim.
  """
  if any(v.startswith("undetermined") for v in verdicts):
    return "undetermined (1 seed)"
  return "stable" if len(set(verdicts)) == 1 else "fragile"
