"""GRPO with Tunix on a tiny Qwen2 checkpoint, on 8 simulated CPU devices.

The checkpoints, tokenizer and prompts are written locally
(`experiments.llm_dpo.tiny`): nothing is downloaded. One subprocess with
``--xla_force_host_platform_device_count=8`` runs every training scenario on
an ``fsdp=4, tp=2`` mesh (the helpers and the compilation cache are those of
``tests/test_llm_dpo.py``). The reward, `tiny.letters`, varies between a
random model's completions from the first step, so the policy gradient is
not zero, and a few steps raise it. The reward registry and the input errors
are tested without a model.

Needs the ``tunix`` extra, which the ``test`` extra installs.
"""

import json

import pytest
import tunix  # noqa: F401  (the extra must be installed: fail, never skip)

from experiments.llm_dpo import tiny
from experiments.llm_grpo import prompts
from experiments.llm_grpo import rewards
from tests.test_llm_dpo import compile_cache  # noqa: F401  (the session's fixture)
from tests.test_llm_dpo import run_on_8_devices

TRAIN_FLAGS = (
  "--mesh fsdp=4,tp=2 --lr 3e-2 --warmup 0 --alpha 0.01 --reserve-p 0.5 --batch-size 8 "
  "--num-generations 4 --max-prompt-length 32 --max-response-length 16 --save-every 2 "
  "--steps 4 --reward experiments.llm_dpo.tiny:letters"
).split()


@pytest.mark.slow
def test_each_optimizer_raises_the_reward_and_resumes_exactly(tmp_path, compile_cache):  # noqa: F811
  tiny.write_all(tmp_path, "qwen2", n_pairs=32, layers=1)  # 1 layer: faster to compile
  common = [
    f"--base={tmp_path}/base",
    f"--sft={tmp_path}/sft",
    f"--prompts={tmp_path}/prompts.jsonl",
    *TRAIN_FLAGS,
  ]
  got = run_on_8_devices(
    f"""
      import json, jax, omerge_jax
      from flax import nnx
      from experiments.llm_grpo import train
      common = {common!r}
      runs = {{}}
      for name, extra in [
          ("first", ["--optimizer=ondare", "--stop-at=2", "--out={tmp_path}/resumed"]),
          ("resumed", ["--optimizer=ondare", "--out={tmp_path}/resumed"]),
          ("ondare", ["--optimizer=ondare", "--out={tmp_path}/ondare"]),
          ("adamw", ["--optimizer=adamw", "--out={tmp_path}/adamw"]),
          # 2 micro-batches of 8 prompts: the rollout and loss programs of the runs above.
          ("onties", ["--optimizer=onties", "--batch-size=16", "--grad-accum=2",
                      "--out={tmp_path}/onties"]),
      ]:
        runs[name], cluster = train.run(train.parse_args(common + extra))
      # The last run's (OnTIES in Tunix's MultiSteps) F(tau), beside the actor's params.
      trainer = cluster.actor_trainer
      opt_state = trainer.optimizer.opt_state
      is_merge = lambda x: isinstance(x, omerge_jax.OnlineMergeState)
      merges = [s for s in jax.tree.leaves(opt_state, is_leaf=is_merge) if is_merge(s)]
      params = nnx.state(trainer.model, nnx.Param)
      leaves = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(merges[0].reference))
      runs["reference"] = {{
          ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1]): dict(
              same=p.sharding == getattr(r, "value", r).sharding, shape=list(r.shape),
              nonzero=float((getattr(r, "value", r) != 0).mean()),
              shards=len({{str(s.index) for s in getattr(r, "value", r).addressable_shards}}))
          for (path, p), r in leaves
      }}
      runs["merge_states"] = len(merges)
      is_multi = lambda x: type(x).__name__ == "MultiStepsState"
      runs["multisteps"] = any(map(is_multi, jax.tree.leaves(opt_state, is_leaf=is_multi)))
      print(json.dumps(runs))
  """,
    compile_cache,
  )
  first, resumed, ondare = got["first"], got["resumed"], got["ondare"]
  # Stopping at step 2 and resuming continues the same run: the restored
  # params, Adam moments, merge state, data position and sampling keys give
  # steps 3 and 4's rollouts, rewards and loss exactly.
  assert (first["steps"], first["resumed_from"]) == (2, 0)
  assert (resumed["steps"], resumed["resumed_from"]) == (4, 2)
  assert ondare["reward_mean"][:2] == pytest.approx(first["reward_mean"], rel=1e-5)
  assert resumed["reward_mean"] == pytest.approx(ondare["reward_mean"][2:], rel=1e-5)
  assert resumed["train_loss"] == pytest.approx(ondare["train_loss"][2:], rel=1e-5)
  assert resumed["kl"] == pytest.approx(ondare["kl"][2:], rel=1e-5)
  for name in ("ondare", "adamw", "onties"):
    run = got[name]
    assert run["steps"] == 4, name
    # Actor = reference at the first step: no KL but the bfloat16 reference's
    # rounding; the policy moves after.
    assert run["kl"][0] == pytest.approx(0, abs=1e-3), name
    assert run["kl"][-1] > 1e-3, name
    assert run["reward_mean"][-1] > run["reward_mean"][0] + 0.05, (name, run["reward_mean"])
  assert ondare["merge"]["merged"] == [1.0] * 4
  # DARE keeps about p = 0.5 of the entries (fewer: Adam's zero entries count as dropped).
  assert all(0.3 < k <= 0.55 for k in ondare["merge"]["kept_fraction"])
  assert got["onties"]["merge"]["merged"] == [1.0] * 4
  assert "merge" not in got["adamw"]
  # F(tau) lives in the actor's optimizer state, inside Tunix's MultiSteps,
  # sharded like its parameter; the 2-D and 3-D leaves over all 8 devices.
  assert got["multisteps"] and got["merge_states"] == 1
  reference = got["reference"]
  assert all(leaf["same"] for leaf in reference.values()), reference
  assert reference["embedder.input_embedding"]["shards"] == 8
  assert reference["layers.0.mlp.gate_proj.kernel"]["shards"] == 8
  # TIES keeps the top p = 0.5 of |tau|: about half of each leaf is zero.
  assert 0.4 < reference["layers.0.mlp.gate_proj.kernel"]["nonzero"] < 0.6
  # The metrics file holds Tunix's GRPO metrics and the merge statistics.
  names = {json.loads(line)["name"] for line in open(tmp_path / "ondare" / "metrics.jsonl")}
  assert {
    "actor/train/loss",
    "actor/train/kl",
    "rewards/train/score/mean",
    "completions/train/mean_length",
    "actor/train/merge/kept_fraction",
  } <= names
  # Saved every 2 steps: the stop at step 2 left one, the resumed run added step 4's.
  assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints" / "actor").iterdir()) == [
    "2",
    "4",
  ]


