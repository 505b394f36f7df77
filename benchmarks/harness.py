"""What the step benchmarks share: the trees, the optimizers, the timed step, the machine.

Every step is `jax.jit`-compiled with the params and the optimizer state
donated, exactly as a training loop would run it. Methods are timed
interleaved (``REPEAT`` steps of each, in turn, per round) so that load from
other processes on the machine hits them alike; a figure is the median over
the rounds, and every ratio divides two medians of the same run.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import omerge_jax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LR = 1e-3
WEIGHT_DECAY = 1e-4  # optax.adamw's default, given to every method alike
RESERVE_P = 0.01
COLUMNS = 1024
LEAVES = 4
REPEAT = 3  # steps in a row per method and round, the first untimed (interleaved_medians)


def random_tree(shapes, seed, scale=1.0, dtype=jnp.float32):
  """A leaf of each ``shapes[name]``, normal times ``scale``, one key of ``seed`` per leaf in order."""
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {
    name: (scale * jax.random.normal(key, shape)).astype(dtype)
    for key, (name, shape) in zip(keys, shapes.items(), strict=True)
  }


def uniform_shapes(num_params, leaves=LEAVES, columns=COLUMNS):
  """``leaves`` leaves ``w0``, ``w1``, ... of ``columns`` columns, ``num_params`` entries in all."""
  return {f"w{i}": (num_params // (leaves * columns), columns) for i in range(leaves)}


def make_tree(num_params, seed, scale=1.0, leaves=LEAVES, columns=COLUMNS, dtype=jnp.float32):
  """``leaves`` leaves of ``columns`` columns, ``num_params`` entries in all, normal times ``scale``."""
  return random_tree(uniform_shapes(num_params, leaves, columns), seed, scale, dtype)


def optimizers(tau, names=None):
  """The benchmarked optimizers by name (all, or those in ``names``), on reference delta ``tau``."""
  txs = {
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
  return txs if names is None else {name: txs[name] for name in names}


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

    box, calls = [p, s], [0]  # this closure's own state and call count

    def run(step=step, box=box, calls=calls):
      box[0], box[1] = step(box[0], box[1], grad_sets[calls[0] % len(grad_sets)])
      calls[0] += 1
      return box[0]

    runs[name] = run
  return interleaved_medians(runs, rounds)


def time_fresh_trees(num_params, leaves, rounds, *, columns=COLUMNS, dtype=jnp.float32, names=None):
  """`time_shaped_trees` of ``leaves`` leaves of ``columns`` columns, ``num_params`` entries in all."""
  shapes = uniform_shapes(num_params, leaves, columns)
  return time_shaped_trees(shapes, rounds, dtype=dtype, names=names)


def time_shaped_trees(shapes, rounds, *, dtype=jnp.float32, names=None):
  """`time_interleaved` on new params, reference delta and two gradients of leaf ``shapes``."""
  params = random_tree(shapes, 0, dtype=dtype)
  tau = random_tree(shapes, 1, 0.01, dtype)
  grad_sets = [random_tree(shapes, 10 + j, dtype=dtype) for j in range(2)]
  return time_interleaved(optimizers(tau, names), params, grad_sets, rounds, warmup=2)


def tree_bytes(tree):
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


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


def last_run(path):
  """The JSON a benchmark last wrote to ``path``, or None where it has not run."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
