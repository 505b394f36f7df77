"""What a run is judged by: skill accuracy, gold reward, implicit reward, tax."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.alignment_tax import data as data_lib
from experiments.alignment_tax import losses
from experiments.alignment_tax import model as model_lib
from experiments.alignment_tax import tokenizer
from experiments.alignment_tax import training


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _generate(graphdef, params, prompts, key, temperature, *, prompt_len):
  model = nnx.merge(graphdef, params)
  return model_lib.sample(
    model, prompts[:, :prompt_len], prompts.shape[1] - prompt_len, key, temperature
  )


def generate(
  model, prompts, prompt_len: int, *, temperature: float = 0.0, seed: int = 0
) -> list[str]:
  """Decode a completion of every left-padded prompt row (greedy when ``temperature == 0``)."""
  graphdef, params = nnx.split(model)
  out = _generate(
    graphdef,
    params,
    jnp.asarray(prompts),
    jax.random.key(seed),
    jnp.float32(temperature),
    prompt_len=prompt_len,
  )
  return [tokenizer.decode(row) for row in np.asarray(out)]


_log_ratios = nnx.jit(training.log_ratios)


def exact_match(predictions: list[str], answers: list[str]) -> float:
  """Fraction of predictions equal to their answer once the style wrapper is removed."""
  if not answers:
    return 0.0
  return float(
    np.mean([data_lib.unstyled(p) == a for p, a in zip(predictions, answers, strict=True)])
  )


def gold_reward(generations: list[str], answers: list[str]) -> float:
  """Mean `data.gold_score` of the generations: styled and correct."""
  if not generations:
    return 0.0
  return float(
    np.mean([data_lib.gold_score(g, a) for g, a in zip(generations, answers, strict=True)])
  )


def skill_accuracy(model, cfg, evals: dict) -> dict:
  """Greedy exact match, in points, of each skill's prompts in ``evals`` (``{skill: {tokens, answers}}``)."""
  prompts = np.concatenate([evals[s]["tokens"] for s in cfg.skills])
  predictions = generate(model, prompts, cfg.prompt_len)
  skills, start = {}, 0
  for s in cfg.skills:
    n = len(evals[s]["answers"])
    skills[s] = 100.0 * exact_match(predictions[start : start + n], evals[s]["answers"])
    start += n
  return skills


def evaluate(
  model, cfg, data: dict, split: str = "test", *, beta: float | None = None, seed: int = 0
) -> dict:
  """Every metric of one model on the ``test`` or ``val`` split, in points (0..100).

  The skills are scored by greedy exact match. The gold reward is the mean
  gold score (styled and correct, `data.gold_score`) of ``cfg.reward_samples``
  generations sampled at temperature 1 per held-out preference prompt: sampling makes the reward register the
  probability mass DPO moves, where greedy decoding only flips when the
  styled answer overtakes the plain one. The implicit reward compares the
  model with the SFT reference on held-out preference pairs (needs
  ``data["pref_<split>"]`` with reference log-probabilities).
  """
  skills = skill_accuracy(model, cfg, data[split])
  reward_set = data["reward" if split == "test" else "reward_val"]
  samples = generate(
    model,
    np.repeat(reward_set["tokens"], cfg.reward_samples, axis=0),
    cfg.prompt_len,
    temperature=1.0,
    seed=seed + 7,
  )
  answers = [a for a in reward_set["answers"] for _ in range(cfg.reward_samples)]
  out = {
    "reward": 100.0 * gold_reward(samples, answers),
    "skills": skills,
    "benchmark_avg": float(np.mean(list(skills.values()))),
  }
  pairs = data.get("pref_" + split)
  if pairs is not None and "ref_chosen" in pairs:
    batch = {k: jnp.asarray(v) for k, v in pairs.items()}
    h_w, h_l = _log_ratios(model, batch)
    stats = losses.implicit_reward_stats(h_w, h_l, cfg.beta if beta is None else beta)
    out["implicit_acc"] = 100.0 * float(stats["implicit_acc"])
    out["implicit_margin"] = float(stats["implicit_margin"])
  return out


def tax(reference_avg: float, method_avg: float) -> float:
  """The alignment tax: the reference's benchmark average minus the method's."""
  return reference_avg - method_avg


PAIRED_KEYS = ("reward", "benchmark_avg", "tax", "tax_pref", "tax_other")


def aggregate(runs: list[dict], reference_runs: list[dict], pref_skills=()) -> dict:
  """Mean over seeds of each metric, the taxes per seed, their std (``ddof=0``) and the per-seed values.

  ``runs[i]`` and ``reference_runs[i]`` are the method and the SFT model of
  seed i. ``tax_pref`` is the tax on the skills in the preference data
  (``pref_skills``), ``tax_other`` on the rest; ``per_seed`` keeps the values
  the paired intervals (`stats.paired`) are computed from.
  """

  def taxes(r, ref):
    lost = {s: ref["skills"][s] - r["skills"][s] for s in r["skills"]}
    inside = [v for s, v in lost.items() if s in pref_skills]
    outside = [v for s, v in lost.items() if s not in pref_skills]
    return {
      "tax": tax(ref["benchmark_avg"], r["benchmark_avg"]),
      "tax_pref": float(np.mean(inside)) if inside else 0.0,
      "tax_other": float(np.mean(outside)) if outside else 0.0,
    }

  per_seed = [dict(r, **taxes(r, ref)) for r, ref in zip(runs, reference_runs, strict=True)]
  keys = [k for k in per_seed[0] if k != "skills"]
  out = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
  out["skills"] = {
    s: float(np.mean([r["skills"][s] for r in per_seed])) for s in per_seed[0]["skills"]
  }
  out["std"] = {k: float(np.std([r[k] for r in per_seed])) for k in keys}
  out["std"]["skills"] = {
    s: float(np.std([r["skills"][s] for r in per_seed])) for s in per_seed[0]["skills"]
  }
  out["per_seed"] = {k: [float(r[k]) for r in per_seed] for k in PAIRED_KEYS}
  return out
