"""Step time and state memory of OnDARE / OnTIES against `optax.adamw`.

Run `python benchmarks/bench_step.py` (about 10 minutes on 2 cores; `--quick`
for a 2-minute smoke run). Prints the figures and writes
`benchmarks/RESULTS.md` next to this file.

Every step is `jax.jit`-compiled with the params and the optimizer state
donated, exactly as a training loop would run it. Methods are timed
interleaved (one step of each, in turn, per round) so that load from other
processes on the machine hits them alike; a figure is the median over the
rounds, and every ratio divides two medians of the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import omerge_jax  # noqa: E402
from omerge_jax import sparsify  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 1e-3
WEIGHT_DECAY = 1e-4  # optax.adamw's default, given to every method alike
RESERVE_P = 0.01
COLUMNS = 1024
LEAVES = 4
REPEAT = 3  # steps in a row per method and round, the first untimed (interleaved_medians)


def make_tree(num_params, seed, scale=1.0, leaves=LEAVES):
  rows = num_params // (leaves * COLUMNS)
  keys = jax.random.split(jax.random.PRNGKey(seed), leaves)
  return {f"w{i}": scale * jax.random.normal(keys[i], (rows, COLUMNS)) for i in range(leaves)}


def optimizers(tau):
  return {
      "adamw": optax.adamw(LR, weight_decay=WEIGHT_DECAY),
      "ondare": omerge_jax.ondare(LR, tau, reserve_p=RESERVE_P, weight_decay=WEIGHT_DECAY),
      "onties_exact": omerge_jax.onties(LR, tau, reserve_p=RESERVE_P, weight_decay=WEIGHT_DECAY),
      "onties_sampled": omerge_jax.onties(
          LR, tau, reserve_p=RESERVE_P, weight_decay=WEIGHT_DECAY, topk="sampled"
      ),
      # The same optimizer as onties_sampled, as `online_merge` after another
      # optimizer is used: the trim samples the update itself.
      "onties_sampled_chain": optax.chain(
          optax.scale_by_adam(),
          optax.scale_by_learning_rate(LR),
          omerge_jax.online_merge(tau, method="ties", reserve_p=RESERVE_P, topk="sampled"),
          omerge_jax.decoupled_weight_decay(LR, WEIGHT_DECAY),
      ),
  }


def make_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(0, 1))


def interleaved_medians(runs, rounds, repeat=REPEAT):
  """Median seconds per call of each ``runs[name]()``, timed in interleaved rounds.

  ``runs[name]()`` takes one step and returns something to wait on. Each
  round runs every method in turn, so that load from other processes hits
  them alike; inside a round a method takes ``repeat`` steps in a row and
  only those after the first are timed. The first step after another
  method's pays for what that method left behind: OnTIES sampled's step
  took about 10 ms more right after the exact step, which frees 273 MB of
  temporaries, than after OnDARE's, so the order of the methods biased them.
  """
  times = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      for i in range(repeat):
        start = time.perf_counter()
        jax.block_until_ready(run())
        if i:
          times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def time_interleaved(txs, params, grad_sets, rounds, warmup=3):
  """Median seconds per step of each optimizer (`interleaved_medians`)."""
  runs = {}
  for name, tx in txs.items():
    step = make_step(tx)
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    for i in range(warmup):  # compile, and leave Adam's degenerate first step behind
      p, s = step(p, s, grad_sets[i % len(grad_sets)])
    jax.block_until_ready(p)

    def run(step=step, box=[p, s], i=[0]):
      box[0], box[1] = step(box[0], box[1], grad_sets[i[0] % len(grad_sets)])
      i[0] += 1
      return box[0]

    runs[name] = run
  return interleaved_medians(runs, rounds)


def time_fresh_trees(num_params, leaves, rounds):
  """`time_interleaved` on new params, reference delta and two gradients of ``leaves`` leaves."""
  params = make_tree(num_params, 0, leaves=leaves)
  tau = make_tree(num_params, 1, scale=0.01, leaves=leaves)
  grad_sets = [make_tree(num_params, 10 + j, leaves=leaves) for j in range(2)]
  return time_interleaved(optimizers(tau), params, grad_sets, rounds, warmup=2)


def temporaries(txs, params, grads):
  """Bytes of temporary buffers of each compiled step (XLA's memory analysis)."""
  out = {}
  for name, tx in txs.items():
    compiled = make_step(tx).lower(params, tx.init(params), grads).compile()
    out[name] = int(compiled.memory_analysis().temp_size_in_bytes)
  return out


def adam_update_after(params, grad_sets, steps=4):
  """A realistic proposed update: lr * Adam direction after a few steps."""
  tx = optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(LR))
  state = tx.init(params)
  for i in range(steps):
    updates, state = tx.update(grad_sets[i % len(grad_sets)], state)
  return updates


