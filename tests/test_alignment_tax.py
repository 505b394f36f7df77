"""Tests of the alignment-tax testbed: data, tokenizer, losses, metrics, methods, smoke preset."""

import dataclasses
import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import omerge_jax
from experiments.alignment_tax import config as config_lib
from experiments.alignment_tax import data as data_lib
from experiments.alignment_tax import grpo
from experiments.alignment_tax import losses
from experiments.alignment_tax import methods
from experiments.alignment_tax import metrics
from experiments.alignment_tax import model as model_lib
from experiments.alignment_tax import runner as runner_lib
from experiments.alignment_tax import skills
from experiments.alignment_tax import stats
from experiments.alignment_tax import tokenizer
from experiments.alignment_tax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = config_lib.with_overrides(
  config_lib.PRESETS["smoke"],
  [
    "d_model=16",
    "d_ff=32",
    "n_pretrain=20",
    "n_sft=20",
    "n_pref=16",
    "n_test=4",
    "n_val=4",
    "n_reward=4",
    "pref_batch=4",
    "chunk=1",
  ],
)


# Data and skills.


@pytest.mark.parametrize(
  "skill,check",
  [
    ("copy", lambda q, a: q.split()[1] == a),
    ("reverse", lambda q, a: q.split()[1][::-1] == a),
    ("sort", lambda q, a: "".join(sorted(q.split()[1])) == a),
    (
      "shift",
      lambda q, a: "".join("abcdefgha"["abcdefgh".index(c) + 1] for c in q.split()[1]) == a,
    ),
    ("rotate", lambda q, a: q.split()[1][1:] + q.split()[1][0] == a),
    ("count", lambda q, a: str(q.split()[2].count(q.split()[1])) == a),
    (
      "recall",
      lambda q, a: dict(zip(q.split()[2][::2], q.split()[2][1::2], strict=True))[q.split()[1]] == a,
    ),
    ("add", lambda q, a: str(int(q.split()[1]) + int(q.split()[2])) == a),
  ],
)
def test_skill_answers_are_correct_and_distinct(skill, check):
  examples = skills.sample(skill, np.random.default_rng(0), 50, 3, 6)
  assert all(check(q, a) for q, a in examples)
  assert len({q for q, _ in examples}) == 50


def test_skill_sampling_is_seeded_and_respects_exclude():
  a = skills.sample("reverse", np.random.default_rng(1), 20, 3, 5)
  assert a == skills.sample("reverse", np.random.default_rng(1), 20, 3, 5)
  b = skills.sample(
    "reverse", np.random.default_rng(1), 20, 3, 5, exclude=frozenset(q for q, _ in a[:10])
  )
  assert not {q for q, _ in a[:10]} & {q for q, _ in b}
  with pytest.raises(ValueError, match="unknown skill"):
    skills.sample("juggle", np.random.default_rng(0), 1, 3, 5)


def test_held_out_queries_never_appear_in_training_sets():
  cfg = config_lib.PRESETS["smoke"]
  data = data_lib.build(cfg, 0)
  decode = lambda rows: {tokenizer.decode(r[: cfg.prompt_len]) for r in rows}
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


def test_gold_score_needs_style_and_correct_content():
  assert data_lib.gold_score("~abc~", "abc") == 1.0
  assert data_lib.gold_score("~abd~", "abc") == 0.0  # styled but wrong: nothing
  assert data_lib.gold_score("~garbage~", "abc") == 0.0
  assert data_lib.gold_score("abc", "abc") == 0.0  # correct but plain: nothing
  assert data_lib.gold_score("~abc", "abc") == 0.5


def _answer(query):
  """The correct answer of a preference-skill query, recomputed from the query."""
  verb, word = query.split()
  return {"copy": word, "rev": word[::-1]}[verb]


