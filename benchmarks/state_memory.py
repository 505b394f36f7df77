"""Optimizer-state memory of OnDARE / OnTIES configurations, in units of the params' bytes.

Read from the state pytree's shapes (`jax.eval_shape` of `init`): nothing
is allocated. Run by `bench_step.py`, which writes the table to `results.json`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# harness first: it puts the repository root on sys.path.
from harness import LR, tree_bytes
import omerge_jax


def table(params, tau):
  """One row per configuration: whole state, over AdamW, reference delta, step-K accumulator."""
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
    rows.append(
      {
        "config": name,
        "state_x_params": total / pbytes,
        "extra_over_adamw_x_params": (total - adam_bytes) / pbytes,
        "reference_x_params": ref / pbytes,
        "accumulator_x_params": acc / pbytes,
      }
    )
  return rows


def section(rows):
  lines = [
    "## State memory, in units of the params' bytes (from the state pytree)",
    "",
    "| config | whole state | over AdamW | reference delta | step-K accumulator |",
    "|---|---:|---:|---:|---:|",
  ]
  for row in rows:
    lines.append(
      f"| {row['config']} | {row['state_x_params']:.3f} | "
      f"{row['extra_over_adamw_x_params']:.3f} | "
      f"{row['reference_x_params']:.3f} | {row['accumulator_x_params']:.3f} |"
    )
  return "\n".join(lines)
