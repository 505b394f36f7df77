"""What each platform- or device-dependent choice in `omerge_jax.trim` buys on this CPU.

`trim` does the same work two ways in four places, choosing by platform
(`lax.platform_dependent`) or by the process's device count (a mesh may shard
what a one-device process may walk a slice at a time). Each pair runs here
on the same input, its outputs asserted equal, timed interleaved (median of
``--rounds``), and written to `benchmarks/trim_branches.json`; RESULTS.md
quotes it with the TPU plan of the one choice the TPU makes differently
(`bench_plan.sample_statistic`). Run `python benchmarks/trim_branches.py`
(about a minute on 2 cores).

* leaf histogram (`trim._leaf_histogram`): a 2**16-bin histogram of a
  4096x1024 leaf in slices of the leading axis (one CPU device) or as one
  scatter (elsewhere).
* sample rows (`trim._rows_histogram`): the radix select of 64 samples of
  2**16 entries, a row at a time (one device) or batched (``vmap``, where a
  mesh may shard the rows).
* samples ranked (`trim._rank_samples`): the sampled selection of 64 leaves
  of 256x1024, each sample alone by a radix select (CPU) or all in one sort
  (GPU and TPU).
* stacked slices (`trim.keep_mask`): the exact selection of an 8 x 512 x 600
  stacked leaf, a slice at a time (``lax.map``, one device) or vmapped with
  its conditionals reduced over the slices (where the stacked axis may be
  sharded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import HERE, REPEAT, interleaved_medians, last_run, machine  # noqa: E402
from harness import RESERVE_P as P  # noqa: E402
from omerge_jax import trim  # noqa: E402

JSON = os.path.join(HERE, "trim_branches.json")
PLAN = os.path.join(HERE, "plan.json")


@contextlib.contextmanager
def taking(branch=None, devices=None):
  """Trace with every `lax.platform_dependent` taking ``branch`` and ``devices`` devices claimed."""
  platform_dependent, device_count = trim.lax.platform_dependent, trim.jax.device_count
  if branch is not None:
    trim.lax.platform_dependent = lambda *a, cpu, default: {"cpu": cpu, "default": default}[branch](
      *a
    )
  if devices is not None:
    trim.jax.device_count = lambda: devices
  try:
    yield
  finally:
    trim.lax.platform_dependent, trim.jax.device_count = platform_dependent, device_count


def pairs():
  """choice -> (input, {way: jitted function compiled under that way})."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  bins = lambda x: trim._magnitude_bits(x) >> 15
  leaf = normal(4096, 1024)
  rows = trim._magnitude_bits(normal(64, trim.SAMPLE_SIZE))
  ranks = jnp.full((64,), trim.SAMPLE_SIZE // 100, jnp.uint32)
  leaves = [normal(256, 1024) for _ in range(64)]
  stacked = normal(8, 512, 600)

  def keep(x, one_at_a_time):
    return jax.vmap(trim.ties_keep_mask)(x, trim._select_slices(x, P, one_at_a_time))

  cases = {
    "leaf histogram": (
      leaf,
      {
        "in slices (one CPU device)": (lambda x: trim._leaf_histogram(x, bins, 1 << 16), {}),
        "one scatter (elsewhere)": (lambda x: trim._histogram(bins(x), 1 << 16), {}),
      },
    ),
    "sample rows (64 x 2**16)": (
      rows,
      {
        "a row at a time (one device)": (lambda b: trim._radix_statistic(ranks, b), {}),
        "batched (several devices)": (
          lambda b: trim._radix_statistic(ranks, b),
          {"devices": 2},
        ),
      },
    ),
    "samples ranked (64 leaves)": (
      leaves,
      {
        "radix select each (CPU)": (
          lambda t: trim.ties_select_many(t, P, "sampled"),
          {"branch": "cpu"},
        ),
        "one sort of all (GPU, TPU)": (
          lambda t: trim.ties_select_many(t, P, "sampled"),
          {"branch": "default"},
        ),
      },
    ),
    "stacked slices (8 x 512 x 600, exact)": (
      stacked,
      {
        "lax.map (one device)": (lambda x: keep(x, True), {}),
        "vmap (several devices)": (lambda x: keep(x, False), {}),
      },
    ),
  }
  out = {}
  for choice, (arg, ways) in cases.items():
    compiled = {}
    for way, (fn, how) in ways.items():
      with taking(**how):
        compiled[way] = jax.jit(fn).lower(arg).compile()
    results = [jax.tree.map(np.asarray, c(arg)) for c in compiled.values()]
    for other in results[1:]:
      jax.tree.map(np.testing.assert_array_equal, results[0], other)
    out[choice] = (arg, compiled)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  info = machine()
  runs = {}
  for choice, (arg, compiled) in pairs().items():
    for way, fn in compiled.items():
      runs[(choice, way)] = lambda fn=fn, arg=arg: fn(arg)
  med = interleaved_medians(runs, args.rounds)
  out = {
    "machine": f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}",
    "load_average": os.getloadavg(),
    "date": info["date_utc"] + " UTC",
    "rounds": args.rounds,
    "ms": {choice: {} for choice, _ in med},
  }
  for (choice, way), seconds in med.items():
    out["ms"][choice][way] = seconds * 1e3
  with open(JSON, "w") as f:
    json.dump(out, f, indent=1)
  print(render(out))


def render(result):
  """Markdown section: each choice's two ways, their CPU times, the TPU plan where it differs."""
  lines = [
    "## What each platform- or device-dependent choice of trim.py buys "
    "(`python benchmarks/trim_branches.py`)",
    "",
    f"The same work done both ways on this CPU (outputs asserted equal), timed interleaved, "
    f"median over {result['rounds']} rounds ({REPEAT} calls in a row per way, the first "
    f"untimed); {result['machine']}, load average at the end "
    f"{tuple(round(x, 2) for x in result['load_average'])}, {result['date']}. The first way "
    "is the one this CPU takes.",
    "",
    "| choice | way taken here | ms | other way | ms | other / taken |",
    "|---|---|---:|---|---:|---:|",
  ]
  for choice, ways in result["ms"].items():
    (taken, t), (other, o) = ways.items()
    lines.append(f"| {choice} | {taken} | {t:.2f} | {other} | {o:.2f} | {o / t:.2f} |")
  plan = last_run(PLAN)
  statistic = (plan or {}).get("sample_statistic")
  if statistic:
    radix, sort = statistic.values()
    lines += [
      "",
      "On TPU the one choice made differently is how the samples are ranked: in the plan "
      f"of one 2**16-entry sample on a v5e chip, the radix select is {radix['ops']} top-level "
      f"ops and {radix['estimated_cycles']:,.0f} estimated cycles (its "
      f"{radix['scatter_fusions']} scatter fusions carry none), one sort {sort['ops']} ops and "
      f"{sort['estimated_cycles']:,.0f} cycles (`bench_plan.py`'s section). The other "
      "three choices are made by the device count: a TPU or GPU mesh takes their second way.",
    ]
  return "\n".join(lines) + "\n"


def section():
  """`render` of the last run (`trim_branches.json`), or "" when there is none."""
  result = last_run(JSON)
  return render(result) if result else ""


if __name__ == "__main__":
  main()
