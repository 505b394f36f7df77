"""How the step time grows: with the parameter count, and with the number of leaves.

The same interleaved step timing as `step_time` (`harness`), on fresh trees:
4 leaves of n/4 params for growing n (linear growth means a constant time per
param; the least-squares and marginal slopes say how close), and the 16.8M
params of `step_time` spread over more, smaller leaves, since TIES selects
per leaf. Run by `bench_step.py`, which writes the figures to `results.json`.
"""

from __future__ import annotations

import numpy as np

from harness import COLUMNS, LEAVES, time_fresh_trees


def scaling(sizes, rounds):
  """Median seconds per step of each optimizer at each param count in ``sizes``."""
  out = {}
  for n in sizes:
    out[n] = time_fresh_trees(n, LEAVES, rounds)
    print(f"{n / 1e6:.1f}M params:", {k: f"{v * 1e3:.1f} ms" for k, v in out[n].items()})
  return out


def leaf_counts(num_params, counts, rounds):
  """The same ``num_params`` params in each number of leaves of ``counts``: what a per-leaf cost adds."""
  out = {}
  for leaves in counts:
    out[leaves] = time_fresh_trees(num_params, leaves, rounds)
    print(f"{leaves} leaves:", {k: f"{v * 1e3:.1f} ms" for k, v in out[leaves].items()})
  return out


def fit_slope(sizes, seconds):
  """Least-squares line t = a + b n; b in ns/param, worst relative residual."""
  n = np.asarray(sizes, float)
  t = np.asarray(seconds, float)
  b, a = np.polyfit(n, t, 1)
  worst = float(np.max(np.abs((a + b * n - t) / t)))
  return b * 1e9, a * 1e3, worst


def slopes(sizes, times):
  """`fit_slope` of each optimizer over the ``times`` of `scaling`."""
  names = times[sizes[0]]
  return {name: fit_slope(sizes, [times[n][name] for n in sizes]) for name in names}


def leaves_section(leaf_counts):
  names = list(next(iter(leaf_counts.values())))
  lines = [
    "## The same 16.8M params in more leaves (x AdamW in each run)",
    "",
    "Real models have many leaves, most far smaller than 4096x1024; TIES selects per leaf.",
    "",
    "| leaves | shape | " + " | ".join(f"{k} ms (x AdamW)" for k in names) + " |",
    "|---:|---|" + "---:|" * len(names),
  ]
  for leaves, times in leaf_counts.items():
    rows = LEAVES * 4096 // leaves
    cells = " | ".join(f"{t * 1e3:.1f} ({t / times['adamw']:.2f})" for t in times.values())
    lines.append(f"| {leaves} | {rows}x{COLUMNS} | {cells} |")
  return "\n".join(lines)


def scaling_section(sizes, scaling, slopes):
  names = list(slopes)
  lines = [
    "## Scaling (4 leaves of n/4 float32 params each)",
    "",
    "| params | " + " | ".join(f"{k} ms" for k in names) + " |",
    "|---:|" + "---:|" * len(names),
  ]
  for n in sizes:
    cells = " | ".join(f"{scaling[n][k] * 1e3:.1f}" for k in names)
    lines.append(f"| {n / 1e6:.1f}M | {cells} |")
  lines += [
    "",
    "Slope: least-squares line t = a + b n over all sizes, and the marginal "
    "slope between the two largest sizes (where per-leaf constants no longer "
    "count). Linear growth means time per param constant across sizes and "
    "t(largest) / t(second largest) equal to the size ratio "
    f"({sizes[-1] // sizes[-2]}).",
    "",
    "| optimizer | LS slope (ns/param) | marginal slope (ns/param) | "
    + " | ".join(f"ns/param at {n / 1e6:.1f}M" for n in sizes)
    + " | t ratio of the two largest |",
    "|---|---:|---:|" + "---:|" * len(sizes) + "---:|",
  ]
  for name, (b, _, _) in slopes.items():
    t = [scaling[n][name] for n in sizes]
    marginal = (t[-1] - t[-2]) / (sizes[-1] - sizes[-2]) * 1e9
    per = " | ".join(f"{ti / n * 1e9:.2f}" for ti, n in zip(t, sizes, strict=True))
    lines.append(f"| {name} | {b:.2f} | {marginal:.2f} | {per} | {t[-1] / t[-2]:.2f} |")
  return "\n".join(lines)
