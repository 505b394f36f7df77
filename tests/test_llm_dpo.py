"""DPO with Tunix on tiny Qwen2 and Llama-3 checkpoints, on 8 simulated CPU devices.

The checkpoints, tokenizer and preference file are written locally
(`experiments.llm_dpo.tiny`): nothing is downloaded. Each test runs its
scenario in a subprocess with ``--xla_force_host_platform_device_count=8``
(jax is configured once per process, and other test files share this one),
on an ``fsdp=4, tp=2`` mesh; one scenario also runs on 2 processes of 4
devices joined by ``jax.distributed`` (a 2-host pod). The 1-process runs of a
session share a persistent compilation cache, so programs compiled once are
not compiled again.

Needs the ``tunix`` extra, which the ``test`` extra installs.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tunix  # noqa: F401  (the extra must be installed: fail, never skip)

from experiments.llm_dpo import data
from experiments.llm_dpo import memory
from experiments.llm_dpo import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN_FLAGS = (
  "--mesh fsdp=4,tp=2 --lr 1e-2 --warmup 0 --alpha 0.01 --reserve-p 0.5 --batch-size 8 "
  "--max-prompt-length 32 --max-response-length 24 --eval-fraction 0.25 --save-every 1"
).split()


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _env(cache, devices):
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    # Tests check behaviour, not speed: compile fast.
    JAX_DISABLE_MOST_OPTIMIZATIONS="1",
    HF_HUB_OFFLINE="1",
    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
  )
  if cache is not None:
    env |= dict(
      JAX_COMPILATION_CACHE_DIR=str(cache),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
    )
  return env


def run_on_8_devices(script: str, cache, timeout=600) -> dict:
  """Run ``script`` in a fresh process with 8 CPU devices; returns its last JSON line."""
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script)],
    env=_env(cache, 8),
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_on_2_processes(argv, timeout=600, module="experiments.llm_dpo"):
  """The ``module``'s command on 2 processes of 4 CPU devices each (``--distributed``, as on a pod).

  Returns each process's output.

  Without the compilation cache: loading programs that 1-process runs cached
  changed the results of this one (loss of step 2 off by 0.7%).
  """
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        "-m",
        module,
        *argv,
        "--distributed",
        f"--coordinator=127.0.0.1:{port}",
        "--num-processes=2",
        f"--process-id={i}",
      ],
      env=_env(None, 4),
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=timeout)[0] for p in procs]
  for p, output in zip(procs, outputs, strict=True):
    assert p.returncode == 0, output[-3000:]
  return outputs


def tunix_layout(arch, hf_weights):
  """The Hugging Face tensors renamed and reshaped as Tunix's loader does."""
  from tunix.utils import torch_utils  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import models  # pylint: disable=g-import-not-at-top

  config = tiny.hf_config(arch, vocab_size=hf_weights["lm_head.weight"].shape[0])
  family, tunix_config = models.tunix_config(config)
  params = models.params_module(family)
  mapping = params._get_key_and_transform_mapping(tunix_config)  # pylint: disable=protected-access
  out = {}
  for key, value in hf_weights.items():
    name, transform = torch_utils.torch_key_to_jax_key(mapping, key)
    if transform is not None:
      permute, reshape = transform
      value = value.transpose(permute) if permute else value
      value = value.reshape(reshape) if reshape else value
    out[name] = value
  return out


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_reference_delta_is_sft_minus_base_sharded_like_params(arch, tmp_path, compile_cache):
  base, sft = tiny.write_all(tmp_path, arch, n_pairs=16)
  got = run_on_8_devices(
    f"""
      import json, jax, numpy as np, omerge_jax
      from experiments.llm_dpo import distributed, models, train
      mesh = distributed.make_mesh("fsdp=4,tp=2")
      with mesh:
        args = train.parse_args("--base {tmp_path}/base --sft {tmp_path}/sft --data d --out o "
                                "--steps 3 --optimizer ondare --reserve-p 1.0".split())
        policy, tau = train.load_policy(args, mesh)
        params = models.param_state(policy)
        state = train.build_optimizer(args, tau, mesh).init(params)
      is_merge = lambda x: isinstance(x, omerge_jax.OnlineMergeState)
      merge = next(s for s in jax.tree.leaves(state, is_leaf=is_merge) if is_merge(s))
      out = {{}}
      for (path, t), p, r in zip(jax.tree_util.tree_leaves_with_path(tau), jax.tree.leaves(params),
                                 jax.tree.leaves(merge.reference)):
        key = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path[:-1])
        out[key] = dict(tau=np.asarray(t).tolist(), same=t.sharding == p.sharding == r.sharding,
                        shards=len({{str(s.index) for s in t.addressable_shards}}))
      print(json.dumps(out))
  """,
    compile_cache,
  )
  expected_sft, expected_base = tunix_layout(arch, sft), tunix_layout(arch, base)
  assert set(got) == set(expected_sft)
  for key, leaf in got.items():
    np.testing.assert_allclose(
      np.asarray(leaf["tau"]),
      expected_sft[key] - expected_base[key],
      rtol=1e-6,
      atol=1e-7,
      err_msg=key,
    )
    assert leaf["same"], f"{key}: tau, params and optimizer reference sharded differently"
  # The 2-D and 3-D weights are split over all 8 devices, not replicated.
  assert got["embedder.input_embedding"]["shards"] == 8
  assert got["layers.0.mlp.gate_proj.kernel"]["shards"] == 8


