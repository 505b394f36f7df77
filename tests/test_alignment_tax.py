"""Tests of the alignment-tax testbed: data, tokenizer, losses, metrics, methods, smoke preset."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import omerge_jax
from experiments.alignment_tax import config as config_lib
from experiments.alignment_tax import data as data_lib
from experiments.alignment_tax import losses
from experiments.alignment_tax import methods
from experiments.alignment_tax import metrics
from experiments.alignment_tax import model as model_lib
from experiments.alignment_tax import skills
from experiments.alignment_tax import tokenizer
from experiments.alignment_tax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = config_lib.with_overrides(config_lib.PRESETS["smoke"], [
    "d_model=16", "d_ff=32", "n_pretrain=20", "n_sft=20", "n_pref=16", "n_test=4", "n_val=4",
    "n_reward=4", "pref_batch=4", "chunk=1",
])


# Data and skills.

@pytest.mark.parametrize("skill,check", [
    ("copy", lambda q, a: q.split()[1] == a),
    ("reverse", lambda q, a: q.split()[1][::-1] == a),
    ("sort", lambda q, a: "".join(sorted(q.split()[1])) == a),
    ("count", lambda q, a: str(q.split()[2].count(q.split()[1])) == a),
    ("recall", lambda q, a: dict(zip(q.split()[2][::2], q.split()[2][1::2]))[q.split()[1]] == a),
    ("add", lambda q, a: str(int(q.split()[1]) + int(q.split()[2])) == a),
])
def test_skill_answers_are_correct_and_distinct(skill, check):
  examples = skills.sample(skill, np.random.default_rng(0), 50, 3, 6)
  assert all(check(q, a) for q, a in examples)
  assert len({q for q, _ in examples}) == 50


def test_skill_sampling_is_seeded_and_respects_exclude():
  a = skills.sample("reverse", np.random.default_rng(1), 20, 3, 5)
  assert a == skills.sample("reverse", np.random.default_rng(1), 20, 3, 5)
  b = skills.sample("reverse", np.random.default_rng(1), 20, 3, 5, exclude=frozenset(q for q, _ in a[:10]))
  assert not {q for q, _ in a[:10]} & {q for q, _ in b}
  with pytest.raises(ValueError, match="unknown skill"):
    skills.sample("juggle", np.random.default_rng(0), 1, 3, 5)


def test_held_out_queries_never_appear_in_training_sets():
  cfg = config_lib.PRESETS["smoke"]
  data = data_lib.build(cfg, 0)
  decode = lambda rows: {tokenizer.decode(r[:cfg.prompt_len]) for r in rows}
  train = decode(data["sft"]["tokens"]) | decode(data["pref"]["chosen"])
  held = set()
  for split in ("test", "val"):
    for s in cfg.skills:
      held |= decode(data[split][s]["tokens"])
  held |= decode(data["reward"]["tokens"]) | decode(data["pref_test"]["chosen"])
  assert held and not held & train


def test_style_score_and_unstyled():
  assert data_lib.style_score("~abc~") == 1.0
  assert data_lib.style_score("~abc") == 0.5
  assert data_lib.style_score("abc~") == 0.5
  assert data_lib.style_score("abc") == 0.0
  assert data_lib.style_score("~") == 0.5
  assert data_lib.unstyled("~cba~") == "cba"


# Tokenizer.

def test_tokenizer_round_trip_and_special_ids():
  text = "q:rev abcd?a:~dcba~"
  assert tokenizer.decode(tokenizer.encode(text)) == text
  assert len({tokenizer.PAD, tokenizer.BOS, tokenizer.EOS}) == 3
  assert tokenizer.decode(tokenizer.encode("ab") + [tokenizer.EOS] + tokenizer.encode("cd")) == "ab"
  with pytest.raises(KeyError):
    tokenizer.encode("A")


def test_pack_layout():
  tokens, mask = tokenizer.pack(["ab"], ["xyz"], prompt_len=5, answer_len=5)
  np.testing.assert_array_equal(tokens[0, :5], [tokenizer.PAD, tokenizer.PAD, tokenizer.BOS, *tokenizer.encode("ab")])
  np.testing.assert_array_equal(tokens[0, 5:], [*tokenizer.encode("xyz"), tokenizer.EOS, tokenizer.PAD])
  np.testing.assert_array_equal(mask[0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
  with pytest.raises(ValueError, match="does not fit"):
    tokenizer.pack(["ab"], ["xyzuvw"], prompt_len=5, answer_len=5)


# Losses against hand-computed values.

def test_sequence_logprob_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
  tokens = jnp.array([[0, 1, 2]])
  mask = jnp.array([[0.0, 1.0, 1.0]])
  # log p(x1=1 | x0) + log p(x2=2 | x0, x1) = log 0.25 + log 0.8
  np.testing.assert_allclose(losses.sequence_logprob(logits, tokens, mask), [math.log(0.25) + math.log(0.8)], rtol=1e-6)
  np.testing.assert_allclose(losses.lm_loss(logits, tokens, mask), -(math.log(0.25) + math.log(0.8)) / 2, rtol=1e-6)


def test_preference_losses_by_hand():
  h_w, h_l = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
  sig = lambda x: 1 / (1 + math.exp(-x))
  np.testing.assert_allclose(losses.dpo(h_w, h_l, 0.5),
                             -(math.log(sig(0.5)) + math.log(sig(-1.0))) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.ipo(h_w, h_l, 0.5), ((1 - 1) ** 2 + (-2 - 1) ** 2) / 2, rtol=1e-6)
  z0 = (1.0 + 0.0 + 0.0 + 2.0) / 4
  want = np.mean([0.5 * (1 - sig(0.5 * (1 - z0))) + 0.5 * (1 - sig(0.5 * (z0 - 0))),
                  0.5 * (1 - sig(0.5 * (0 - z0))) + 0.5 * (1 - sig(0.5 * (z0 - 2)))])
  np.testing.assert_allclose(losses.kto(h_w, h_l, 0.5), want, rtol=1e-6)
  stats = losses.implicit_reward_stats(h_w, h_l, 0.5)
  assert float(stats["implicit_acc"]) == 0.5
  np.testing.assert_allclose(stats["implicit_margin"], (0.5 - 1.0) / 2, rtol=1e-6)


# Metrics.

def test_metric_functions():
  assert metrics.exact_match(["~ab~", "ba", "x"], ["ab", "ab", "x"]) == pytest.approx(2 / 3)
  assert metrics.gold_reward(["~a~", "a", "~a"]) == pytest.approx(0.5)
  assert metrics.tax(80.0, 70.0) == 10.0
  ref = [{"reward": 0.0, "benchmark_avg": 80.0, "skills": {"a": 80.0}},
         {"reward": 0.0, "benchmark_avg": 60.0, "skills": {"a": 60.0}}]
  runs = [{"reward": 50.0, "benchmark_avg": 70.0, "skills": {"a": 70.0}},
          {"reward": 70.0, "benchmark_avg": 40.0, "skills": {"a": 40.0}}]
  agg = metrics.aggregate(runs, ref)
  assert agg["reward"] == 60.0 and agg["std"]["reward"] == 10.0
  assert agg["tax"] == 15.0 and agg["std"]["tax"] == 5.0
  assert agg["skills"] == {"a": 55.0}


def test_config_overrides():
  cfg = config_lib.with_overrides(config_lib.PRESETS["default"], ["pref_steps=7", "beta=1", "seeds=(3,4)"])
  assert (cfg.pref_steps, cfg.beta, cfg.seeds) == (7, 1.0, (3, 4))
  with pytest.raises(ValueError):
    config_lib.with_overrides(cfg, ["nonsense=1"])
  assert cfg.stage_key("base", 0) == config_lib.with_overrides(cfg, ["pref_lr=0.5"]).stage_key("base", 0)
  assert cfg.stage_key("sft", 0) != config_lib.with_overrides(cfg, ["sft_lr=0.5"]).stage_key("sft", 0)


# Methods: one preference step each, from a tiny SFT model.

@pytest.fixture(scope="module")
def tiny_setup():
  data = data_lib.build(TINY, 0)
  # Two random inits stand in for base and SFT: a non-zero reference delta is all a step needs.
  base, sft = model_lib.create(TINY, 0), model_lib.create(TINY, 1)
  data["pref"] = training.with_reference(sft, data["pref"])
  tau = omerge_jax.reference_delta(nnx.state(sft, nnx.Param), nnx.state(base, nnx.Param))
  return data, sft, tau


@pytest.mark.parametrize("method,hp", [
    ("KL", {"beta": 1.0}), ("EMA", {"ema": 0.5}), ("ChildTuning", {"reserve_p": 0.5}),
    ("OnDARE step-K", {"merge_every": 2}), ("OnTIES step-K", {"merge_every": 2}),
])
def test_a_step_of_each_method(tiny_setup, method, hp):
  """AdamW, OnDARE, OnTIES and offline merges run in the smoke test below."""
  data, sft, tau = tiny_setup
  before = training.params_of(sft)
  model = training.with_params(TINY, before)
  # Two steps: the warm-up schedule starts at a learning rate of 0.
  tx = methods.make_tx(method, dict(hp, lr_scale=10.0), dataclasses.replace(TINY, pref_steps=2), tau)
  model, step_losses = training.train(model, tx, training.preference_objective("dpo", hp.get("beta", 0.1)),
                                      data["pref"], steps=2, batch=4, seed=0, chunk=2, ema=hp.get("ema", 0.0))
  after = training.params_of(model)
  assert step_losses.shape == (2,) and np.isfinite(step_losses).all()
  np.testing.assert_allclose(step_losses[0], math.log(2), rtol=1e-4)  # the policy starts at the reference
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
  assert max(moved) > 0


def test_unknown_method_is_an_error(tiny_setup):
  with pytest.raises(ValueError, match="unknown method"):
    methods.make_tx("SGD", {}, TINY, tiny_setup[2])


# The smoke preset, end to end.

def test_smoke_preset_end_to_end(tmp_path):
  out = tmp_path / "smoke"
  # The smoke run is mostly XLA compilation: skip LLVM's optimisation passes.
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, "-m", "experiments.alignment_tax", "--preset", "smoke", "--quiet",
                         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  names = {"SFT", "AdamW", "OnDARE", "OnTIES", "Offline linear", "Offline DARE", "Offline TIES"}
  assert names <= set(results["methods"])
  for row in results["methods"].values():
    assert 0 <= row["reward"] <= 100 and 0 <= row["benchmark_avg"] <= 100
    assert set(row["skills"]) == set(results["config"]["skills"])
    assert row["benchmark_avg"] == pytest.approx(np.mean(list(row["skills"].values())))
    assert row["tax"] == pytest.approx(results["methods"]["SFT"]["benchmark_avg"] - row["benchmark_avg"])
    assert set(row["std"]) >= {"reward", "benchmark_avg", "tax"}
  assert results["methods"]["SFT"]["tax"] == 0.0
  assert (out / "table.md").read_text().count("\n") == len(results["methods"]) + 2
  assert (out / "pareto.png").stat().st_size > 1000
  assert "AdamW" in proc.stdout and "wall time" in proc.stdout
  assert any(f.endswith(".npz") for f in os.listdir(out / "cache"))


# Report: tables and claims come from the numbers.

def _row(reward, avg, tax):
  return {"reward": reward, "benchmark_avg": avg, "tax": tax, "skills": {"copy": avg},
          "std": {"reward": 0.0, "benchmark_avg": 0.0, "tax": 0.0}, "hparams": {}}


def test_report_table_and_claims():
  from experiments.alignment_tax import report
  results = {"config": {"name": "t", "seeds": [0], "skills": ["copy"]},
             "methods": {"SFT": _row(5.0, 50.0, 0.0), "AdamW": _row(80.0, 20.0, 30.0),
                         "OnTIES": _row(85.0, 30.0, 20.0), "OnDARE": _row(70.0, 10.0, 40.0)}}
  table = report.table_md(results)
  assert "| OnTIES | 85.0 | 30.0 | 30.0 | 20.0 |" in table
  text = "\n".join(report.claims(results))
  assert "AdamW raises the reward 5.0 → 80.0 and pays a tax of 30.0 points" in text
  assert "OnTIES vs AdamW (Table 1): reward 85.0 vs 80.0, tax 20.0 vs 30.0; higher reward AND lower tax: **reproduced**" in text
  assert "OnDARE vs AdamW (Table 1): reward 70.0 vs 80.0, tax 40.0 vs 30.0; higher reward AND lower tax: **not reproduced**" in text
