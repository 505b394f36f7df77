"""Step time of OnDARE / OnTIES against `optax.adamw` at 16.8M float32 params.

Four leaves of 4096x1024 (`harness`): the median step of each optimizer,
its ratio to AdamW's, the temporary buffers of each compiled step, and how
many entries TIES keeps on a realistic update (exact and sampled top-k).
Run by `bench_step.py`, which writes the figures to `results.json`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

# harness first: it puts the repository root on sys.path.
from harness import COLUMNS, LEAVES, LR, RESERVE_P, make_step, optimizers, time_interleaved
from omerge_jax import sparsify

SIZE = LEAVES * 4096 * COLUMNS  # 16.8M float32 params
GOALS = {"ondare": 1.15, "onties_exact": 3.0, "onties_sampled": 1.5}  # x AdamW


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


def selection_accuracy(update):
  out = {}
  for name, leaf in update.items():
    n = leaf.size
    k = math.floor(RESERVE_P * n)
    exact = int(jnp.sum(sparsify.ties(leaf, RESERVE_P, "exact") != 0))
    sampled = int(jnp.sum(sparsify.ties(leaf, RESERVE_P, "sampled") != 0))
    out[name] = {"k": k, "exact_kept": exact, "sampled_kept_over_k": sampled / k}
  return out


def run(params, tau, grad_sets, rounds):
  """The figures of `section`, on trees of `SIZE` params; prints them as they come."""
  step_times = time_interleaved(optimizers(tau), params, grad_sets, rounds)
  temps = temporaries(optimizers(tau), params, grad_sets[0])
  ratios = {k: v / step_times["adamw"] for k, v in step_times.items()}
  print("16.8M params:", {k: f"{v * 1e3:.1f} ms ({ratios[k]:.2f}x)" for k, v in step_times.items()})
  accuracy = selection_accuracy(adam_update_after(params, grad_sets))
  print("TIES selection on an Adam update:", accuracy)
  return dict(step_times=step_times, ratios=ratios, temporaries=temps, accuracy=accuracy)


def goal(value, limit):
  return "met" if value <= limit else "NOT met"


def section(step_times, ratios, temps, accuracy):
  lines = [
    "## Step time at 16.8M float32 params (4 leaves of 4096x1024)",
    "",
    "| optimizer | ms/step | x AdamW | temporaries per step (MB) | goal | |",
    "|---|---:|---:|---:|---:|---|",
  ]
  for name, t in step_times.items():
    g = GOALS.get(name)
    lines.append(
      f"| {name} | {t * 1e3:.1f} | {ratios[name]:.2f} | {temps[name] / 2**20:.1f} | "
      + (f"<= {g} | {goal(ratios[name], g)} |" if g else "| |")
    )
  lines += ["", "TIES selection on a 4-step Adam update (per leaf, k = floor(p n)):", ""]
  lines += ["| leaf | k | exact keeps | sampled keeps / k |", "|---|---:|---:|---:|"]
  for name, a in accuracy.items():
    lines.append(f"| {name} | {a['k']} | {a['exact_kept']} | {a['sampled_kept_over_k']:.4f} |")
  return "\n".join(lines)