def _assert_learns(run, tolerance=2e-3):
  # Policy = reference at the start: DPO loss log 2 (bfloat16 reference: ~1e-3 off).
  assert run["train_loss"][0] == pytest.approx(np.log(2), abs=tolerance)
  assert run["train_loss"][-1] < run["train_loss"][0] - 0.2
  assert run["eval_steps"] == [0, run["steps"]]
  assert run["eval_reward_accuracy"][-1] > run["eval_reward_accuracy"][0]
  assert run["eval_reward_margin"][-1] > 0.1


@pytest.mark.slow
def test_qwen2_ondare_resumes_exactly_and_runs_on_2_processes(tmp_path, compile_cache):
  tiny.write_all(tmp_path, "qwen2", n_pairs=64, layers=1)  # 1 layer: faster to compile
  common = [
    f"--base={tmp_path}/base",
    f"--sft={tmp_path}/sft",
    f"--data={tmp_path}/prefs.jsonl",
    *TRAIN_FLAGS,
  ]
  got = run_on_8_devices(
    f"""
      import json
      from experiments.llm_dpo import train
      common = {common!r}
      runs = [
          ["--optimizer=ondare", "--steps=3", "--stop-at=2", "--out={tmp_path}/resumed"],
          ["--optimizer=ondare", "--steps=3", "--out={tmp_path}/resumed"],
          ["--optimizer=ondare", "--steps=3", "--out={tmp_path}/straight"],
      ]
      print(json.dumps([train.main(common + extra) for extra in runs]))
  """,
    compile_cache,
  )
  first, resumed, straight = got
  # The same run on 2 processes x 4 devices (a 2-host pod) takes the same steps.
  run_on_2_processes(
    [*common, "--optimizer=ondare", "--steps=3", "--stop-at=2", f"--out={tmp_path}/2proc"]
  )
  two = json.loads((tmp_path / "2proc" / "summary.json").read_text())
  # Cross-process reductions sum in another order: equal to float32 noise,
  # amplified by the large test learning rate.
  assert two["train_loss"] == pytest.approx(first["train_loss"], rel=1e-3)
  assert sorted(os.listdir(tmp_path / "2proc" / "checkpoints")) == ["1", "2"]
  # Bytes flipped in the array data that process 1 wrote of step 2 (its own
  # shards): only process 1 reads them, and both resume from step 1.
  from tests.ocdbt import flip_largest_value  # pylint: disable=g-import-not-at-top

  flip_largest_value(tmp_path / "2proc" / "checkpoints" / "2" / "model_params", process=1)
  outputs = run_on_2_processes(
    [*common, "--optimizer=ondare", "--steps=3", f"--out={tmp_path}/2proc"]
  )
  (line,) = [
    line for line in outputs[0].splitlines() if "checkpoint step" in line
  ]  # process 0 logs
  assert "checkpoint step 2: 2/model_params: ['" in line, line
  assert "differ from the digest written at save (found by process 1); moved it to " in line, line
  assert line.endswith(f"{tmp_path}/2proc/checkpoints/2.bad-digest, resuming from step 1"), line
  two_resumed = json.loads((tmp_path / "2proc" / "summary.json").read_text())
  assert (two_resumed["resumed_from"], two_resumed["steps"]) == (1, 3)
  assert sorted(os.listdir(tmp_path / "2proc" / "checkpoints")) == ["2", "2.bad-digest", "3"]
  assert (first["steps"], first["resumed_from"]) == (2, 0)
  assert (resumed["steps"], resumed["resumed_from"]) == (3, 2)
  # Stopping at step 2 and resuming continues the same run: the restored
  # params, Adam moments, merge state and data position give step 3 exactly.
  assert straight["train_loss"][:2] == pytest.approx(first["train_loss"], rel=1e-5)
  assert resumed["train_loss"] == pytest.approx(straight["train_loss"][2:], rel=1e-5)
  assert resumed["eval_loss"][-1] == pytest.approx(straight["eval_loss"][-1], rel=1e-5)
  _assert_learns(straight)
  merge = straight["merge"]
  assert merge["merged"] == [1.0, 1.0, 1.0]
  # DARE keeps about p = 0.5 of the entries (fewer: Adam's zero entries count as dropped).
  assert all(0.3 < k <= 0.55 for k in merge["kept_fraction"])
  # The metrics file holds the run's DPO metrics and the merge statistics.
  names = {json.loads(line)["name"] for line in open(tmp_path / "straight" / "metrics.jsonl")}
  assert {
    "dpo/train/loss",
    "dpo/train/rewards/accuracy",
    "dpo/train/rewards/margin",
    "dpo/train/merge/kept_fraction",
    "dpo/eval/rewards/accuracy",
  } <= names


