"""The TPU compiler's plan of one optimizer step, per chip, against `optax.adamw`.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
    python benchmarks/bench_plan.py            # every setting (about 15 minutes on 2 cores)
    python benchmarks/bench_plan.py --quick    # the 16.8M-param tree on v5e:2x2 only
    python benchmarks/bench_plan.py --tree Qwen2.5-0.5B   # one tree's settings, other rows kept

No TPU is needed: the step is compiled ahead of time for a TPU topology
(`tpu_aot`) and its optimised HLO read op by op (`hlo_traffic`). Figures per
chip: HBM bytes (what a memory-bound step pays), the compiler's estimated
cycles, the cost model's own "bytes accessed" (which also counts on-chip VMEM
traffic), temporaries and arguments; the time the HBM bytes imply at the
chip's bandwidth. Every figure is a plan, never a measured time. Writes
`benchmarks/plan.json`; `section()` renders it for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import harness  # noqa: E402
from omerge_jax import checkpoint  # noqa: E402
import hlo_traffic  # noqa: E402
import tpu_aot  # noqa: E402

OUT = os.path.join(HERE, "plan.json")
METHODS = ("adamw", "ondare", "onties_exact", "onties_sampled", "onties_sampled_chain")
# Goals per chip relative to AdamW, (HBM bytes, estimated cycles or None), on
# the settings (tree, topology, mesh) of GOAL_SETTINGS.
GOALS = {"ondare": (1.15, None), "onties_sampled": (1.3, 1.5), "onties_exact": (2.0, 3.0)}
GOAL_SETTINGS = {
  ("bench", "v5e:2x2", json.dumps({"fsdp": 4})),
  ("Qwen2.5-0.5B", "v5e:2x2", json.dumps({"fsdp": 4, "tp": 1})),
  ("Qwen2.5-7B", "v5p:4x4x4", json.dumps({"fsdp": 16, "tp": 4})),
}


def optimizer(name, tau):
  """The step benchmark's optimizer ``name``, on a (traced, when compiling) reference delta."""
  return harness.optimizers(tau, [name])[name]


def bench_tree(mesh, spec):
  """The CPU step benchmark's tree: 16.8M float32 params in 4 leaves of 4096x1024."""
  sharding = NamedSharding(mesh, spec)
  return {
    f"w{i}": jax.ShapeDtypeStruct((4096, 1024), jnp.float32, sharding=sharding) for i in range(4)
  }


def model_tree(name, mesh):
  """A real model's float32 params, abstract, sharded by Tunix's rules over (fsdp, tp)."""
  from experiments.llm_dpo import memory, models

  _, _, _, state, shardings = models.abstract_model(memory.CONFIGS[name], mesh)
  return tpu_aot.abstract(state.to_pure_dict(), shardings)


def compile_step(name, params, mesh):
  """AOT-compile ``update + apply_updates`` with params and state donated."""
  # Any tree shaped like the params serves as tau for the state's shapes.
  init = lambda p: optimizer(name, p).init(p)
  state = checkpoint.abstract_state(optax.GradientTransformation(init, None), params)

  def step(params, state, grads):
    # The transform closes over tau only for init; update reads the state.
    updates, state = optimizer(name, params).update(grads, state, params)
    return optax.apply_updates(params, updates), state

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
  return compiled, time.perf_counter() - start


def settings(quick):
  one = [("v5e:2x2", {"fsdp": 4}, "bench", P("fsdp"))]
  if quick:
    return one
  return one + [
    ("v5e:2x2", {"fsdp": 2, "tp": 2}, "bench", P("fsdp", "tp")),
    ("v5p:2x2x1", {"fsdp": 4}, "bench", P("fsdp")),
    # The many-leaf model: 290 leaves, most far smaller than the bench tree's.
    ("v5e:2x2", {"fsdp": 4, "tp": 1}, "Qwen2.5-0.5B", None),
    ("v5p:4x4x4", {"fsdp": 16, "tp": 4}, "Qwen2.5-7B", None),
    ("v5p:4x4x4", {"fsdp": 16, "tp": 4}, "Llama-3-8B", None),
    ("v5e:16x16", {"fsdp": 64, "tp": 4}, "Llama-3-8B", None),
  ]