def tree_bytes(tree):
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def memory_table(params, tau):
  """Optimizer-state bytes, from the state pytree's shapes (nothing allocated)."""
  pbytes = tree_bytes(params)
  rows = []
  configs = {
      "adamw": optax.adamw(LR),
      "ondare": omerge_jax.ondare(LR, tau),
      "ondare, reference_dtype=bfloat16": omerge_jax.ondare(LR, tau, reference_dtype=jnp.bfloat16),
      "ondare, merge_every=4": omerge_jax.ondare(LR, tau, merge_every=4),
      "onties": omerge_jax.onties(LR, tau),
      "onties, reference_dtype=bfloat16": omerge_jax.onties(LR, tau, reference_dtype=jnp.bfloat16),
      "onties, merge_every=4": omerge_jax.onties(LR, tau, merge_every=4),
  }
  adam_bytes = tree_bytes(jax.eval_shape(configs["adamw"].init, params))
  for name, tx in configs.items():
    state = jax.eval_shape(tx.init, params)
    is_merge = lambda x: isinstance(x, omerge_jax.OnlineMergeState)
    merge = [s for s in jax.tree.leaves(state, is_leaf=is_merge) if is_merge(s)]
    ref = tree_bytes(merge[0].reference) if merge else 0
    acc = tree_bytes(merge[0].accumulator) if merge and merge[0].accumulator is not None else 0
    total = tree_bytes(state)
    rows.append({
        "config": name,
        "state_x_params": total / pbytes,
        "extra_over_adamw_x_params": (total - adam_bytes) / pbytes,
        "reference_x_params": ref / pbytes,
        "accumulator_x_params": acc / pbytes,
    })
  return rows


def selection_accuracy(update):
  out = {}
  for name, leaf in update.items():
    n = leaf.size
    k = math.floor(RESERVE_P * n)
    exact = int(jnp.sum(sparsify.ties(leaf, RESERVE_P, "exact") != 0))
    sampled = int(jnp.sum(sparsify.ties(leaf, RESERVE_P, "sampled") != 0))
    out[name] = {"k": k, "exact_kept": exact, "sampled_kept_over_k": sampled / k}
  return out


MESH_CHILD = r"""
import contextlib, json, sys, time
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
import omerge_jax
rows, reps = int(sys.argv[2]), int(sys.argv[3])
keys = jax.random.split(jax.random.PRNGKey(0), 12)
params = {f"w{i}": jax.random.normal(keys[i], (rows, 1024)) for i in range(4)}
tau = {f"w{i}": 0.01 * jax.random.normal(keys[4 + i], (rows, 1024)) for i in range(4)}
grads = [
    {f"w{i}": jax.random.normal(jax.random.fold_in(keys[8 + i], j), (rows, 1024)) for i in range(4)}
    for j in range(3)
]
mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
spec = NamedSharding(mesh, P("fsdp", "tp"))
put = lambda t: jax.tree.map(lambda x: jax.device_put(x, spec), t)
txs = {
    "adamw": lambda t: optax.adamw(1e-3, weight_decay=1e-4),
    "ondare": lambda t: omerge_jax.ondare(1e-3, t, reserve_p=0.01, weight_decay=1e-4),
    "onties_exact": lambda t: omerge_jax.onties(1e-3, t, reserve_p=0.01, weight_decay=1e-4),
    "onties_sampled": lambda t: omerge_jax.onties(
        1e-3, t, reserve_p=0.01, weight_decay=1e-4, topk="sampled"),
}
def run(make, sharded):
  with jax.set_mesh(mesh) if sharded else contextlib.nullcontext():
    return _run(make(put(tau) if sharded else tau), sharded)
def _run(tx, sharded):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  p = put(params) if sharded else jax.tree.map(jnp.copy, params)  # donated below
  if sharded:
    shapes = jax.eval_shape(tx.init, p)
    shardings = optax.tree.map_params(tx.init, lambda _: spec, shapes,
        transform_non_params=lambda _: NamedSharding(mesh, P()))
    s = jax.jit(tx.init, out_shardings=shardings)(p)
    gs = [put(g) for g in grads]
  else:
    s = tx.init(p)
    gs = [jax.device_put(g, jax.devices()[0]) for g in grads]
  f = jax.jit(step, donate_argnums=(0, 1))
  for j in range(3):
    p, s = f(p, s, gs[j])
  first = jax.tree.map(np.asarray, p)
  ts = []
  for r in range(reps):
    t = time.perf_counter(); p, s = f(p, s, gs[r % 3]); jax.block_until_ready(p)
    ts.append(time.perf_counter() - t)
  return first, float(np.median(ts)), s
out = {}
for name, make in txs.items():
  one, t1, _ = run(make, False)
  many, t8, s8 = run(make, True)
  diff = max(float(np.max(np.abs(one[k] - many[k]))) for k in one)
  # Rounding differs between the two compiled programs; beyond rounding
  # (1e-5, a hundredth of a step) an entry was selected differently.
  moved = sum(int(np.sum(np.abs(one[k] - many[k]) > 1e-5)) for k in one)
  ref_spec = [str(x.sharding.spec) for x in jax.tree.leaves(s8) if x.ndim == 2]
  out[name] = {"one_device_s": t1, "mesh_s": t8, "max_abs_diff": diff, "moved": moved,
               "size": sum(v.size for v in one.values()), "state_specs": sorted(set(ref_spec))}
print(json.dumps(out))
"""


