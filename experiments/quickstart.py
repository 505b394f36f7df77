"""Quick start: the alignment tax and online merging on a tiny regression MLP.

Three stages, like the paper, in seconds on a CPU:

1. base: a small Flax NNX MLP fitted to a "pre-training" task;
2. SFT: fine-tuned from base on an "SFT" task (the reference model), giving
   the task vector tau = SFT - base;
3. "alignment": trained from SFT on a new objective with AdamW, OnDARE and
   OnTIES for the same budget.

It prints the new objective's loss (lower is the "reward") and the SFT task's
loss (its growth is the "tax") for each optimizer. Run:

  python -m experiments.quickstart [--steps 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import omerge_jax


class MLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs, width: int = 64):
    self.l1 = nnx.Linear(8, width, rngs=rngs)
    self.l2 = nnx.Linear(width, width, rngs=rngs)
    self.l3 = nnx.Linear(width, 1, rngs=rngs)

  def __call__(self, x):
    return self.l3(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))[..., 0]


def make_task(key, n=512):
  """A random smooth target on R^8: y = sin(x @ w1) @ w2."""
  kx, k1, k2 = jax.random.split(key, 3)
  x = jax.random.normal(kx, (n, 8))
  w1 = jax.random.normal(k1, (8, 16))
  w2 = jax.random.normal(k2, (16,)) / 4.0
  return x, jnp.sin(x @ w1) @ w2


def mse(model, task):
  x, y = task
  return jnp.mean((model(x) - y) ** 2)


def train(model, tx, task, steps):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(mse)(model, task)
    optimizer.update(model, grads)
    return loss

  for _ in range(steps):
    step(model, optimizer)
  return model


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100, help="alignment steps per optimizer")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--alpha", type=float, default=1e-4)
  parser.add_argument("--reserve-p", type=float, default=0.1)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  keys = jax.random.split(jax.random.PRNGKey(args.seed), 4)
  pretrain, sft_task, new_task = (make_task(k) for k in keys[:3])

  # nnx modules are trained in place: every stage starts from a clone.
  base = train(MLP(nnx.Rngs(args.seed)), optax.adam(1e-2), pretrain, 400)
  sft = train(nnx.clone(base), optax.adam(3e-3), sft_task, 400)
  tau = omerge_jax.reference_delta(nnx.state(sft, nnx.Param), nnx.state(base, nnx.Param))

  optimizers = {
    "AdamW": optax.adamw(args.lr, weight_decay=0.0),
    "OnDARE": omerge_jax.ondare(args.lr, tau, alpha=args.alpha, reserve_p=args.reserve_p),
    "OnTIES": omerge_jax.onties(args.lr, tau, alpha=args.alpha, reserve_p=args.reserve_p),
  }
  print(
    f"SFT model: new-objective loss {mse(sft, new_task):.4f}, SFT-task loss {mse(sft, sft_task):.4f}"
  )
  print(f"{'optimizer':<10}{'new-objective loss':>20}{'SFT-task loss (tax)':>22}")
  for name, tx in optimizers.items():
    model = train(nnx.clone(sft), tx, new_task, args.steps)
    print(f"{name:<10}{float(mse(model, new_task)):>20.4f}{float(mse(model, sft_task)):>22.4f}")
  print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