def run(quick, done=lambda rows: None, trees=None, rows=()):
  """Compile every setting (of ``trees`` only, if given) after ``rows``.

  ``done(rows)`` runs after each, so a run cut short keeps its figures.
  """
  rows = list(rows)
  for topology, axes, tree, spec in settings(quick):
    if trees is not None and tree not in trees:
      continue
    mesh = tpu_aot.mesh(topology, axes)
    params = bench_tree(mesh, spec) if tree == "bench" else model_tree(tree, mesh)
    leaves = jax.tree.leaves(params)
    n = sum(x.size for x in leaves)
    # On TPU `onties` sampled runs the chain itself (`alias`): the same program.
    for name in METHODS if tree == "bench" else METHODS[:-1]:
      compiled, seconds = compile_step(name, params, mesh)
      row = dict(
        topology=topology,
        mesh=axes,
        tree=tree,
        params=n,
        leaves=len(leaves),
        method=name,
        compile_s=round(seconds, 1),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      )
      for branch in ("cheapest", "dearest"):
        s = hlo_traffic.summary(compiled, branch)
        row[branch] = {k: v for k, v in s.items() if k != "by_category"}
        row[branch]["by_category"] = s["by_category"]
      rows.append(row)
      done(rows)
      c = row["cheapest"]
      print(
        f"{topology:10s} {tree:11s} {name:22s} HBM {c['hbm_bytes'] / 1e6:9.1f} MB  "
        f"cycles {c['estimated_cycles']:11.0f}  cost model {c['cost_model_bytes'] / 1e6:9.1f} MB"
        f"  temp {c['temp_bytes'] / 1e6:7.1f} MB  ({seconds:.0f} s)",
        flush=True,
      )
  return rows


def hand_checks():
  """Two ops whose traffic is known by hand, found in the plan of the 16.8M-param tree."""
  mesh = tpu_aot.mesh("v5e:2x2", {"fsdp": 4})
  params = bench_tree(mesh, P("fsdp"))
  compiled, _ = compile_step("adamw", params, mesh)
  listing = hlo_traffic.ops(compiled.as_text())
  leaf = 4096 * 1024 * 4 // 4  # one leaf's shard on a chip: 4 MiB
  fusions = [o for o in listing if o.opcode == "fusion"]
  # AdamW's one loop per leaf reads params, grads and both moments and writes three of them.
  adam = [sum(o.read.values()) + sum(o.written.values()) for o in fusions]
  checks = [
    {
      "op": "AdamW's fused update of one leaf",
      "by hand": f"4 reads + 3 writes of a {leaf / 2**20:.0f} MiB shard = {7 * leaf / 2**20:.0f} MiB",
      "plan": f"{len(fusions)} fusions of {sorted(set(round(b / 2**20, 2) for b in adam))} MiB",
      "equal": all(abs(b - 7 * leaf) < 64 for b in adam) and len(fusions) == 4,
    }
  ]
  compiled, _ = compile_step("onties_sampled", params, mesh)
  listing = hlo_traffic.ops(compiled.as_text())
  reduces = [o for o in listing if o.opcode == "all-reduce"]
  # On TPU `onties` samples Adam's update (2**16 float32 entries per leaf), all-reduced.
  expected = 4 * 65536 * 4
  got = sum(sum(o.written.values()) for o in reduces)
  checks.append(
    {
      "op": "all-reduce of the sampled updates (one sample per leaf)",
      "by hand": f"4 leaves x 2**16 float32 = {expected / 2**20:.0f} MiB out",
      "plan": f"{len(reduces)} all-reduce(s) writing {got / 2**20:.2f} MiB",
      "equal": abs(got - expected) < 64,
    }
  )
  return checks


def sample_statistic():
  """The k-th largest of one 2**16-entry sample on one TPU chip: CPU's radix select vs one sort."""
  from omerge_jax import trim

  device = tpu_aot.devices("v5e:2x2")[0]
  bits = jax.ShapeDtypeStruct(
    (1, trim.SAMPLE_SIZE), jnp.uint32, sharding=jax.sharding.SingleDeviceSharding(device)
  )
  k = jax.ShapeDtypeStruct((1,), jnp.uint32, sharding=jax.sharding.SingleDeviceSharding(device))
  out = {}
  for name, fn in (
    ("radix select (CPU's route)", trim._radix_statistic),
    ("one sort (GPU and TPU)", trim._sorted_statistic),
  ):
    s = hlo_traffic.summary(jax.jit(fn).lower(k, bits).compile())
    out[name] = {
      "ops": s["ops"],
      "estimated_cycles": s["estimated_cycles"],
      "scatter_fusions": s["by_category"].get("scatter fusion", {}).get("count", 0),
    }
  return out