def mesh_run(rows, reps):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  root = os.path.join(HERE, "..")
  out = subprocess.run(
      [sys.executable, "-c", MESH_CHILD, root, str(rows), str(reps)],
      env=env, capture_output=True, text=True,
  )
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def fit_slope(sizes, seconds):
  """Least-squares line t = a + b n; b in ns/param, worst relative residual."""
  n = np.asarray(sizes, float)
  t = np.asarray(seconds, float)
  b, a = np.polyfit(n, t, 1)
  worst = float(np.max(np.abs((a + b * n - t) / t)))
  return b * 1e9, a * 1e3, worst


def machine():
  model = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {
      "cpu": model,
      "cores": os.cpu_count(),
      "load_average_at_start": os.getloadavg(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "backend": jax.default_backend(),
      "python": platform.python_version(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
  }


def goal(value, limit):
  return "met" if value <= limit else "NOT met"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (smoke run)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, quick 7)")
  parser.add_argument("--no-write", action="store_true", help="print only, keep RESULTS.md")
  parser.add_argument(
      "--render", action="store_true", help="rewrite RESULTS.md from results.json, no timing"
  )
  args = parser.parse_args()
  if args.render:
    with open(os.path.join(HERE, "results.json")) as f:
      raw = json.load(f)
    scaling = {int(n): v for n, v in raw["scaling"].items()}
    leaf_counts = {int(n): v for n, v in raw["leaf_counts"].items()}
    report = render(raw["machine"], raw["rounds"], raw["step_times"], raw["ratios"],
                    raw["temporaries"], raw["accuracy"], leaf_counts, raw["memory"],
                    sorted(scaling), scaling, raw["slopes"], raw["mesh"], raw["mesh_rows"],
                    raw["quick"])
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
      f.write(report)
    print(report)
    return
  rounds = args.rounds or (7 if args.quick else 9)
  main_size = LEAVES * 4096 * COLUMNS  # 16.8M float32 params
  sizes = [1 << 20, 1 << 22, 1 << 24] if args.quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26]
  info = machine()
  print(json.dumps(info))

  params = make_tree(main_size, 0)
  tau = make_tree(main_size, 1, scale=0.01)
  grad_sets = [make_tree(main_size, 10 + j) for j in range(3)]
  step_times = time_interleaved(optimizers(tau), params, grad_sets, rounds)
  temps = temporaries(optimizers(tau), params, grad_sets[0])
  ratios = {k: v / step_times["adamw"] for k, v in step_times.items()}
  print("16.8M params:", {k: f"{v * 1e3:.1f} ms ({ratios[k]:.2f}x)" for k, v in step_times.items()})
  accuracy = selection_accuracy(adam_update_after(params, grad_sets))
  print("TIES selection on an Adam update:", accuracy)
  memory = memory_table(params, tau)
  del params, tau, grad_sets

  scaling = {}
  for n in sizes:
    scaling[n] = time_fresh_trees(n, LEAVES, max(5, rounds - 2))
    print(f"{n / 1e6:.1f}M params:", {k: f"{v * 1e3:.1f} ms" for k, v in scaling[n].items()})
  # The same parameters in more, smaller leaves: what a per-leaf cost adds.
  leaf_counts = {}
  for leaves in [16] if args.quick else [16, 64]:
    leaf_counts[leaves] = time_fresh_trees(main_size, leaves, max(5, rounds - 2))
    print(f"{leaves} leaves:", {k: f"{v * 1e3:.1f} ms" for k, v in leaf_counts[leaves].items()})
  slopes = {}
  for name in step_times:
    slopes[name] = fit_slope(sizes, [scaling[n][name] for n in sizes])

  mesh_rows = 256 if args.quick else 1024
  mesh = mesh_run(mesh_rows, rounds)
  print("8-device mesh:", mesh)

  report = render(info, rounds, step_times, ratios, temps, accuracy, leaf_counts, memory, sizes,
                  scaling, slopes, mesh, mesh_rows, args.quick)
  print(report)
  if not args.no_write:
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
      f.write(report)
    raw = dict(machine=info, step_times=step_times, ratios=ratios, temporaries=temps,
               accuracy=accuracy, leaf_counts={str(n): v for n, v in leaf_counts.items()},
               memory=memory, scaling={str(n): v for n, v in scaling.items()},
               slopes=slopes, mesh=mesh, rounds=rounds, mesh_rows=mesh_rows, quick=args.quick)
    with open(os.path.join(HERE, "results.json"), "w") as f:
      json.dump(raw, f, indent=1)