@pytest.mark.slow
def test_llama3_onties_with_step_k_and_adamw_train(tmp_path, compile_cache):
  tiny.write_all(tmp_path, "llama", n_pairs=64, layers=1)
  common = [
    f"--base={tmp_path}/base",
    f"--sft={tmp_path}/sft",
    f"--data={tmp_path}/prefs.jsonl",
    *TRAIN_FLAGS,
    "--steps=3",
  ]
  onties, adamw = run_on_8_devices(
    f"""
      import json
      from experiments.llm_dpo import export, train
      common = {common!r}
      runs = [
          train.main(common + ["--optimizer=onties", "--merge-every=2", "--out={tmp_path}/onties",
                               "--export={tmp_path}/onties_hf"]),
          train.main(common + ["--optimizer=adamw", "--out={tmp_path}/adamw"]),
      ]
      export.main(["--checkpoint={tmp_path}/onties/checkpoints/3", "--sft={tmp_path}/sft",
                   "--out={tmp_path}/onties_ckpt_hf", "--mesh=fsdp=4,tp=2"])
      print(json.dumps(runs))
  """,
    compile_cache,
  )
  # --export writes the trained policy: the export of its last checkpoint.
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  exported = load_file(tmp_path / "onties_hf" / "model.safetensors")
  assert exported.keys() == load_file(tmp_path / "onties_ckpt_hf" / "model.safetensors").keys()
  for key, value in load_file(tmp_path / "onties_ckpt_hf" / "model.safetensors").items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  sft = load_file(tmp_path / "sft" / "model.safetensors")
  assert not np.array_equal(exported["lm_head.weight"], sft["lm_head.weight"])
  # Tunix's Llama computes in its parameters' dtype: float32 policy, bfloat16 reference.
  _assert_learns(onties, tolerance=5e-3)
  _assert_learns(adamw, tolerance=5e-3)
  # Step-K with K = 2: steps 1 and 3 are plain, step 2 merges.
  assert onties["merge"]["merged"] == [0.0, 1.0, 0.0]
  assert sorted(os.listdir(tmp_path / "onties" / "checkpoints")) == ["2", "3"]
  assert "merge" not in adamw