# Leaves of R x 1024 float32, sharded 4 ways over their columns on v5e:2x2:
# 1M to 39M entries per chip, around where the histogram pass stops fusing.
HISTOGRAM_ROWS = (4096, 40960, 65536, 98304, 131072, 151936)


def histogram_pass():
  """HBM bytes of one 2**16-bin histogram pass (the exact top-k's bracket pass) over one leaf."""
  from omerge_jax import trim

  mesh = tpu_aot.mesh("v5e:2x2", {"fsdp": 4})
  bins = lambda v: trim._magnitude_bits(v) >> 15
  out = []
  for rows in HISTOGRAM_ROWS:
    leaf = jax.ShapeDtypeStruct(
      (rows, 1024), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp"))
    )
    with jax.set_mesh(mesh):
      compiled = jax.jit(lambda v: trim._histogram(bins(v), 1 << 16)).lower(leaf).compile()
    s = hlo_traffic.summary(compiled)
    out.append(
      {
        "rows": rows,
        "shard_bytes": rows * 1024 * 4 // 4,  # float32 bytes over the 4 chips
        "hbm_bytes": s["hbm_bytes"],
        "by_category": {k: c["hbm"] for k, c in s["by_category"].items() if c["hbm"]},
      }
    )
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the 16.8M tree on v5e:2x2 only")
  parser.add_argument("--no-write", action="store_true", help=f"print only, keep {OUT}")
  parser.add_argument(
    "--tree",
    action="append",
    help="compile only this tree's settings (bench or a model; repeatable), keeping the other "
    f"rows of {OUT}",
  )
  args = parser.parse_args()
  if not tpu_aot.available():
    sys.exit('bench_plan needs libtpu: pip install "jax[tpu]==%s"' % jax.__version__)
  checks = hand_checks()
  for c in checks:
    print(f"hand check: {c['op']}: {c['by hand']}; plan: {c['plan']}; equal: {c['equal']}")
  statistic = sample_statistic()
  print(statistic)
  histograms = histogram_pass()
  result = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (compile only)",
    "jax": jax.__version__,
    "libtpu": importlib.metadata.version("libtpu"),
    "optax": optax.__version__,
    "reserve_p": harness.RESERVE_P,
    "weight_decay": harness.WEIGHT_DECAY,
    "quick": args.quick,
    "hand_checks": checks,
    "sample_statistic": statistic,
    "histogram_pass": histograms,
    "rows": [],
  }

  # Rows kept from an earlier run (--tree) and new ones, in the settings' order.
  order = [(t, json.dumps(a, sort_keys=True), tree) for t, a, tree, _ in settings(False)]
  position = lambda r: order.index(
    (r["topology"], json.dumps(r["mesh"], sort_keys=True), r["tree"])
  )

  def done(rows):
    result["rows"] = sorted(rows, key=position)
    if not args.no_write:
      with open(OUT, "w") as f:
        json.dump(result, f, indent=1)

  kept = []
  if args.tree:
    last = harness.last_run(OUT) or {"rows": []}
    kept = [r for r in last["rows"] if r["tree"] not in args.tree]
  run(args.quick, done, args.tree, kept)
  print(section(result))


def _goal_text(goal):
  if goal is None:
    return ""
  return f"<= {goal[0]} bytes" + ("" if goal[1] is None else f", <= {goal[1]} cycles")


def _ratio(x, base):
  return x / base if base else float("nan")