def render(info, rounds, step_times, ratios, temps, accuracy, leaf_counts, memory, sizes,
           scaling, slopes, mesh, mesh_rows, quick):
  lines = [
      "# Benchmark results",
      "",
      "Written by `python benchmarks/bench_step.py`" + (" --quick" if quick else "") + ".",
      "",
      f"- machine: {info['cpu']}, {info['cores']} cores, backend `{info['backend']}`; "
      f"load average at start {tuple(round(x, 2) for x in info['load_average_at_start'])}",
      f"- jax {info['jax']}, optax {info['optax']}, Python {info['python']}",
      f"- date: {info['date_utc']} UTC",
      f"- method: `jax.jit`, params and state donated, methods timed interleaved "
      f"({rounds} rounds; in each, {REPEAT} steps in a row per method, the first untimed), "
      f"median; p = {RESERVE_P}, weight decay {WEIGHT_DECAY} for all.",
      "",
      "## Step time at 16.8M float32 params (4 leaves of 4096x1024)",
      "",
      "| optimizer | ms/step | x AdamW | temporaries per step (MB) | goal | |",
      "|---|---:|---:|---:|---:|---|",
  ]
  goals = {"ondare": 1.15, "onties_exact": 3.0, "onties_sampled": 1.5}
  for name, t in step_times.items():
    g = goals.get(name)
    lines.append(
        f"| {name} | {t * 1e3:.1f} | {ratios[name]:.2f} | {temps[name] / 2**20:.1f} | "
        + (f"<= {g} | {goal(ratios[name], g)} |" if g else "| |")
    )
  lines += ["", "TIES selection on a 4-step Adam update (per leaf, k = floor(p n)):", ""]
  lines += ["| leaf | k | exact keeps | sampled keeps / k |", "|---|---:|---:|---:|"]
  for name, a in accuracy.items():
    lines.append(f"| {name} | {a['k']} | {a['exact_kept']} | {a['sampled_kept_over_k']:.4f} |")
  lines += [
      "",
      "## The same 16.8M params in more leaves (x AdamW in each run)",
      "",
      "Real models have many leaves, most far smaller than 4096x1024; TIES selects per leaf.",
      "",
      "| leaves | shape | " + " | ".join(f"{k} ms (x AdamW)" for k in step_times) + " |",
      "|---:|---|" + "---:|" * len(step_times),
  ]
  for leaves, times in leaf_counts.items():
    rows = LEAVES * 4096 // leaves
    cells = " | ".join(f"{t * 1e3:.1f} ({t / times['adamw']:.2f})" for t in times.values())
    lines.append(f"| {leaves} | {rows}x{COLUMNS} | {cells} |")
  lines += [
      "",
      "## Scaling (4 leaves of n/4 float32 params each)",
      "",
      "| params | " + " | ".join(f"{k} ms" for k in step_times) + " |",
      "|---:|" + "---:|" * len(step_times),
  ]
  for n in sizes:
    cells = " | ".join(f"{scaling[n][k] * 1e3:.1f}" for k in step_times)
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
    per = " | ".join(f"{ti / n * 1e9:.2f}" for ti, n in zip(t, sizes))
    lines.append(f"| {name} | {b:.2f} | {marginal:.2f} | {per} | {t[-1] / t[-2]:.2f} |")
  lines += [
      "",
      "## State memory, in units of the params' bytes (from the state pytree)",
      "",
      "| config | whole state | over AdamW | reference delta | step-K accumulator |",
      "|---|---:|---:|---:|---:|",
  ]
  for row in memory:
    lines.append(
        f"| {row['config']} | {row['state_x_params']:.3f} | "
        f"{row['extra_over_adamw_x_params']:.3f} | "
        f"{row['reference_x_params']:.3f} | {row['accumulator_x_params']:.3f} |"
    )
  lines += [
      "",
      f"## Same step on 8 simulated CPU devices ({4 * mesh_rows * 1024 / 1e6:.1f}M params)",
      "",
      "Mesh (fsdp=4, tp=2), Explicit axes, params `P('fsdp', 'tp')`, state sharded with "
      "`optax.tree.map_params` + `jax.jit(tx.init, out_shardings=...)`. The 8 devices share "
      "the machine's cores: this measures overhead, not speed-up. Params after 3 steps are "
      "compared with the one-device run.",
      "",
      "| optimizer | 1 device ms | mesh ms | mesh / 1 device | max abs diff of params "
      "| entries differing by > 1e-5 | state leaf specs |",
      "|---|---:|---:|---:|---:|---:|---|",
  ]
  for name, m in mesh.items():
    lines.append(
        f"| {name} | {m['one_device_s'] * 1e3:.1f} | {m['mesh_s'] * 1e3:.1f} | "
        f"{m['mesh_s'] / m['one_device_s']:.2f} | {m['max_abs_diff']:.2e} | "
        f"{m['moved']} of {m['size']} | {', '.join(m['state_specs'])} |"
    )
  lines += ["", profile_section(), train_step_section(), NOTES]
  return "\n".join(lines)