def test_final_answer_reads_hashes_then_boxed_then_the_last_number():
  assert rewards.final_answer("so 3 + 4 = 7\n#### 7\nthanks 9") == "7"
  assert rewards.final_answer("#### $1,234.") == "1234"
  assert rewards.final_answer(r"we get \boxed{12} and 13") == "12"
  assert rewards.final_answer("first 3, then -2.5 apples") == "-2.5"
  assert rewards.final_answer("no answer here") is None
  fn = rewards.resolve("exact_answer")
  got = fn(
    ["q"] * 5,
    ["#### 72", "it is 72.0", r"\boxed{71}", "none", "#### 8"],
    answer=["72", "72", "72", "72", "Natalia sold 4 + 4 = 8\n#### 8"],
  )
  assert got == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_reward_hooks_and_their_fields():
  assert rewards.resolve("experiments.llm_dpo.tiny:letters") is tiny.letters
  assert rewards.required_fields(tiny.letters) == set()
  assert rewards.required_fields(rewards.exact_answer) == {"answer"}
  with pytest.raises(ValueError, match=r"--reward 'exact': not one of \['exact_answer'\]"):
    rewards.resolve("exact")
  with pytest.raises(ValueError, match="--reward 'no_such_module:f': cannot import"):
    rewards.resolve("no_such_module:f")
  with pytest.raises(ValueError, match="experiments.llm_dpo.tiny has no function 'nope'"):
    rewards.resolve("experiments.llm_dpo.tiny:nope")


def test_bad_input_is_named_before_any_model_loads(tmp_path):
  from experiments.llm_grpo import train  # pylint: disable=g-import-not-at-top

  path = tmp_path / "p.jsonl"
  path.write_text(
    json.dumps({"prompt": "1 + 1", "answer": "2"}) + "\n" + json.dumps({"prompt": "2 + 2"}) + "\n"
  )
  # Model folders that do not exist: every error below comes first.
  argv = ["--base=/nowhere", "--sft=/nowhere", "--out", str(tmp_path / "o"), "--steps=1"]
  with pytest.raises(ValueError, match=r"p.jsonl:2: missing field\(s\) \['answer'\]"):
    train.main(argv + [f"--prompts={path}", "--reward=exact_answer"])
  with pytest.raises(FileNotFoundError, match="--prompts .*missing.jsonl: no such file"):
    train.main(argv + [f"--prompts={tmp_path}/missing.jsonl", "--reward=exact_answer"])
  with pytest.raises(ValueError, match="--reward 'exact'"):
    train.main(argv + [f"--prompts={path}", "--reward=exact"])
  with pytest.raises(ValueError, match="cannot import no_such_module"):
    train.main(argv + [f"--prompts={path}", "--reward=no_such_module:fn"])
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match="p.jsonl:1: not JSON"):
    prompts.read_prompts(path)
  # A reward without required fields accepts rows with a prompt only.
  path.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
  assert prompts.read_prompts(path) == [{"messages": ({"role": "user", "content": "hi"},)}]