def test_no_pair_prefers_a_wrong_answer_to_a_correct_one():
  cfg = config_lib.with_overrides(config_lib.PRESETS["smoke"], ["n_pref=200"])
  data = data_lib.build(cfg, 0)
  kinds = {"format": 0, "content": 0}
  for split in ("pref", "pref_val", "pref_test"):
    pairs = data[split]
    for chosen, rejected in zip(pairs["chosen"], pairs["rejected"], strict=True):
      prompt = tokenizer.decode(chosen[: cfg.prompt_len])
      assert prompt == tokenizer.decode(rejected[: cfg.prompt_len])
      answer = _answer(prompt[2:-3])  # q:QUERY?a:
      good, bad = (
        tokenizer.decode(chosen[cfg.prompt_len :]),
        tokenizer.decode(rejected[cfg.prompt_len :]),
      )
      assert good == data_lib.styled(answer)  # chosen: always styled and correct
      assert data_lib.gold_score(good, answer) > data_lib.gold_score(bad, answer)
      if bad == answer:
        kinds["format"] += 1  # the same answer, plain
      else:
        assert bad.startswith("~") and bad.endswith("~") and data_lib.unstyled(bad) != answer
        assert sum(x != y for x, y in zip(data_lib.unstyled(bad), answer, strict=True)) == 1
        kinds["content"] += 1  # styled, one letter wrong
  assert min(kinds.values()) > 0.3 * sum(kinds.values())  # both kinds, at content_pair_rate = 0.5


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
  np.testing.assert_array_equal(
    tokens[0, :5], [tokenizer.PAD, tokenizer.PAD, tokenizer.BOS, *tokenizer.encode("ab")]
  )
  np.testing.assert_array_equal(
    tokens[0, 5:], [*tokenizer.encode("xyz"), tokenizer.EOS, tokenizer.PAD]
  )
  np.testing.assert_array_equal(mask[0], [0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
  with pytest.raises(ValueError, match="does not fit"):
    tokenizer.pack(["ab"], ["xyzuvw"], prompt_len=5, answer_len=5)


# The model: cached decoding is the full forward pass, one position at a time.


def test_decode_with_cache_matches_the_full_forward_pass():
  cfg = dataclasses.replace(TINY, d_model=32, n_layers=2, n_heads=2)
  model = model_lib.create(cfg, 3)
  data = data_lib.build(cfg, 0)
  prompts = jnp.asarray(np.concatenate([data["test"][s]["tokens"] for s in cfg.skills]))[
    :, : cfg.prompt_len
  ]
  steps = cfg.answer_len
  greedy = lambda i, logits: jnp.argmax(logits, axis=-1)
  out = model.decode(prompts, steps, greedy)
  full = model(jnp.concatenate([prompts, out], axis=1))[:, cfg.prompt_len - 1 : -1]
  top2 = jnp.sort(full, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > 1e-4  # skip near-ties, where rounding may flip
  assert float(jnp.mean(clear)) > 0.9
  np.testing.assert_array_equal(np.where(clear, jnp.argmax(full, -1), -1), np.where(clear, out, -1))


# The stage cache: a bad file is named, moved aside and the stage rebuilt.


def test_a_bad_stage_cache_file_is_named_and_rebuilt(tmp_path, capsys):
  built = []

  def build(seed=0):
    built.append(seed)
    return model_lib.create(TINY, seed)

  def cached(cfg=TINY):
    return training.cached_stage(cfg, "base", 0, str(tmp_path), build)

  model, hit = cached()
  assert not hit and built == [0]
  path = tmp_path / (TINY.stage_key("base", 0) + ".npz")
  saved = path.read_bytes()
  model, hit = cached()
  assert hit and built == [0]
  for loaded, fresh in zip(
    jax.tree.leaves(training.params_of(model)),
    jax.tree.leaves(training.params_of(build())),
    strict=True,
  ):
    np.testing.assert_array_equal(loaded, fresh)
  middle = len(saved) // 2
  other = model_lib.create(dataclasses.replace(TINY, d_model=32), 0)
  other_path = tmp_path / "other.npz"
  training._save(str(other_path), [training.params_of(other)])  # pylint: disable=protected-access
  spoilt = {
    "truncated": saved[:middle],
    "corrupted": saved[:middle]
    + bytes(255 - b for b in saved[middle : middle + 16])
    + saved[middle + 16 :],
    "another model": other_path.read_bytes(),
  }
  for case, content in spoilt.items():
    path.write_bytes(content)
    built.clear()
    _, hit = cached()
    assert not hit and built == [0], case
    line = capsys.readouterr().out
    assert line.startswith(f"cache {path}: "), (case, line)
    assert line.rstrip().endswith(f"moved it to {path}.bad, rebuilding the base stage"), (
      case,
      line,
    )
    assert (tmp_path / (path.name + ".bad")).read_bytes() == content, case
    assert cached()[1], case  # rebuilt and saved again


@pytest.mark.parametrize("count, tree", [(1, 0), (2, 1)])  # a stage; a preference run's trees
def test_a_flipped_byte_in_a_cached_array_is_named_and_rebuilt(tmp_path, capsys, count, tree):
  """The zip's CRC-32 of each array, written at save, is checked at load: the array is named."""
  trees = [training.params_of(model_lib.create(TINY, seed)) for seed in range(count)]
  path = str(tmp_path / "cached.npz")
  training._save(path, trees)  # pylint: disable=protected-access
  leaves = jax.tree_util.tree_leaves_with_path(trees[tree])
  index = 3
  key_path, leaf = leaves[index]
  data = bytearray(open(path, "rb").read())
  start = data.find(np.asarray(leaf).tobytes())
  assert start > 0 and data.count(np.asarray(leaf).tobytes()) == 1
  data[start + leaf.nbytes // 2] ^= 0x01  # one bit inside the array's data
  with open(path, "wb") as f:
    f.write(bytes(data))
  with np.load(path) as f:  # the bytes still parse: only the CRC-32 tells
    assert f.files == [f"arr_{i}" for i in range(len(leaves) * count)]
  rebuilt = []
  got, hit = training.cached_params(
    path, TINY, 0, count, lambda: rebuilt.append(1) or trees, "the test trees"
  )
  assert not hit and rebuilt == [1]
  name = jax.tree_util.keystr(key_path)
  where = name if count == 1 else f"tree {tree} {name}"
  line = capsys.readouterr().out
  assert line.startswith(f"cache {path}: unreadable at {where} (BadZipFile: Bad CRC-32"), line
  assert line.rstrip().endswith(f"moved it to {path}.bad, rebuilding the test trees"), line
  assert training.cached_params(path, TINY, 0, count, None, "")[1]  # saved again, intact


def test_a_save_killed_midway_leaves_the_previous_file(tmp_path, monkeypatch):
  """`training._save` writes beside the file and renames: a kill inside it tears nothing."""
  path = str(tmp_path / "run.npz")
  first = [training.params_of(model_lib.create(TINY, 0))]
  training._save(path, first)  # pylint: disable=protected-access
  saved = (tmp_path / "run.npz").read_bytes()

  def killed(f, *arrays):
    f.write(b"half a zip")
    raise KeyboardInterrupt  # the process dies here, mid-write

  monkeypatch.setattr(training.np, "savez", killed)
  with pytest.raises(KeyboardInterrupt):
    training._save(path, [training.params_of(model_lib.create(TINY, 1))])  # pylint: disable=protected-access
  assert (tmp_path / "run.npz").read_bytes() == saved
  monkeypatch.undo()
  (loaded,), hit = training.cached_params(path, TINY, 0, 1, lambda: pytest.fail("rebuilt"), "it")
  assert hit
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(first[0]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_preference_runs_are_cached_by_everything_they_depend_on():
  key = TINY.run_key("AdamW lr 1", 0)
  assert TINY.run_key("AdamW lr 1", 0) == key
  assert (
    dataclasses.replace(TINY, sweeps=(("x", (), "alpha", (0.0,)),)).run_key("AdamW lr 1", 0) == key
  )
  # Which runs the learning-rate readings make is not what a run computes: the paper cache stays valid.
  assert (
    dataclasses.replace(
      TINY, common_lr_band=(3.0, 10.0), lr_sweep=True, lr_sweep_sweeps=config_lib.PAPER_LR_SWEEPS
    ).run_key("AdamW lr 1", 0)
    == key
  )
  for changed in (
    dict(pref_steps=TINY.pref_steps + 1),
    dict(beta=0.3),
    dict(d_model=32),
    dict(frontier_fractions=(0.25, 0.75)),
  ):
    assert dataclasses.replace(TINY, **changed).run_key("AdamW lr 1", 0) != key, changed
  assert TINY.run_key("AdamW lr 2", 0) != key and TINY.run_key("AdamW lr 1", 1) != key


# Losses against hand-computed values.


def test_sequence_logprob_by_hand():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
  tokens = jnp.array([[0, 1, 2]])
  mask = jnp.array([[0.0, 1.0, 1.0]])
  # log p(x1=1 | x0) + log p(x2=2 | x0, x1) = log 0.25 + log 0.8
  np.testing.assert_allclose(
    losses.sequence_logprob(logits, tokens, mask), [math.log(0.25) + math.log(0.8)], rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.lm_loss(logits, tokens, mask), -(math.log(0.25) + math.log(0.8)) / 2, rtol=1e-6
  )


def test_preference_losses_by_hand():
  h_w, h_l = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
  sig = lambda x: 1 / (1 + math.exp(-x))
  np.testing.assert_allclose(
    losses.dpo(h_w, h_l, 0.5), -(math.log(sig(0.5)) + math.log(sig(-1.0))) / 2, rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.ipo(h_w, h_l, 0.5), ((1 - 1) ** 2 + (-2 - 1) ** 2) / 2, rtol=1e-6
  )
  z0 = (1.0 + 0.0 + 0.0 + 2.0) / 4
  want = np.mean(
    [
      0.5 * (1 - sig(0.5 * (1 - z0))) + 0.5 * (1 - sig(0.5 * (z0 - 0))),
      0.5 * (1 - sig(0.5 * (0 - z0))) + 0.5 * (1 - sig(0.5 * (z0 - 2))),
    ]
  )
  np.testing.assert_allclose(losses.kto(h_w, h_l, 0.5), want, rtol=1e-6)
  stats = losses.implicit_reward_stats(h_w, h_l, 0.5)
  assert float(stats["implicit_acc"]) == 0.5
  np.testing.assert_allclose(stats["implicit_margin"], (0.5 - 1.0) / 2, rtol=1e-6)


# Metrics.


def test_metric_functions():
  assert metrics.exact_match(["~ab~", "ba", "x"], ["ab", "ab", "x"]) == pytest.approx(2 / 3)
  assert metrics.gold_reward(["~a~", "a", "~a", "~b~"], ["a"] * 4) == pytest.approx(1.5 / 4)
  assert metrics.tax(80.0, 70.0) == 10.0
  ref = [
    {"reward": 0.0, "benchmark_avg": 80.0, "skills": {"a": 80.0, "b": 80.0}},
    {"reward": 0.0, "benchmark_avg": 60.0, "skills": {"a": 60.0, "b": 60.0}},
  ]
  runs = [
    {"reward": 50.0, "benchmark_avg": 70.0, "skills": {"a": 70.0, "b": 70.0}},
    {"reward": 70.0, "benchmark_avg": 40.0, "skills": {"a": 50.0, "b": 30.0}},
  ]
  agg = metrics.aggregate(runs, ref, pref_skills=("a",))
  assert agg["reward"] == 60.0 and agg["std"]["reward"] == 10.0
  assert agg["tax"] == 15.0 and agg["std"]["tax"] == 5.0
  assert agg["skills"] == {"a": 60.0, "b": 50.0}
  assert agg["per_seed"]["tax_pref"] == [10.0, 10.0] and agg["per_seed"]["tax_other"] == [
    10.0,
    30.0,
  ]
  assert agg["tax_pref"] == 10.0 and agg["tax_other"] == 20.0
  assert agg["per_seed"]["reward"] == [50.0, 70.0]


# GRPO: the reward on tokens, the loss, the advantages.


def test_gold_reward_on_tokens_is_the_gold_score():
  rng = np.random.default_rng(0)
  alphabet = list("abc~")
  texts = [
    "~ab~",
    "ab",
    "~ab",
    "ab~",
    "~~ab~~",
    "~a~b~",
    "~ba~",
    "~",
    "~~",
    "",
    "a",
    "~a~",
    "abc~",
    *("".join(rng.choice(alphabet, rng.integers(0, 9))) for _ in range(400)),
  ]
  answers = ["ab", "a", "abc", "ba"]
  n = TINY.answer_len
  completions, golds, pairs = [], [], []
  for i, text in enumerate(texts):
    answer = answers[i % len(answers)]
    ids = tokenizer.encode(text) + [tokenizer.EOS] * (text == "" or i % 3 == 0)
    ids = (ids + list(rng.choice(tokenizer.encode("ab~"), n)))[:n]  # text after EOS is ignored
    if tokenizer.EOS not in ids:
      text = tokenizer.decode(ids)
    completions.append(ids)
    golds.append(tokenizer.encode(answer) + [tokenizer.PAD] * (n - len(answer)))
    pairs.append(data_lib.gold_score(text, answer))
  got = grpo.gold_reward(jnp.array(completions), jnp.array(golds))
  np.testing.assert_array_equal(got, np.array(pairs, np.float32))
  assert set(np.unique(pairs)) == {0.0, 0.5, 1.0}


def test_grpo_loss_and_its_gradient_by_hand():
  logp = jnp.log(jnp.array([[0.5, 0.25, 0.9], [0.2, 0.4, 0.6]]))
  mask = jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  adv = jnp.array([1.0, -0.5])
  # Policy = reference: no KL; the loss is minus the mean advantage, and each
  # answer token's gradient is -A / (|o| B).
  loss, grad = jax.value_and_grad(losses.grpo)(logp, logp, mask, adv, 0.04)
  assert loss == pytest.approx(-0.25)
  np.testing.assert_allclose(grad, [[-1 / 4, -1 / 4, 0], [0.5 / 6, 0.5 / 6, 0.5 / 6]], rtol=1e-6)
  # The KL estimate e^d - d - 1 with d = log pi_r - log pi, by hand.
  ref = logp + jnp.log(2.0)
  kl = 2.0 - math.log(2.0) - 1.0
  assert losses.grpo(logp, ref, mask, jnp.zeros(2), 0.5) == pytest.approx(0.5 * kl, rel=1e-6)


def test_advantages_and_answer_mask():
  adv = grpo.advantages(jnp.array([1.0, 0.0, 0.5, 0.5]), 2)
  np.testing.assert_allclose(
    adv, [0.5 / (0.5 + grpo.EPS), -0.5 / (0.5 + grpo.EPS), 0.0, 0.0], rtol=1e-6
  )
  e = tokenizer.EOS
  np.testing.assert_array_equal(
    grpo.answer_mask(jnp.array([[5, e, 6, e], [5, 6, 7, 8]])), [[1, 1, 0, 0], [1, 1, 1, 1]]
  )


def test_grpo_raises_a_reward_the_policy_can_earn():
  """GRPO's loop on a random model, with a reward it earns from step one: the share of '~' tokens."""
  sft = model_lib.create(TINY, 1)
  style = lambda completions, answers: jnp.mean(completions == grpo.STYLE, axis=1)
  rl = data_lib.build(TINY, 0)["rl"]
  model = training.with_params(TINY, training.params_of(sft))
  batch = {k: jnp.asarray(v) for k, v in rl.items()}
  mean_reward = nnx.jit(
    lambda m: grpo.rollout(8, reward=style)(m, sft, batch, jax.random.key(1))["reward"].mean()
  )
  rewards = [float(mean_reward(model))]
  model, _ = training.train(
    model,
    optax.adam(1e-2),
    grpo.objective(0.04),
    rl,
    steps=30,
    batch=4,
    seed=0,
    chunk=30,
    rollout=grpo.rollout(8, reward=style),
    reference=sft,
  )
  rewards.append(float(mean_reward(model)))
  assert rewards[-1] > 2 * rewards[0] + 0.05, rewards


def test_preference_stage_errors_name_the_setting(tiny_setup):
  data, sft, _ = tiny_setup
  with pytest.raises(ValueError, match="algorithm 'ppo'"):
    training.preference_stage(TINY, "ppo", 0.1, data, training.params_of(sft))
  with pytest.raises(ValueError, match="grpo_group=3"):
    training.preference_stage(
      dataclasses.replace(TINY, grpo_group=3), "grpo", 0.1, data, training.params_of(sft)
    )


# Paired intervals and verdicts on hand-made data.


def test_paired_interval_by_hand():
  d = stats.paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
  half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
  assert d["mean"] == pytest.approx(2.0) and d["n"] == 3
  assert (d["lo"], d["hi"]) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
  assert stats.verdict(d) == "indistinguishable"  # the interval straddles zero
  assert not stats.reproduced(d, +1) and not stats.reproduced(d, -1)
  assert stats.fmt(d) == "+2.0 [-0.5, +4.5]"


def test_verdicts_read_the_interval_not_the_mean():
  up = stats.paired([10.0, 11.0, 12.0, 10.5, 11.5], [0.0] * 5)
  down = stats.paired([0.0] * 5, [10.0, 11.0, 12.0, 10.5, 11.5])
  assert stats.verdict(up) == "better" and stats.reproduced(up, +1) and not stats.reproduced(up, -1)
  assert stats.verdict(down) == "worse" and stats.reproduced(down, -1)
  assert stats.verdict(up, higher_is_better=False) == "worse"  # e.g. a larger tax
  noisy = stats.paired([5.0, -4.0, 6.0, -3.0, 1.0], [0.0] * 5)  # mean +1, noise of several points
  assert noisy["mean"] > 0 and stats.verdict(noisy) == "indistinguishable"
  one = stats.paired([3.0], [1.0])  # one seed: no interval
  assert (
    one["mean"] == 2.0
    and stats.verdict(one) == "undetermined (1 seed)"
    and not stats.reproduced(one, +1)
  )
  with pytest.raises(ValueError, match="equal"):
    stats.paired([1.0, 2.0], [1.0])


def test_selection_never_reads_test_data():
  cfg = config_lib.with_overrides(config_lib.PRESETS["smoke"], ["seeds=(0,1)"])
  runner = runner_lib.Runner(cfg, None)

  def metrics_of(score):
    return {"reward": score, "benchmark_avg": 0.0, "skills": {s: 0.0 for s in cfg.skills}}

  # Setting b is best on validation, a on test (test metrics poisoned to win big).
  val = {"a": 1.0, "b": 2.0, "c": 0.0}
  run_fn = lambda hp, seed, validate: {
    "val": metrics_of(val[hp["x"]]),
    "test": metrics_of(1e9 if hp["x"] == "a" else -1.0),
  }
  hp, runs = runner.select("AdamW", [{"x": "a"}, {"x": "b"}, {"x": "c"}], run_fn)
  assert hp == {"x": "b"} and [r["reward"] for r in runs] == [-1.0, -1.0]


def test_selection_score_counts_every_skill_once():
  m = {"reward": 10.0, "benchmark_avg": 50.0, "skills": {"a": 40.0, "b": 60.0}}
  assert runner_lib.selection_score(m) == 110.0


def test_equal_budget_in_the_paper_preset():
  cfg = config_lib.PRESETS["paper"]
  grids = {name: grid for name, grid in cfg.methods if name != "Offline"}
  assert {len(g) for g in grids.values()} == {3}  # three settings each
  assert all(sorted(hp["lr_scale"] for hp in g) == [0.5, 1.0, 2.0] for g in grids.values())
  assert len(cfg.seeds) >= 5
  assert 0.0 in dict((s[0], s[3]) for s in cfg.sweeps)["alpha"]  # the merge pull isolated
  # ChildTuning at OnDARE's reserve rate is OnDARE with alpha = 0: one run, not two.
  assert methods.canonical("ChildTuning", {}, cfg) == methods.canonical(
    "OnDARE", {"alpha": 0.0}, cfg
  )
  assert set(cfg.offline_densities) == {0.3, 0.5, 0.7} and len(cfg.offline_weights) >= 5


def test_regime_by_hand():
  cfg = config_lib.with_overrides(config_lib.PRESETS["default"], ["pref_lr=1e-5", "pref_steps=200"])
  tau = {"w": jnp.array([0.0, 0.01, 0.02, 0.1])}
  hp = {"reserve_p": 0.05, "alpha": 1e-6}
  dare = methods.regime(cfg, "OnDARE", hp, [tau])
  assert dare["lr_over_p"] == pytest.approx(2e-4) and dare["p_T"] == pytest.approx(10.0)
  assert dare["alpha_T"] == pytest.approx(2e-4)
  # E|tau / p| = mean(0, 0.2, 0.4, 2.0) = 0.65; pull = 1e-6 * 0.65 / (lr / p) = 1e-6 * mean|tau| / lr.
  assert (
    dare["pull_ratio"] == pytest.approx(1e-6 * 0.65 / 2e-4) and dare["clipped"] == 0.0
  )  # no clip (DARE_CLIP)
  ties = methods.regime(cfg, "OnTIES", dict(hp, reserve_p=0.5), [tau])
  # Top half of |tau|: 0.1 and 0.02, mean 0.06; pull = 1e-6 * 0.06 / 1e-5.
  assert ties["pull_ratio"] == pytest.approx(6e-3) and ties["clipped"] == 0.0


def test_config_overrides():
  cfg = config_lib.with_overrides(
    config_lib.PRESETS["default"], ["pref_steps=7", "beta=1", "seeds=(3,4)"]
  )
  assert (cfg.pref_steps, cfg.beta, cfg.seeds) == (7, 1.0, (3, 4))
  with pytest.raises(ValueError):
    config_lib.with_overrides(cfg, ["nonsense=1"])
  assert cfg.stage_key("base", 0) == config_lib.with_overrides(cfg, ["pref_lr=0.5"]).stage_key(
    "base", 0
  )
  assert cfg.stage_key("sft", 0) != config_lib.with_overrides(cfg, ["sft_lr=0.5"]).stage_key(
    "sft", 0
  )


# Methods: one preference step each, from a tiny SFT model.


@pytest.fixture(scope="module")
def tiny_setup():
  data = data_lib.build(TINY, 0)
  # Two random inits stand in for base and SFT: a non-zero reference delta is all a step needs.
  base, sft = model_lib.create(TINY, 0), model_lib.create(TINY, 1)
  data["pref"] = training.with_reference(sft, data["pref"])
  tau = omerge_jax.reference_delta(nnx.state(sft, nnx.Param), nnx.state(base, nnx.Param))
  return data, sft, tau


@pytest.mark.parametrize(
  "method,hp",
  [
    ("KL", {"beta": 1.0}),
    ("EMA", {"ema": 0.5}),
    ("ChildTuning", {"reserve_p": 0.5}),
    ("OnDARE step-K", {"merge_every": 2}),
    ("OnTIES step-K", {"merge_every": 2}),
  ],
)
def test_a_step_of_each_method(tiny_setup, method, hp):
  """AdamW, OnDARE, OnTIES and offline merges run in the smoke test below."""
  data, sft, tau = tiny_setup
  before = training.params_of(sft)
  model = training.with_params(TINY, before)
  # Two steps: the warm-up schedule starts at a learning rate of 0.
  tx = methods.make_tx(
    method, dict(hp, lr_scale=10.0), dataclasses.replace(TINY, pref_steps=2), tau
  )
  model, step_losses = training.train(
    model,
    tx,
    training.preference_objective("dpo", hp.get("beta", 0.1)),
    data["pref"],
    steps=2,
    batch=4,
    seed=0,
    chunk=2,
    ema=hp.get("ema", 0.0),
  )
  after = training.params_of(model)
  assert step_losses.shape == (2,) and np.isfinite(step_losses).all()
  np.testing.assert_allclose(
    step_losses[0], math.log(2), rtol=1e-4
  )  # the policy starts at the reference
  moved = [
    float(jnp.max(jnp.abs(a - b)))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
  ]
  assert max(moved) > 0


def test_unknown_method_is_an_error(tiny_setup):
  with pytest.raises(ValueError, match="unknown method"):
    methods.make_tx("SGD", {}, TINY, tiny_setup[2])


# The smoke preset, end to end.


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
  out = tmp_path / "smoke"
  # The smoke run is mostly XLA compilation: skip LLVM's optimisation passes.
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.alignment_tax",
      "--preset",
      "smoke",
      "--quiet",
      "--out",
      str(out),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  names = {"SFT", "AdamW", "OnDARE", "OnTIES", "Offline linear", "Offline DARE", "Offline TIES"}
  assert names <= set(results["methods"])
  for row in results["methods"].values():
    assert 0 <= row["reward"] <= 100 and 0 <= row["benchmark_avg"] <= 100
    assert set(row["skills"]) == set(results["config"]["skills"])
    assert row["benchmark_avg"] == pytest.approx(np.mean(list(row["skills"].values())))
    assert row["tax"] == pytest.approx(
      results["methods"]["SFT"]["benchmark_avg"] - row["benchmark_avg"]
    )
    assert set(row["std"]) >= {"reward", "benchmark_avg", "tax"}
  assert results["methods"]["SFT"]["tax"] == 0.0
  assert (out / "table.md").read_text().count("\n") == len(results["methods"]) + 2
  assert (out / "pareto.png").stat().st_size > 1000
  assert "AdamW" in proc.stdout and "wall time" in proc.stdout
  assert any(f.endswith(".npz") for f in os.listdir(out / "cache"))


# Report: tables and claims come from the numbers.


def _row(rewards, avgs, sft_avgs):
  per_seed = {
    "reward": rewards,
    "benchmark_avg": avgs,
    "tax": [a - b for a, b in zip(sft_avgs, avgs, strict=True)],
  }
  per_seed["tax_pref"] = per_seed["tax_other"] = per_seed["tax"]
  mean = {k: float(np.mean(v)) for k, v in per_seed.items()}
  return dict(
    mean,
    skills={"copy": mean["benchmark_avg"]},
    per_seed=per_seed,
    hparams={},
    std={"reward": 0.0, "benchmark_avg": 0.0, "tax": 0.0},
  )


def test_report_table_and_claims():
  from experiments.alignment_tax import report

  sft = [50.0, 52.0, 48.0, 51.0, 49.0]
  m = {
    "SFT": _row([5.0] * 5, sft, sft),
    "AdamW": _row([80.0, 82.0, 79.0, 81.0, 78.0], [44.0, 45.0, 43.0, 46.0, 42.0], sft),
    # Clearly better on both: reproduced.
    "OnTIES": _row([85.0, 87.0, 84.0, 86.0, 83.0], [47.0, 48.0, 46.0, 49.0, 45.0], sft),
    # Higher reward on average but within the noise: not reproduced.
    "OnDARE": _row([90.0, 70.0, 85.0, 75.0, 86.0], [44.0, 45.0, 43.0, 46.0, 42.0], sft),
  }
  for row in m.values():
    row["vs_adamw"] = {
      k: stats.paired(row["per_seed"][k], m["AdamW"]["per_seed"][k]) for k in metrics.PAIRED_KEYS
    }
  results = {"config": {"name": "t", "seeds": [0, 1, 2, 3, 4], "skills": ["copy"]}, "methods": m}
  table = report.table_md(results)
  assert (
    "| OnTIES | 85.0 | 47.0 | 47.0 | 3.0 | 3.0 | 3.0 | +5.0 [+5.0, +5.0] | -3.0 [-3.0, -3.0] | — |"
    in table
  )
  text = report.claims_md(results)
  assert "The testbed has an alignment tax" in text and "reward +75.0 [" in text
  ties = next(c for c in report.claims(results) if "OnTIES gets" in c["claim"])
  dare = next(c for c in report.claims(results) if "OnDARE gets" in c["claim"])
  assert ties["reproduced"] and "(better)" in ties["evidence"]
  assert (
    not dare["reproduced"]
    and "reward +1.2 [" in dare["evidence"]
    and "(indistinguishable)" in dare["evidence"]
  )
  assert "**not reproduced**" in text and "**reproduced**" in text
  # Table 3 lists GRPO beside the paper's algorithms; only the paper's rows make claims.
  results["algorithms"] = {
    alg: {"AdamW": m["AdamW"], "OnTIES": m["OnTIES"]} for alg in ("dpo", "grpo")
  }
  table3 = [c["claim"] for c in report.claims(results) if c["claim"].startswith("Table 3")]
  assert table3 == ["Table 3, DPO: OnTIES gets a higher reward and a lower tax than AdamW"]
  assert "| GRPO | OnTIES | 85.0 |" in report.algorithms_md(results)


# AdamW's frontier: hand-made per-seed curves, where every point lies is known.

SFT_AVGS = [99.0, 98.0, 97.0, 99.0, 98.0]
SFT_REWARDS = [10.0, 12.0, 8.0, 11.0, 9.0]
# AdamW's tax at (lr_scale, steps); seed i pays (1 + 0.1 i) times it, and the
# reward rises with the tax, so every run and checkpoint is a vertex.
ADAMW_TAX = {
  (0.5, 100): 0.3,
  (0.5, 200): 0.8,
  (1.0, 100): 1.2,
  (1.0, 200): 2.5,
  (2.0, 100): 4.0,
  (2.0, 200): 8.0,
}


def _point(taxes, rewards):
  """A row at the given per-seed taxes and rewards (benchmark average = SFT's minus the tax)."""
  sft_avgs = SFT_AVGS[: len(taxes)]  # the first len(taxes) seeds (a run may have fewer than 5)
  return _row(list(rewards), [a - t for a, t in zip(sft_avgs, taxes, strict=True)], sft_avgs)


def _frontier_results(n_seeds=5):
  rows = []
  for (lr, steps), tax in ADAMW_TAX.items():
    taxes = [tax * (1 + 0.1 * i) for i in range(n_seeds)]
    rewards = [r + 20.0 * math.sqrt(t) for r, t in zip(SFT_REWARDS[:n_seeds], taxes, strict=True)]
    row = _point(taxes, rewards)
    rows.append(dict(row, hparams={"lr_scale": lr}, steps=steps))
  sft = _row(SFT_REWARDS[:n_seeds], SFT_AVGS[:n_seeds], SFT_AVGS[:n_seeds])
  results = {
    "config": {"name": "t", "seeds": list(range(n_seeds)), "skills": ["copy"]},
    "methods": {"SFT": sft, "AdamW": rows[1]},
    "adamw_frontier": rows,
  }
  return results, rows


def _add_method(results, name, row):
  """``row`` as method ``name``, with its paired differences from AdamW as the runner writes them."""
  adamw = results["methods"]["AdamW"]["per_seed"]
  row["vs_adamw"] = {k: stats.paired(row["per_seed"][k], adamw[k]) for k in metrics.PAIRED_KEYS}
  results["methods"][name] = row


def test_adamw_at_another_learning_rate_lands_on_its_frontier():
  from experiments.alignment_tax import frontier

  results, rows = _frontier_results()
  # AdamW at lr x 1, at the end of its run and half-way between two of its checkpoints.
  between = _point(
    [
      (a + b) / 2
      for a, b in zip(rows[2]["per_seed"]["tax"], rows[3]["per_seed"]["tax"], strict=True)
    ],
    [
      (a + b) / 2
      for a, b in zip(rows[2]["per_seed"]["reward"], rows[3]["per_seed"]["reward"], strict=True)
    ],
  )
  for row in (rows[3], between):
    c = frontier.compare(results, row)
    for key in ("reward", "tax"):
      d = c[key]["diff"]
      assert d["n"] == 5 and d["lo"] - 1e-9 <= 0.0 <= d["hi"] + 1e-9 and abs(d["mean"]) < 1e-9
    assert c["verdict"] == "indistinguishable from AdamW's frontier"
  assert frontier.seed_frontier(results, 0)[0] == (
    0.0,
    SFT_REWARDS[0],
  )  # the SFT model is its low end


def test_a_method_shifted_up_lands_above_the_frontier_by_the_shift():
  from experiments.alignment_tax import frontier, report

  results, rows = _frontier_results()
  shift = [2.0, 4.0, 3.0, 2.5, 3.5]
  up = _point(
    rows[2]["per_seed"]["tax"],
    [r + s for r, s in zip(rows[2]["per_seed"]["reward"], shift, strict=True)],
  )
  c = frontier.compare(results, up)
  assert c["reward"]["diff"]["mean"] == pytest.approx(3.0) and c["reward"]["diff"]["lo"] > 0
  assert c["tax"]["diff"]["hi"] < 0  # AdamW pays more tax for that reward
  assert c["verdict"] == "above AdamW's frontier"
  down = _point(
    rows[2]["per_seed"]["tax"],
    [r - s for r, s in zip(rows[2]["per_seed"]["reward"], shift, strict=True)],
  )
  assert frontier.compare(results, down)["verdict"] == "below AdamW's frontier"
  _add_method(results, "OnTIES", up)
  claim = next(
    c
    for c in report.claims(results)
    if c["claim"].startswith("Table 1 on AdamW's frontier: OnTIES")
  )
  assert claim["reproduced"] and "reward +3.0 [" in claim["evidence"]
  assert "| OnTIES | " in report.frontier_verdicts_md(
    results
  ) and "above AdamW's frontier |" in report.frontier_verdicts_md(results)


def test_outside_the_frontier_is_said_not_extrapolated():
  from experiments.alignment_tax import frontier, report

  results, rows = _frontier_results()
  top = rows[-1]["per_seed"]
  # More tax and more reward than any AdamW run: neither reading exists.
  beyond = _point([t + 5.0 for t in top["tax"]], [r + 5.0 for r in top["reward"]])
  c = frontier.compare(results, beyond)
  assert c["verdict"] == "outside AdamW's frontier"
  assert (
    c["reward"]["outside"] == c["tax"]["outside"] == [0, 1, 2, 3, 4] and c["reward"]["diff"] is None
  )
  # A reward above AdamW's best at a tax inside the range: the tax reading is outside, the reward one decides.
  high = _point(rows[3]["per_seed"]["tax"], [r + 30.0 for r in rows[3]["per_seed"]["reward"]])
  c = frontier.compare(results, high)
  assert (
    c["tax"]["diff"] is None
    and c["reward"]["diff"]["lo"] > 0
    and c["verdict"] == "above AdamW's frontier"
  )
  _add_method(results, "OnDARE", beyond)
  assert "| OnDARE | " in report.frontier_verdicts_md(results)
  assert "outside (seed 0, 1, 2, 3, 4) | — |" in report.frontier_verdicts_md(results)


def test_one_seed_says_undetermined_and_which_run_gives_intervals():
  from experiments.alignment_tax import frontier, report

  results, rows = _frontier_results(n_seeds=1)
  up = _point(rows[2]["per_seed"]["tax"], [r + 3.0 for r in rows[2]["per_seed"]["reward"]])
  c = frontier.compare(results, up)
  assert c["verdict"] == "undetermined (1 seed)" and c["reward"]["diff"]["mean"] == pytest.approx(
    3.0
  )
  _add_method(results, "OnTIES", up)
  text = report.claims_md(results)
  assert "**not reproduced**" not in text and text.count("**undetermined (1 seed)**") == len(
    report.claims(results)
  )
  assert "reward +3.0 [no interval: 1 seed]" in text  # the point estimate stays
  assert "--preset paper` runs 5 seeds" in text and f"{config_lib.PAPER_RUN_MINUTES:g} min" in text
  assert f"on {config_lib.PAPER_RUN_SEEDS} seeds" in text
  assert "seeds=(0,1,2)" in text
  assert "no claim is decided" in report.supported_md(results)
  results["config"]["seeds"] = [0, 1]
  assert report.intervals_md(results) == ""


def test_the_reported_command_reruns_the_config():
  """RESULTS.md names the run's command: its preset and, shell-quoted, every field it overrides."""
  import shlex
  from experiments.alignment_tax import report

  paper = config_lib.PRESETS["paper"]
  assert report.command(paper.to_json()) == "python -m experiments.alignment_tax --preset paper"
  cfg = dataclasses.replace(paper, seeds=(0, 1, 2), pref_lr=3e-5, offline_densities=(0.5,))
  line = report.command(cfg.to_json())
  assert "'seeds=(0,1,2)'" in line and "pref_lr=3e-05" in line
  words = shlex.split(line)
  assert words[:5] == ["python", "-m", "experiments.alignment_tax", "--preset", "paper"]
  assert config_lib.with_overrides(paper, words[5:]) == cfg


def test_the_paper_run_time_quoted_is_the_recorded_runs():
  with open(os.path.join(ROOT, "docs", "figures", "results.json")) as f:
    recorded = json.load(f)
  assert config_lib.PAPER_RUN_MINUTES == round(recorded["wall_time_s"] / 60, 1)
  assert config_lib.PAPER_RUN_SEEDS == len(recorded["config"]["seeds"])


def test_pareto_zoom_holds_the_methods_not_the_collapsed_merges(tmp_path):
  from experiments.alignment_tax import report

  results, rows = _frontier_results()
  results["methods"]["OnTIES"] = _point(rows[2]["per_seed"]["tax"], rows[2]["per_seed"]["reward"])
  results["methods"]["Offline DARE"] = _point([40.0] * 5, [5.0] * 5)  # collapsed
  results["offline_points"] = [
    dict(results["methods"]["Offline DARE"], kind="DARE", hparams={"weight": 0.5})
  ]
  (x0, x1), (y0, y1) = report.pareto_figure(results, str(tmp_path / "pareto.png"))
  inside = [r for n, r in results["methods"].items() if not n.startswith("Offline")]
  assert all(x0 < r["benchmark_avg"] < x1 and y0 < r["reward"] < y1 for r in inside)
  assert results["methods"]["Offline DARE"]["benchmark_avg"] < x0
  assert x1 - x0 < 10.0  # the methods span points, not the collapse's tens


def test_report_command_redraws_the_figures_from_results_json(tmp_path):
  from experiments.alignment_tax import report

  results, _ = _frontier_results()
  results.update(offline_points=[], sweeps={}, stages={}, regime={}, algorithms={})
  results["config"].update(
    d_model=8,
    n_layers=1,
    base_steps=1,
    sft_steps=1,
    pref_steps=1,
    pref_lr=1e-5,
    beta=0.1,
    algorithm="dpo",
    reserve_p=0.05,
    alpha=1e-6,
    sweeps=[],
    algorithms=[],
  )
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "results.json").write_text(json.dumps(results))
  images = []
  for out in ("a", "b"):
    report.main([str(tmp_path / "run" / "results.json"), str(tmp_path / out / "RESULTS.md")])
    images.append((tmp_path / out / "figures" / "pareto.png").read_bytes())
    assert (tmp_path / out / "figures" / "results.json").exists()
  assert images[0] == images[1] and len(images[0]) > 1000
  assert "## Table 1 against AdamW's frontier" in (tmp_path / "a" / "RESULTS.md").read_text()


# Learning rates: GRPO's own search, one common rate where AdamW pays a tax, the claims across rates.


class _ScoredRunner(runner_lib.Runner):
  """The protocol's runner with training and evaluation replaced by ``score(optimizer, setting, seed, fraction)``.

  ``score`` gives the ``(reward, tax)`` of a run's model after ``fraction`` of
  its steps; memoisation and selection are the real runner's, and
  ``trained_log`` lists every run trained, in order.
  """

  def __init__(self, cfg, score):
    super().__init__(cfg, None)
    self.score, self.trained_log = score, []

  def setup(self, seed):
    sft = {"reward": 10.0, "skills": {s: 90.0 for s in self.cfg.skills}, "benchmark_avg": 90.0}
    return {"test": sft, "base_skills": dict(sft["skills"]), "tau": {"w": jnp.full(4, 0.01)}}

  def _train(self, method, hp, seed, keep):
    optimizer, full = methods.canonical(method, hp, self.cfg)
    self.trained_log.append((method, full))
    return [(optimizer, full, seed, n / self.cfg.pref_steps) for n in [self.cfg.pref_steps, *keep]]

  def evaluate(self, params, seed, *, validate, beta=None):
    reward, tax = self.score(*params)
    m = {
      "reward": reward,
      "skills": {s: 90.0 - tax for s in self.cfg.skills},
      "benchmark_avg": 90.0 - tax,
    }
    return {"test": m, "val": m}

  def offline(self, kind, hp, seed, adamw_hp, validate):
    return self.evaluate(("Offline", dict(hp, **adamw_hp), seed, 1.0), seed, validate=validate)


# AdamW's tax at the end of its run, by learning-rate scale; seed i pays (1 + 0.1 i) times it.
ADAMW_TAX_AT = {0.5: 1.0, 1.0: 5.0, 2.0: 20.0}


def _adamw_like(optimizer, full, seed, fraction, merge_tax=1.0):
  """AdamW's tax rises with the learning rate and along the run; a merge pays ``merge_tax`` times it."""
  tax = (
    ADAMW_TAX_AT[full["lr_scale"]]
    * fraction
    * (1 + 0.1 * seed)
    * (1.0 if optimizer == "AdamW" else merge_tax)
  )
  return 10.0 + 20.0 * math.sqrt(tax), tax


def _scored_protocol(cfg, score=_adamw_like):
  """``results.json``'s content of ``cfg`` with `_ScoredRunner`, and the runner."""
  runner = _ScoredRunner(cfg, score)
  return runner_lib._protocol(cfg, runner), runner  # pylint: disable=protected-access


def _lr_config(*overrides):
  """Three seeds; AdamW, OnDARE and OnTIES, each searching the three learning rates."""
  cfg = dataclasses.replace(
    config_lib.PRESETS["smoke"],
    seeds=(0, 1, 2),
    methods=(
      ("AdamW", config_lib.lr_search()),
      ("OnDARE", config_lib.lr_search()),
      ("OnTIES", config_lib.lr_search()),
    ),
  )
  return config_lib.with_overrides(cfg, list(overrides))


def test_the_common_learning_rate_is_chosen_from_adamw_alone(monkeypatch):
  from experiments.alignment_tax import learning_rates

  cfg = _lr_config("common_lr_band=(3.0,10.0)")
  runner = _ScoredRunner(cfg, _adamw_like)
  trained_before = []
  choose = learning_rates.common_scale
  monkeypatch.setattr(
    learning_rates,
    "common_scale",
    lambda *a: trained_before.append(list(runner.trained_log)) or choose(*a),
  )
  common = runner_lib._protocol(cfg, runner)["common_lr"]  # pylint: disable=protected-access
  assert trained_before[0] and all(
    method == "AdamW" for method, _ in trained_before[0]
  )  # before any merge
  assert common["lr_scale"] == 1.0 and common["adamw_tax"] == pytest.approx(5.0 * 1.1)
  assert [t["lr_scale"] for t in common["adamw_taxes"]] == [
    0.5,
    1.0,
    2.0,
  ] and "inside [3, 10]" in common["reason"]
  assert list(common["methods"]) == ["AdamW", "OnDARE", "OnTIES"]
  assert all(row["hparams"]["lr_scale"] == 1.0 for row in common["methods"].values())
  assert common["methods"]["OnDARE"]["vs_adamw"]["tax"]["mean"] == 0.0
  # Every method's learning-rate search already ran there: the table trains nothing more.
  assert len(runner.trained_log) == len(
    _scored_protocol(dataclasses.replace(cfg, common_lr_band=()))[1].trained_log
  )
  # Merges that pay three times AdamW's tax (or a tenth) move their rows, not the choice.
  for merge_tax in (3.0, 0.1):
    other = _scored_protocol(cfg, functools.partial(_adamw_like, merge_tax=merge_tax))[0][
      "common_lr"
    ]
    assert {k: v for k, v in other.items() if k != "methods"} == {
      k: v for k, v in common.items() if k != "methods"
    }
    assert other["methods"]["OnTIES"]["tax"] == pytest.approx(
      merge_tax * common["methods"]["OnTIES"]["tax"]
    )


def test_the_tax_band_forces_the_rule_and_the_table_says_it():
  from experiments.alignment_tax import learning_rates, report

  high = _scored_protocol(_lr_config("common_lr_band=(15,30)"))[0]
  assert high["common_lr"]["lr_scale"] == 2.0
  text = report.common_lr_md(high)
  assert "At lr 3e-05 (`pref_lr` × 2)" in text and "| OnTIES | " in text and "lr_scale=2" in text
  none = _scored_protocol(_lr_config("common_lr_band=(50,60)"))[0]
  assert none["common_lr"]["lr_scale"] is None and "methods" not in none["common_lr"]
  assert "no scale of AdamW's search has a mean tax in [50, 60]" in none["common_lr"]["reason"]
  assert report.common_lr_md(none).startswith("No common learning rate: no scale")
  assert report.common_lr_md({"common_lr": {}}) == ""
  # Several scales inside the band: the one nearest its middle.
  assert learning_rates.common_scale({0.5: 3.5, 1.0: 6.0, 2.0: 9.5}, (3.0, 10.0))["lr_scale"] == 1.0
  assert learning_rates.common_scale({0.5: 3.5, 1.0: 9.9}, (3.0, 10.0))["lr_scale"] == 0.5


def test_grpo_selects_its_own_learning_rate():
  from experiments.alignment_tax import report

  cfg = _lr_config("algorithms=('ipo','grpo')")
  # On validation (here equal to test), DPO does best at lr x 0.5 and GRPO at lr x 2.
  best = {"dpo": 0.5, "ipo": 0.5, "grpo": 2.0}
  score = lambda opt, full, seed, fraction: (
    50.0 - 10.0 * abs(math.log2(full["lr_scale"] / best[full["algorithm"]])),
    0.0,
  )
  results = _scored_protocol(cfg, score)[0]
  for method in ("AdamW", "OnDARE", "OnTIES"):
    assert results["methods"][method]["hparams"]["lr_scale"] == 0.5
    assert results["algorithms"]["ipo"][method]["hparams"] == {
      "lr_scale": 0.5,
      "algorithm": "ipo",
    }  # DPO's
    assert results["algorithms"]["grpo"][method]["hparams"] == {
      "lr_scale": 2.0,
      "algorithm": "grpo",
    }  # its own
    assert results["algorithms"]["grpo"][method]["reward"] == 50.0
  assert report.algorithms_md(results).count("| lr_scale=2 |") == 3  # Table 3 shows GRPO's own


def _at_lr(scale, adamw, ties):
  methods_at = {"AdamW": adamw, "OnTIES": ties}
  for row in methods_at.values():
    row["vs_adamw"] = {
      k: stats.paired(row["per_seed"][k], adamw["per_seed"][k]) for k in metrics.PAIRED_KEYS
    }
  return {"lr_scale": scale, "methods": methods_at, "sweeps": {}}


def test_a_claim_is_stable_only_when_its_verdict_holds_at_every_learning_rate():
  from experiments.alignment_tax import report

  sft = [90.0, 91.0, 89.0, 90.5, 89.5]
  adamw = lambda: _row([40.0, 42.0, 41.0, 39.0, 43.0], [84.0, 85.0, 83.0, 84.5, 83.5], sft)
  better = _row(
    [45.0, 47.0, 46.0, 44.0, 48.0], [86.0, 87.0, 85.0, 86.5, 85.5], sft
  )  # +5 reward, -2 tax
  noisy = _row(
    [50.0, 32.0, 48.0, 35.0, 46.0], [84.0, 85.0, 83.0, 84.5, 83.5], sft
  )  # within the noise
  results = {
    "config": {"name": "t", "seeds": [0, 1, 2, 3, 4], "skills": ["copy"], "pref_lr": 1e-5},
    "methods": {"SFT": _row([5.0] * 5, sft, sft)},
    "lr_sweep": {
      "pref_lr": 1e-5,
      "at": [_at_lr(0.5, adamw(), better), _at_lr(1.0, adamw(), noisy)],
    },
  }
  by_claim = {c["claim"]: c for c in report.claims_over_lr(results)}
  tax = by_claim[
    "The testbed has an alignment tax: AdamW-DPO raises the reward and lowers the benchmark average"
  ]
  assert tax["verdicts"] == ["reproduced", "reproduced"] and tax["robustness"] == "stable"
  ties = by_claim["Table 1: OnTIES gets a higher reward and a lower tax than AdamW"]
  assert ties["verdicts"] == ["reproduced", "not reproduced"] and ties["robustness"] == "fragile"
  results["lr_sweep"]["at"][1] = _at_lr(
    1.0, adamw(), _row(better["per_seed"]["reward"], better["per_seed"]["benchmark_avg"], sft)
  )
  assert {c["robustness"] for c in report.claims_over_lr(results)} == {"stable"}
  table = report.claims_over_lr_md(results)
  assert (
    "| Claim | lr 5e-06 (× 0.5; AdamW tax 6.0) | lr 1e-05 (× 1; AdamW tax 6.0) | Across learning rates |"
    in table
  )
  assert (
    "| Table 1: OnTIES gets a higher reward and a lower tax than AdamW | reproduced | reproduced | **stable** |"
    in table
  )
  results["config"]["seeds"] = [0]
  assert {c["robustness"] for c in report.claims_over_lr(results)} == {"undetermined (1 seed)"}


def test_the_paper_preset_sweeps_its_claims_over_three_learning_rates():
  from experiments.alignment_tax import __main__ as main_lib, report

  cfg = config_lib.PRESETS["paper"]
  results, runner = _scored_protocol(cfg)
  scales = [at["lr_scale"] for at in results["lr_sweep"]["at"]]
  assert (
    len(scales) >= 3 and max(scales) / min(scales) >= 2 and scales == runner_lib.adamw_scales(cfg)
  )
  swept = [c["claim"] for c in report.claims_over_lr(results)]
  assert swept == [
    c["claim"] for c in report.claims(results) if not c["claim"].startswith("Table 3")
  ]
  assert results["common_lr"][
    "lr_scale"
  ] == 1.0 and "lr 1.5e-05 (× 1; AdamW tax" in report.claims_over_lr_md(results)
  # The cost docs/experiments.md quotes, in runs of pref_steps per seed: the claims' sweep over learning rates
  # adds 14, GRPO's own search 6 (9 GRPO runs, not 3), the common learning rate none.
  per_seed = len(runner.trained_log) / len(cfg.seeds)
  without = _scored_protocol(dataclasses.replace(cfg, lr_sweep=False))[1]
  assert per_seed - len(without.trained_log) / len(cfg.seeds) == 14
  assert sum(full["algorithm"] == "grpo" for _, full in runner.trained_log) == 9 * len(cfg.seeds)
  assert per_seed == 60
  # The progress bar's count is the runs trained.
  assert main_lib.planned_steps(cfg) == len(cfg.seeds) * (
    cfg.base_steps + cfg.sft_steps + 60 * cfg.pref_steps
  )