def train_step_section():
  """The table of `benchmarks/bench_train_step.py`'s last run, if there is one."""
  path = os.path.join(HERE, "train_step.json")
  if not os.path.exists(path):
    return ""
  import bench_train_step  # imports the testbed's model (flax): only when there is a run to show

  with open(path) as f:
    return bench_train_step.render(json.load(f))


def profile_section():
  """The table of `benchmarks/profile_ties.py`'s last run, if there is one."""
  path = os.path.join(HERE, "profile.json")
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    prof = json.load(f)
  base = prof["ms"]["adamw step"]
  lines = [
      "## Where OnTIES's time goes (`python benchmarks/profile_ties.py`)",
      "",
      f"Pieces of the step timed alone, interleaved with AdamW's step, median over "
      f"{prof['rounds']} rounds ({REPEAT} calls in a row per piece, the first untimed); "
      f"{prof['machine']}, load average at the end "
      f"{tuple(round(x, 2) for x in prof['load_average'])}, {prof['date']}.",
      "",
      "| piece (4 leaves of 4096x1024) | ms | x AdamW step | temporaries (MB) |",
      "|---|---:|---:|---:|",
  ]
  for name, ms in prof["ms"].items():
    lines.append(f"| {name} | {ms:.2f} | {ms / base:.2f} | {prof['temp_bytes'][name] / 2**20:.1f} |")
  return "\n".join(lines) + "\n"


