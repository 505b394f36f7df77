"""The optimizer step on 8 simulated CPU devices against one device: overhead and agreement.

A mesh (fsdp=4, tp=2) with Explicit axes, params `P('fsdp', 'tp')`, the state
sharded by an eager `tx.init` on the sharded params (docs/pod.md).
The 8 devices share the machine's cores, so this measures overhead, not
speed-up; params after 3 steps are compared with the one-device run.

`run` starts this file as a child process with
``--xla_force_host_platform_device_count=8`` (the device count is fixed when
JAX starts); run as a script, the file is that child and prints its figures
as JSON. `bench_step.py` writes them to `results.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from harness import COLUMNS, LEAVES, optimizers

NAMES = ("adamw", "ondare", "onties_exact", "onties_sampled")


def run(rows, reps):
  """The child's figures per optimizer, on 4 leaves of ``rows`` x 1024, median of ``reps`` steps."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__), str(rows), str(reps)],
    env=env,
    capture_output=True,
    text=True,
  )
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def child(rows, reps):
  keys = jax.random.split(jax.random.PRNGKey(0), 12)
  params = {f"w{i}": jax.random.normal(keys[i], (rows, COLUMNS)) for i in range(LEAVES)}
  tau = {f"w{i}": 0.01 * jax.random.normal(keys[4 + i], (rows, COLUMNS)) for i in range(LEAVES)}
  grads = [
    {
      f"w{i}": jax.random.normal(jax.random.fold_in(keys[8 + i], j), (rows, COLUMNS))
      for i in range(LEAVES)
    }
    for j in range(3)
  ]
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  spec = NamedSharding(mesh, P("fsdp", "tp"))
  put = lambda t: jax.tree.map(lambda x: jax.device_put(x, spec), t)

  def timed(name, sharded):
    with jax.set_mesh(mesh) if sharded else contextlib.nullcontext():
      tx = optimizers(put(tau) if sharded else tau, [name])[name]
      return timed_steps(tx, sharded)

  def timed_steps(tx, sharded):
    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p = put(params) if sharded else jax.tree.map(jnp.copy, params)  # donated below
    if sharded:
      s = tx.init(p)  # eager on sharded params: each buffer where its param lives
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
      t = time.perf_counter()
      p, s = f(p, s, gs[r % 3])
      jax.block_until_ready(p)
      ts.append(time.perf_counter() - t)
    return first, float(np.median(ts)), s

  out = {}
  for name in NAMES:
    one, t1, _ = timed(name, False)
    many, t8, s8 = timed(name, True)
    diff = max(float(np.max(np.abs(one[k] - many[k]))) for k in one)
    # Rounding differs between the two compiled programs; beyond rounding
    # (1e-5, a hundredth of a step) an entry was selected differently.
    moved = sum(int(np.sum(np.abs(one[k] - many[k]) > 1e-5)) for k in one)
    ref_spec = [str(x.sharding.spec) for x in jax.tree.leaves(s8) if x.ndim == 2]
    out[name] = {
      "one_device_s": t1,
      "mesh_s": t8,
      "max_abs_diff": diff,
      "moved": moved,
      "size": sum(v.size for v in one.values()),
      "state_specs": sorted(set(ref_spec)),
    }
  print(json.dumps(out))


def section(mesh, mesh_rows):
  lines = [
    f"## Same step on 8 simulated CPU devices ({LEAVES * mesh_rows * COLUMNS / 1e6:.1f}M params)",
    "",
    "Mesh (fsdp=4, tp=2), Explicit axes, params `P('fsdp', 'tp')`, state sharded with "
    "an eager `tx.init` on the sharded params. The 8 devices share "
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
  return "\n".join(lines)


if __name__ == "__main__":
  child(int(sys.argv[1]), int(sys.argv[2]))