def test_preference_rows_in_both_layouts_tokenize_identically(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top

  tiny.write_all(tmp_path, "qwen2", n_pairs=2)
  rows = [
    {"prompt": "tell me", "chosen": "sun tree", "rejected": "mud"},
    {
      "prompt": "tell me",
      "chosen": [
        {"role": "user", "content": "tell me"},
        {"role": "assistant", "content": "sun tree"},
      ],
      "rejected": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "mud"}],
    },
  ]
  path = tmp_path / "rows.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "sft")
  encoder = data.Encoder(tokenizer, max_prompt_length=40, max_response_length=10)
  batch = encoder.batch(data.read_pairs(path))
  for name, value in batch.items():
    np.testing.assert_array_equal(value[0], value[1], err_msg=name)
  eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
  prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": "tell me"}], add_generation_prompt=True, tokenize=False
  )
  prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
  assert batch["prompt_ids"][0, -len(prompt_ids) :].tolist() == prompt_ids  # left-padded
  assert batch["prompt_mask"][0].sum() == len(prompt_ids)
  chosen = tokenizer.encode("sun tree", add_special_tokens=False) + [eos]
  assert batch["chosen_ids"][0, : len(chosen)].tolist() == chosen  # right-padded, EOS kept
  assert batch["chosen_mask"][0].tolist() == [1] * len(chosen) + [0] * (10 - len(chosen))
  assert (batch["chosen_ids"][0, len(chosen) :] == pad).all()


def test_bad_preference_rows_are_named(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: missing field\(s\) \['rejected'\]"):
    data.read_pairs(path)
  path.write_text(
    json.dumps({"prompt": "x", "chosen": [{"role": "user", "content": "x"}], "rejected": "z"})
    + "\n"
  )
  with pytest.raises(ValueError, match="must end with an assistant message"):
    data.read_pairs(path)


@pytest.mark.parametrize("arch", sorted(tiny.ARCHS))
def test_memory_counts_the_parameters_tunix_loads(arch, tmp_path):
  base, _ = tiny.write_all(tmp_path, arch, n_pairs=2)
  config = json.loads((tmp_path / "base" / "config.json").read_text())
  assert memory.parameter_count(config) == sum(v.size for v in base.values())
  # Published sizes.
  assert memory.parameter_count(memory.CONFIGS["Llama-3-8B"]) == 8_030_261_248
  assert memory.parameter_count(memory.CONFIGS["Llama-3-70B"]) == 70_553_706_496
  assert memory.parameter_count(memory.CONFIGS["Qwen2.5-7B"]) == 7_615_616_512
  assert memory.parameter_count(memory.CONFIGS["Qwen2.5-0.5B"]) == 494_032_768  # tied embeddings
  assert sum(memory.bytes_per_parameter("ondare").values()) == 4 + 4 + 8 + 2 + 4
  assert sum(memory.bytes_per_parameter("adamw").values()) == 4 + 4 + 8 + 2


class _Recording:
  """A tensor that records which blocks are read from it."""

  def __init__(self, array):
    self.array, self.ndim, self.shape, self.reads = array, array.ndim, array.shape, []

  def __getitem__(self, key):
    self.reads.append(key)
    return self.array[key]


def test_loader_reads_only_the_block_of_a_shard():
  from experiments.llm_dpo import models  # pylint: disable=g-import-not-at-top

  # q_proj as stored by Hugging Face, (heads * head_dim, embed) = (4 * 2, 8);
  # Tunix's layout is transpose + reshape to (embed, heads, head_dim).
  q = np.arange(64, dtype=np.float32).reshape(8, 8)
  transform = ((1, 0), (8, 4, 2))
  tunix_layout = q.T.reshape(8, 4, 2)
  # The shard of device (fsdp=0 of 4, tp=1 of 2): embed rows 0:2, heads 2:4.
  shard = (slice(0, 2), slice(2, 4), slice(None))
  recording = _Recording(q)
  np.testing.assert_array_equal(models.read_block(recording, transform, shard), tunix_layout[shard])
  assert recording.reads == [(slice(4, 8), slice(0, 2))]  # 8 of the 64 values
  # A block that cuts head_dim reads whole heads, then slices.
  cut = (slice(0, 8), slice(1, 3), slice(1, 2))
  np.testing.assert_array_equal(models.read_block(q, transform, cut), tunix_layout[cut])
  # o_proj: (embed, heads * head_dim) -> (heads, head_dim, embed).
  o = np.arange(64, dtype=np.float32).reshape(8, 8)
  shard = (slice(2, 4), slice(None), slice(6, 8))
  np.testing.assert_array_equal(
    models.read_block(o, ((1, 0), (4, 2, 8)), shard), o.T.reshape(4, 2, 8)[shard]
  )