def section(result=None) -> str:
  """The markdown section of benchmarks/RESULTS.md ('' without plan.json)."""
  result = result or harness.last_run(OUT)
  if result is None:
    return ""
  rows = result["rows"]
  lines = [
    "## The TPU compiler's plan of the step (`python benchmarks/bench_plan.py`)",
    "",
    f"Compiled ahead of time for TPU topologies on a CPU machine (no TPU ran): jax {result['jax']}, "
    f"libtpu {result['libtpu']}, {result['date']} (each table's own date beside it); "
    f"p = {result['reserve_p']}, weight decay "
    f"{result['weight_decay']}, params and state donated. Per chip. **A plan, not a timing.** "
    "HBM = bytes the optimised HLO's top-level ops read and write in HBM (`hlo_traffic`); "
    "cycles = the sum of the TPU compiler's `estimated_cycles` per op; cost model = "
    "`cost_analysis()['bytes accessed']`. HBM time = HBM bytes / the chip's HBM bandwidth. "
    "Exact top-k: the bracket-hit branches (the usual case), the dearest branches in brackets.",
    "",
  ]
  groups = {}
  for r in rows:
    groups.setdefault((r["topology"], json.dumps(r["mesh"]), r["tree"]), []).append(r)
  for (topology, mesh, tree), group in groups.items():
    base = next(r for r in group if r["method"] == "adamw")["cheapest"]
    chip = tpu_aot.chip(topology)
    r0 = group[0]
    # A run with --tree keeps the other trees' rows from earlier runs.
    lines += [
      f"### {tree} ({r0['params'] / 1e6:,.1f}M float32 params, {r0['leaves']} leaves) on "
      f"{topology}, mesh {mesh}",
      "",
      f"Compiled {r0.get('date', result['date'])}.",
      "",
      "| optimizer | HBM MB | x AdamW | HBM time (us) | est. cycles x AdamW | cost model x AdamW "
      "| temporaries MB | arguments MB | goal | |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in group:
      c, d = r["cheapest"], r["dearest"]
      hbm = _ratio(c["hbm_bytes"], base["hbm_bytes"])
      spread = lambda key, c=c, d=d, base=base: (
        ""
        if abs(d[key] - c[key]) < 1e-6 * max(1.0, c[key])
        else f" ({_ratio(d[key], base[key]):.2f})"
      )
      cycles = _ratio(c["estimated_cycles"], base["estimated_cycles"])
      goal = GOALS.get(r["method"]) if (tree, topology, mesh) in GOAL_SETTINGS else None
      verdict = ""
      if goal is not None:
        met = hbm <= goal[0] and (goal[1] is None or cycles <= goal[1])
        verdict = "met" if met else "NOT met"
      lines.append(
        f"| {r['method']} | {c['hbm_bytes'] / 1e6:,.1f} | {hbm:.2f}{spread('hbm_bytes')} | "
        f"{c['hbm_bytes'] / chip.hbm_bandwidth * 1e6:,.0f} | "
        f"{cycles:.2f}{spread('estimated_cycles')} | "
        f"{_ratio(c['cost_model_bytes'], base['cost_model_bytes']):.2f} | "
        f"{c['temp_bytes'] / 1e6:,.1f} | {c['argument_bytes'] / 1e6:,.1f} | "
        f"{_goal_text(goal)} | {verdict} |"
      )
    lines.append("")
  first = groups[next(iter(groups))]
  lines += [
    f"Where the bytes and cycles go ({first[0]['tree']} on {first[0]['topology']}): per kind of "
    "top-level op, HBM MB / all memory spaces MB / estimated cycles.",
    "",
    "| kind | " + " | ".join(r["method"] for r in first) + " |",
    "|---|" + "---:|" * len(first),
  ]
  kinds = sorted(
    {k for r in first for k in r["cheapest"]["by_category"]},
    key=lambda k: (-max(r["cheapest"]["by_category"].get(k, {}).get("all", 0) for r in first), k),
  )
  for kind in kinds:
    found = [r["cheapest"]["by_category"].get(kind) for r in first]
    if all(c is None or (c["all"] < 5e4 and c["cycles"] == 0) for c in found):
      continue  # scalar bookkeeping
    cells = [
      "" if c is None else f"{c['hbm'] / 1e6:.1f} / {c['all'] / 1e6:.1f} / {c['cycles']:,.0f}"
      for c in found
    ]
    if any(cells):
      lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines += ["", "Hand checks of the accounting:", ""]
  for c in result["hand_checks"]:
    lines.append(
      f"- {c['op']}: by hand {c['by hand']}; plan {c['plan']} "
      f"({'equal' if c['equal'] else 'NOT equal'})."
    )
  lines += [
    "",
    "The threshold of one 2**16-entry sample on one v5e chip:",
    "",
    "| route | top-level ops | estimated cycles | scatter fusions (no cycles) |",
    "|---|---:|---:|---:|",
  ]
  for name, c in result.get("sample_statistic", {}).items():
    lines.append(
      f"| {name} | {c['ops']} | {c['estimated_cycles']:,.0f} | {c['scatter_fusions']:g} |"
    )
  lines += [
    "",
    "One 2**16-bin histogram pass (the exact top-k's bracket pass) over one float32 leaf of "
    "R x 1024 sharded over its columns on v5e:2x2, in passes over the chip's shard:",
    "",
    "| R | entries per chip | HBM MB | shard passes | HBM MB by kind of op |",
    "|---:|---:|---:|---:|---|",
  ]
  for h in result.get("histogram_pass", []):
    kinds = ", ".join(f"{k} {b / 1e6:,.1f}" for k, b in h["by_category"].items() if b >= 1e6)
    lines.append(
      f"| {h['rows']:,} | {h['shard_bytes'] // 4 / 1e6:.1f}M | {h['hbm_bytes'] / 1e6:,.1f} | "
      f"{h['hbm_bytes'] / h['shard_bytes']:.2f} | {kinds} |"
    )
  lines += ["", PLAN_NOTES]
  return "\n".join(lines)


PLAN_NOTES = """What the cost model does and does not see (libtpu's plan of these steps):

- `cost_analysis()['bytes accessed']` is not HBM traffic. The compiler's
  memory-space assignment stages most buffers of these steps in VMEM
  (layouts marked `S(1)`), prefetching with `copy-start`/`slice-start`; the
  cost model counts both the copy and the fusion's read of the copy. AdamW's
  step: 445 MB counted, 117 MB in HBM (4 leaves x 7 words x 4 MiB).
- Gathers dominate its count: the sample of one 4 MiB shard (2**16 scalar
  gathers) is counted as about 320 MB, some 4 KiB (one (8, 128) tile) per
  gathered scalar, while the shard crosses HBM once when it is staged. Every
  chip gathers all 2**16 positions of a sharded leaf (masked to its shard,
  then all-reduced), so this work does not shrink as the mesh grows.
- Scatter fusions (the histogram passes) and gathers carry no
  `estimated_cycles`: the cycle column leaves out exactly the parts of
  OnTIES whose TPU speed is least known. On GPU and TPU the sample's order
  statistics come from one sort (a radix select of scatter-add histograms
  and prefix sums on CPU: the same thresholds).
- Conditionals (exact top-k's bracket miss, split bin and tie cut) are
  planned for every branch; the tables show the usual branches and, in
  brackets, the dearest.
- A histogram pass reads its leaf once while the leaf has up to about 10M
  entries per chip (the table above): the scatter computes its bins as it
  reads. Above that the plan moves the bins through HBM before the scatter
  reads them: 3 passes over the shard from about 17M entries, 7 from about
  34M, where the scatter's array of ones is written out too, 9 where the
  shard's columns are not a multiple of 128 (a reshape). Qwen2.5-0.5B's embedding (151936 x 896,
  34M entries per chip on v5e:2x2) is such a leaf: its bracket pass alone
  plans 1,225 MB (9 passes over its 136 MB shard; the exact step plans
  7,221 MB), about 0.31x of AdamW's 3,460 MB more than one read. At one
  read the exact step would plan about 1.78x (an estimate), within its
  goal (2.0x; it plans 2.09x). Splitting the pass into smaller scatters
  would need a slice along an axis that is not sharded, which an
  Auto-sharded leaf does not tell at trace time; not done. On Qwen2.5-7B's
  v5p-64 mesh the largest leaves (embedding, LM head) have 8.5M entries
  per chip, but every large leaf's shard is 224 columns wide (3,584 / 16),
  not a multiple of 128: each bracket pass moves its bins through HBM to
  flatten them for the scatter (reshape 806 MB, copy 232 MB, and the
  scatter's 997 MB read of the flat bins, of the exact step's 8,134 MB,
  where one read of the updates is about 476 MB). At one read a pass the
  step would plan about 1.97x AdamW's bytes (an estimate; it plans 2.44x).
"""


if __name__ == "__main__":
  main()