NOTES = """## What limits these figures

- The machine has 2 cores shared with other processes (see the load average
  above). Interleaving makes every method pay the same load, but ratios still
  move by 10-20% from run to run.
- **Method** (changed 2026-11-29): each method takes 3 steps in a row per
  round and the first is not timed. Timing single steps in turn let a
  method pay for its predecessor's freed temporaries: OnTIES sampled ran
  about 10 ms slower right after the exact step than after OnDARE's, and
  AdamW's step, the denominator of every ratio, followed the chain's (75 MB
  of temporaries freed). AdamW's step (same code) took 35.6 ms in the last
  run with the old method and 28-29 ms with this one, so ratios across the
  change (sampled 1.80x, exact 6.43x, OnDARE 1.05x before) are not like
  for like.
- **OnDARE** adds a counter-based hash per entry and one more read (the
  reference delta); the hash, the `1/p` scale, the merge, weight decay and
  the parameter update fuse into the loop that finishes Adam's update, so
  what it costs over AdamW is the reference delta's read (the hash is
  arithmetic, not memory traffic).
- **OnTIES, sampled** (`onties(topk="sampled")`) adds a gather of 2**16
  entries of each of Adam's two new moments per leaf (written out by Adam
  anyway), Adam's last formula and three short scatter-add histograms
  (2**11 and 2**10 bins) on that sample, and the sign consensus, which
  reads the reference delta; the comparison with the threshold and the
  consensus fuse into the final loop, so no parameter-sized temporary is
  left (the temporaries column). The gathers are scattered reads (one
  entry in each run of n/2**16, at a position that moves along a Weyl
  sequence so that no column period is aliased): on XLA:CPU about 12 ns per
  entry, latency rather than bandwidth. Until 2026-11-29 the sample had
  2**18 entries (bound 1.9 % at p = 0.01 instead of 3.9 %) and two 2**16-bin
  histograms: the gather then read every cache line of both moments of a
  4M-entry leaf, and a 2**16-bin histogram costs about 0.2 ms to clear and
  scan whatever the sample's size, so a leaf of at most 2**18 entries (its
  own sample) cost two such passes over all of it. That made 1.80x AdamW
  on 4 leaves (the old timing method: see Method above) and, in a throwaway run of the
  same kind, 2.7x on 16 leaves and 5.9x on 64.
- **Goals, and what limits them**: OnDARE and OnTIES read the
  reference delta, one word per param more than AdamW's seven, so the
  memory roofline is 8/7 = 1.14x. OnDARE (1.14x) and OnTIES sampled
  (1.46x) meet their goals in this run but not in the one before it, with
  the same library code (1.20x and 1.57x, 2026-11-29 15:38): the goals sit
  inside the run-to-run spread, and OnDARE's is at the roofline. OnTIES
  sampled pays on top of OnDARE its per-leaf cost (next bullet): about 2 ms a
  leaf on 4 leaves. OnTIES exact (6.3x) does not meet its goal (<= 3x):
  see its bullet below.
- **Leaves**: TIES selects per leaf, so OnTIES pays per leaf a sample of
  fixed size (its scattered gathers, the radix passes) and a few dozen small
  XLA kernels (histograms, prefix sums over 256 blocks), whatever the
  leaf's size; spreading the same parameters over
  more leaves raises its ratio (the leaf table). A leaf of at most 2**16
  entries is its own sample (exact, three short radix passes). On GPU and
  TPU each small kernel is a launch: many small leaves cost more there too;
  measure before trusting a figure from this CPU.
- **OnTIES, sampled as a chain** (`online_merge(method="ties",
  topk="sampled")` after Adam, as after any optimizer): the trim samples the
  incoming update, which gives the update a second consumer, so XLA writes
  it out: a parameter-sized temporary per leaf, allocated and page-faulted
  at every step (XLA:CPU does not reuse the block between executions). This
  is what the aliases avoid by sampling the moments; it is the path of
  `online_merge` after another optimizer, unchanged.
- **OnTIES, exact** adds one scatter-add pass over every leaf (a histogram
  of the entries inside a bracket placed by a sample, plus the count above
  it), and Adam's update is written out because the sample, that pass and
  the final loop all read it. XLA:CPU writes a scatter's index array and
  its array of ones to memory before running it, in buffers allocated (and
  page-faulted) afresh at every execution, which over a whole leaf costs
  more than the scatter itself. Since 2026-11-29 (this run) a one-device CPU process walks each leaf's
  leading axis in such slices (`trim._leaf_histogram`; meshes and other
  platforms keep one scatter, since slicing a sharded leaf at a loop
  index would gather it): the exact selection alone went from 94 to 35 ms
  on 4 leaves, the step from 8.6x to 6.3x AdamW (9.5x to 8.9x on 64
  leaves, whose plain radix select makes two passes). What is left over
  AdamW, in the profile below: the written-out update (Adam's update, and
  the update scaled by the learning rate as a second buffer, because XLA
  fuses the cheap scaling into the sample and the final loop but the
  histogram loop needs it in memory; 2.5x AdamW's step for one written-out
  update alone), and the scatter itself, about 2 ns an entry. The goal
  (<= 3x) is not met on CPU; on GPU a scatter-add histogram runs on
  atomics, and the chunking does not apply there.
- **Page faults** (profiled 2026-11-25, before the aliases sampled the
  moments): XLA:CPU allocates a step's temporaries afresh at every
  execution and the kernel maps them page by page (then about 18,000 minor
  faults per step for the sampled path, 53,000 for exact, none for AdamW;
  roughly 0.7-1 ms per MB on this VM). With Adam's update materialised per
  leaf that was most of the sampled path's cost.
  `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` or
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` cut those faults; neither is
  applied in the tables here.
- **Tried and rejected for exact top-k**: reading Adam's moments instead
  of the update, as the sampled alias does, so that the update is never
  written out (the sample, the sliced histogram and the rare branches
  apply Adam's last formula to the moments; 4.3x against 5.4x without it,
  in two throwaway runs on a loaded machine): XLA's algebraic simplifier rewrites the same
  formula differently in different fusions (optax's
  `m / bc1 / (sqrt(v / bc2) + eps)` became `m / (bc1 * (sqrt(v / bc2) +
  eps))` in one and `m * (1 / bc1) / (sqrt(v * (1 / bc2)) + eps)` in the
  other; about a third of a 512-entry leaf's entries then differed by an
  ulp), so the trim would rank other magnitudes than the final loop
  applies and "exactly k kept" would fail (it did, on a test of OnTIES
  with p = 1). `lax.optimization_barrier` on the update did not change
  XLA:CPU's buffers. Also rejected: counting passes instead of the
  scatter; per-row `lax.top_k` of the entries inside the bracket (to
  histogram a few candidates per row instead of the whole leaf), which cost
  more than the scatter pass on XLA:CPU. One fused compare-and-count over a 4M-entry leaf takes 3-6 ms
  (about 1.2 ns per entry), so a bisection on the bits inside the sample's
  bracket (about 18 passes) would cost more than the scatter pass; 16
  thresholds counted in one broadcast reduction took 250 ms per leaf, and
  XLA:CPU emits sibling reductions about 10x slower than a single one.
  Also rejected earlier: `jnp.sort` or `lax.top_k` of the leaf (about 100x
  AdamW), sorting the sample (about 45 ns per entry, slower than two
  histograms). The implementation before the bracket (two scatter-add
  passes over the leaf, plus a prefix sum over the leaf when ties must be
  cut) measured about 10x AdamW. The per-entry row-major tie-break is not a
  cost: replacing sampled's keep mask by `bits >= threshold` changed
  nothing measurable.
- **Scaling**: every method is a fixed number of passes over the
  parameters plus, for TIES, work on per-leaf samples of bounded size, so
  time is linear in the parameter count. On this loaded machine single
  figures are noisy (compare the 16.8M row of the scaling table with the
  16.8M table above, timed in the same run); the marginal slope between
  the two largest sizes is the most robust figure.
- **Mesh**: the 8 simulated devices share the same 2 cores, so the mesh
  column measures overhead (8 programs, collectives on histograms and
  scalars), not a speed-up. Rounding differs between the one-device and the
  8-device compiled programs (AdamW differs too, by an ulp); TIES's choice
  among near-equal magnitudes can follow that rounding (Adam's first step
  has every magnitude equal to lr up to rounding), which is what the
  "entries differing" column counts. OnTIES sampled gathers two samples
  per leaf (one of each moment), each all-reduced over the 8 programs that
  share the 2 cores: that is its mesh overhead here. Sampling the update
  on sharded leaves instead (one all-reduced sample, the update written
  out per shard) ran the mesh at 3.3x its one-device time in the same
  session, and then differed from the one-device run at Adam's tied first
  steps; it was not kept. The sharded tests in
  `tests/test_sharding.py` compare bit-identical inputs and find the same
  result on 1 and on 8 devices.
"""


if __name__ == "__main__":
  main()
