"""Where OnTIES's step time goes: the pieces of the step, timed alone and together.

Run `python benchmarks/profile_ties.py` (about 3 minutes on 2 cores). At the
step benchmark's size (4 leaves of 4096x1024 float32, p = 0.01) it times,
interleaved with `optax.adamw`'s step so that every ratio comes from one run:

* the whole steps (AdamW, OnTIES sampled and exact, and sampled as a plain
  chain, where the trim samples Adam's update rather than its moments);
* Adam's update alone, and Adam's update returned beside the step (so that
  it is written out, as when the threshold reads it);
* the TIES selections alone, on an update already in memory (sampled, exact),
  and their parts: the sample's gather, the radix select on the sample;
* each compiled program's temporary buffers (`memory_analysis`).

It prints a table and writes `benchmarks/profile.json`; `benchmarks/RESULTS.md`
quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import omerge_jax  # noqa: E402
from harness import (
  COLUMNS,
  HERE,
  LEAVES,
  LR,
  REPEAT,
  interleaved_medians,
  last_run,
  machine,
  make_tree,
)  # noqa: E402
from harness import RESERVE_P as P  # noqa: E402
from omerge_jax import trim  # noqa: E402

JSON = os.path.join(HERE, "profile.json")
ROWS = 4096


def tree(seed, scale=1.0):
  return make_tree(LEAVES * ROWS * COLUMNS, seed, scale)


def pieces(tau):
  """name -> (jitted function, argument builder); every function maps trees to trees."""
  k = trim.topk_count(ROWS * COLUMNS, P)
  first_digit = trim._DIGITS[0]
  first_shift = sum(trim._DIGITS) - first_digit
  adam = optax.scale_by_adam()

  def step_of(tx, *, expose_update=False):
    def step(params, state, grads):
      updates, state = tx.update(grads, state, params)
      out = (optax.apply_updates(params, updates), state)
      # Adam's update as an output too: XLA must write it out.
      return out + (updates,) if expose_update else out

    return jax.jit(step, donate_argnums=(0, 1))

  per_leaf = lambda fn: jax.jit(lambda t: jax.tree.map(fn, t))
  return {
    "adamw step": ("step", optax.adamw(LR)),
    "onties sampled step": ("step", omerge_jax.onties(LR, tau, reserve_p=P, topk="sampled")),
    "onties sampled step, as a chain (samples the update)": (
      "step",
      optax.chain(
        adam,
        optax.scale_by_learning_rate(LR),
        omerge_jax.online_merge(tau, method="ties", reserve_p=P, topk="sampled"),
      ),
    ),
    "onties exact step": ("step", omerge_jax.onties(LR, tau, reserve_p=P)),
    "adam alone (scale_by_adam + apply)": ("step", optax.chain(adam, optax.scale(-LR))),
    "adam, update also written out": ("step_exposed", optax.chain(adam, optax.scale(-LR))),
    "sampled selection alone (all leaves together)": (
      "tree",
      jax.jit(lambda t: trim.ties_select_many(jax.tree.leaves(t), P, "sampled")),
    ),
    "exact selection alone": ("tree", per_leaf(lambda u: trim.ties_select_exact(u, k))),
    "sample gather alone": ("tree", per_leaf(lambda u: trim._sample(u, trim.SAMPLE_SIZE))),
    f"radix select on the sample ({trim.SAMPLE_SIZE} entries)": (
      "sample",
      per_leaf(
        lambda s: trim._radix_statistic(
          jnp.uint32(s.size // 100)[None], trim._magnitude_bits(s).reshape(1, -1)
        )
      ),
    ),
    "one histogram pass over the sample (its first digit)": (
      "sample",
      per_leaf(lambda s: trim._histogram(trim._magnitude_bits(s) >> first_shift, 1 << first_digit)),
    ),
    "keep mask + where on the leaf": (
      "tree",
      per_leaf(
        lambda u: jnp.where(
          trim.ties_keep_mask(
            u, trim.TiesSelection(jnp.uint32(0x3A000000), jnp.uint32(ROWS * COLUMNS))
          ),
          u,
          0,
        )
      ),
    ),
  }, step_of


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args()
  info = machine()
  params, grads = tree(0), [tree(s, 1e-2) for s in (1, 2, 3)]
  tau = tree(4, 1e-2)
  table, step_of = pieces(tau)
  sample = jax.tree.map(lambda u: trim._sample(u, trim.SAMPLE_SIZE), grads[0])
  runs, temps = {}, {}
  for name, (kind, obj) in table.items():
    if kind in ("step", "step_exposed"):
      fn = step_of(obj, expose_update=kind == "step_exposed")
      state = obj.init(params)
      compiled = fn.lower(params, state, grads[0]).compile()
      temps[name] = compiled.memory_analysis().temp_size_in_bytes
      p, s = jax.tree.map(jnp.copy, params), state
      for i in range(3):
        out = fn(p, s, grads[i % 3])
        p, s = out[0], out[1]

      box, calls = [p, s], [0]  # this closure's own state and call count

      def run(fn=fn, box=box, calls=calls):
        out = fn(box[0], box[1], grads[calls[0] % 3])
        box[0], box[1] = out[0], out[1]
        calls[0] += 1
        return out[0]
    else:
      arg = sample if kind == "sample" else grads[0]
      temps[name] = obj.lower(arg).compile().memory_analysis().temp_size_in_bytes
      jax.block_until_ready(obj(arg))
      run = lambda obj=obj, arg=arg: obj(arg)
    runs[name] = run
  med = {name: t * 1e3 for name, t in interleaved_medians(runs, args.rounds).items()}
  out = {
    "machine": f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}",
    "load_average": os.getloadavg(),
    "date": info["date_utc"] + " UTC",
    "rounds": args.rounds,
    "ms": med,
    "temp_bytes": temps,
  }
  with open(JSON, "w") as f:
    json.dump(out, f, indent=1)
  print(render(out))


def render(prof):
  """Markdown section of a run: each piece's median, its ratio to AdamW's step, its temporaries."""
  base = prof["ms"]["adamw step"]
  lines = [
    "## Where OnTIES's time goes (`python benchmarks/profile_ties.py`)",
    "",
    f"Pieces of the step timed alone, interleaved with AdamW's step, median over "
    f"{prof['rounds']} rounds ({REPEAT} calls in a row per piece, the first untimed); "
    f"{prof['machine']}, load average at the end "
    f"{tuple(round(x, 2) for x in prof['load_average'])}, {prof['date']}.",
    "",
    f"| piece ({LEAVES} leaves of {ROWS}x{COLUMNS}) | ms | x AdamW step | temporaries (MB) |",
    "|---|---:|---:|---:|",
  ]
  for name, ms in prof["ms"].items():
    lines.append(
      f"| {name} | {ms:.2f} | {ms / base:.2f} | {prof['temp_bytes'][name] / 2**20:.1f} |"
    )
  return "\n".join(lines) + "\n"


def section():
  """`render` of the last run (`profile.json`), or "" when there is none."""
  prof = last_run(JSON)
  return render(prof) if prof else ""


if __name__ == "__main__":
  main()
