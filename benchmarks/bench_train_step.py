"""What the merge costs in a whole DPO training step, per optimizer.

Run `python benchmarks/bench_train_step.py` (about 4 minutes on 2 cores). One
step is what the testbed runs (`experiments/alignment_tax`): the DPO loss of
the policy's chosen and rejected answers against stored reference
log-probabilities, forward and backward through the testbed's transformer,
then the optimizer's update, `jax.jit`-compiled with the model and the
optimizer state donated. Two model sizes, two batch sizes; optimizers timed
interleaved, median over the rounds. The merge's share of a step is the
optimizer's step time minus AdamW's, over the optimizer's step time.

Writes `benchmarks/train_step.json` and prints a table; `benchmarks/RESULTS.md`
(`report.py`, through `bench_step.py --render`) quotes the last run.
`bench_gpu.py` times the same steps on a GPU (`run`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import omerge_jax  # noqa: E402
from harness import HERE, REPEAT, interleaved_medians, last_run, machine  # noqa: E402
from experiments.alignment_tax import config as config_lib  # noqa: E402
from experiments.alignment_tax import model as model_lib  # noqa: E402
from experiments.alignment_tax import tokenizer  # noqa: E402
from experiments.alignment_tax import training  # noqa: E402

JSON = os.path.join(HERE, "train_step.json")
SIZES = {
  "small": dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024),
  "large": dict(d_model=512, n_layers=4, n_heads=8, d_ff=2048),
}
BATCHES = (4, 16)  # preference pairs per step
LR, P = 1e-5, 0.01
ROUNDS = 7


def optimizers(tau):
  return {
    "adamw": optax.adamw(LR, weight_decay=0.0),
    "ondare": omerge_jax.ondare(LR, tau, reserve_p=P),
    "onties_exact": omerge_jax.onties(LR, tau, reserve_p=P),
    "onties_sampled": omerge_jax.onties(LR, tau, reserve_p=P, topk="sampled"),
  }


def pairs(cfg, batch, seed):
  """Random token pairs of the testbed's shapes, with reference log-probabilities."""
  rng = np.random.default_rng(seed)
  t = cfg.prompt_len + cfg.answer_len
  tokens = lambda: jnp.asarray(rng.integers(3, tokenizer.VOCAB_SIZE, (batch, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t) >= cfg.prompt_len, jnp.float32)[None].repeat(batch, 0)
  return {
    "chosen": tokens(),
    "rejected": tokens(),
    "chosen_mask": mask,
    "rejected_mask": mask,
    "ref_chosen": jnp.zeros(batch),
    "ref_rejected": jnp.zeros(batch),
  }


def make_step(model, tx):
  loss_fn = training.preference_objective("dpo", 0.1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return jax.jit(step, donate_argnums=0), state


def time_config(cfg, batch, rounds):
  model = model_lib.create(cfg, 0)
  params = nnx.state(model, nnx.Param)
  tau = omerge_jax.reference_delta(params, jax.tree.map(lambda x: 0.99 * x, params))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  batches = [pairs(cfg, batch, s) for s in range(3)]
  runs = {}
  for name, tx in optimizers(tau).items():
    step, state = make_step(model_lib.create(cfg, 0), tx)
    for i in range(2):  # compile, and leave Adam's first step behind
      state, loss = step(state, batches[i])
    jax.block_until_ready(loss)

    box, calls = [state], [0]  # this closure's own state and call count

    def run(step=step, box=box, calls=calls):
      box[0], loss = step(box[0], batches[calls[0] % 3])
      calls[0] += 1
      return loss

    runs[name] = run
  return n_params, interleaved_medians(runs, rounds)


def run(rounds, sizes=tuple(SIZES), batches=BATCHES):
  """The figures of `render` (all but the machine) for each model size and batch."""
  rows = []
  for size in sizes:
    dims = SIZES[size]
    cfg = config_lib.with_overrides(
      config_lib.PRESETS["default"], [f"{k}={v}" for k, v in dims.items()]
    )
    for batch in batches:
      n_params, times = time_config(cfg, batch, rounds)
      rows.append({"size": size, "params": n_params, "pairs": batch, "seconds": times})
      print(size, n_params, batch, {k: f"{v * 1e3:.1f} ms" for k, v in times.items()})
  return {
    "rounds": rounds,
    "tokens_per_answer": cfg.prompt_len + cfg.answer_len,
    "rows": rows,
    "repeat": REPEAT,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=ROUNDS)
  args = parser.parse_args()
  info = machine()
  figures = run(args.rounds)
  out = {
    "machine": f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}",
    "load_average": os.getloadavg(),
    "date": info["date_utc"] + " UTC",
    **figures,
  }
  with open(JSON, "w") as f:
    json.dump(out, f, indent=1)
  print(render(out))


def table(out):
  """Markdown table of a run: step ms per optimizer and the merge's share of the step."""
  names = list(out["rows"][0]["seconds"])
  lines = [
    "| model | params | pairs | "
    + " | ".join(f"{n} ms" for n in names)
    + " | "
    + " | ".join(f"{n} share" for n in names[1:])
    + " |",
    "|---|---:|---:|" + "---:|" * (2 * len(names) - 1),
  ]
  for row in out["rows"]:
    s = row["seconds"]
    cells = " | ".join(f"{s[n] * 1e3:.1f}" for n in names)
    shares = " | ".join(f"{(s[n] - s['adamw']) / s[n] * 100:.1f} %" for n in names[1:])
    lines.append(
      f"| {row['size']} | {row['params'] / 1e6:.1f}M | {row['pairs']} | {cells} | {shares} |"
    )
  return "\n".join(lines)


def method(out):
  """What one step is and how it is timed, in a sentence for the table's caption."""
  return (
    f"The testbed's transformer, DPO loss on pairs of {out['tokens_per_answer']}-token "
    f"sequences (chosen and rejected: one forward and backward over twice the pairs), "
    f"then the update; median over {out['rounds']} interleaved rounds ({out['repeat']} steps "
    f"in a row per method, the first untimed)"
  )


def render(out):
  """Markdown section of a run: its method and machine, and `table`."""
  lines = [
    "## A whole DPO training step (`python benchmarks/bench_train_step.py`)",
    "",
    f"{method(out)}; {out['machine']}, "
    f"load average at the end {tuple(round(x, 2) for x in out['load_average'])}, {out['date']}. "
    "Share = (step - AdamW's step) / step.",
    "",
    table(out),
  ]
  return "\n".join(lines) + "\n"


def section():
  """`render` of the last run (`train_step.json`), or "" when there is none."""
  out = last_run(JSON)
  return render(out) if out else ""


if __name__ == "__main__":
  main()
