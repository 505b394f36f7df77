"""Hugging Face export of a trained policy, checked by transformers (PyTorch, CPU).

One subprocess on 8 simulated CPU devices (``fsdp=4, tp=2``, as in
test_llm_dpo.py) loads each tiny SFT model, moves its params off the SFT,
saves them with Tunix's checkpoint manager (the layout a DPO run leaves) and
runs the export command; it reports Tunix's float32 logits of those params.
The tests load the exported folders with
``transformers.AutoModelForCausalLM.from_pretrained`` and compare.

Needs the ``test`` extra (PyTorch CPU, transformers, Tunix).
"""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from experiments.llm_dpo import export
from experiments.llm_dpo import hf_folder
from experiments.llm_dpo import tiny
from test_llm_dpo import compile_cache  # noqa: F401  (a fixture)
from test_llm_dpo import run_on_2_processes
from test_llm_dpo import run_on_8_devices

# One worker runs this file (conftest.ONE_WORKER): its module fixture (a subprocess)
# then runs once, not once per worker.

# (name, tiny architecture, tied embeddings)
MODELS = [
  ("qwen2", "qwen2", False),
  ("qwen3", "qwen3", False),
  ("llama", "llama", False),
  ("qwen3_tied", "qwen3", True),
]
TOKENS = [
  [5, 17, 42, 99, 3, 250, 7, 64],
  [1, 2, 3, 4, 5, 6, 7, 8],
  [280, 9, 9, 9, 120, 33, 2, 0],
  [11, 200, 150, 100, 50, 25, 12, 6],
]


def read_folder(folder) -> dict[str, np.ndarray]:
  tensors = {}
  for path in sorted(folder.glob("*.safetensors")):
    with safe_open(path, framework="flax") as f:
      tensors |= {name: np.asarray(f.get_tensor(name)) for name in f.keys()}
  return tensors


@pytest.fixture(scope="module")
def exported(tmp_path_factory, compile_cache):  # noqa: F811
  root = tmp_path_factory.mktemp("export")
  for name, arch, tied in MODELS:
    tiny.write_all(root / name, arch, n_pairs=2, layers=1, tied=tied)
  got = run_on_8_devices(
    f"""
      import json, time, jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from tunix.sft import checkpoint_manager
      from experiments.llm_dpo import distributed, export, models, train
      mesh = distributed.make_mesh("fsdp=4,tp=2")
      tokens = jnp.asarray({TOKENS!r})
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      causal = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None].repeat(len(tokens), 0)
      out = {{}}
      for name in {[m[0] for m in MODELS]!r}:
        root = "{root}/" + name
        with mesh:
          model = models.load(root + "/sft", mesh, dtype=jnp.float32)
          # The SFT's own params, exported: the SFT tensors again.
          export.write_hf(nnx.state(model).to_pure_dict(), root + "/sft", root + "/identity")
          # Params moved off the SFT, as training does, in a Tunix checkpoint.
          params = nnx.state(model, nnx.Param)
          keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
          nnx.update(model, jax.tree.map(
              lambda x: x + 0.02 * jax.random.normal(next(keys), x.shape, x.dtype), params))
          manager = checkpoint_manager.CheckpointManager(root + "/run/checkpoints")
          manager.save(5, model, force=True)
          manager.close()
          logits, _ = model(tokens, positions, None, causal)
        start = time.time()
        written = export.main(["--checkpoint", root + "/run/checkpoints/5", "--sft", root + "/sft",
                               "--out", root + "/hf", "--mesh", "fsdp=4,tp=2",
                               "--max-shard-size", "40KB"])
        seconds = time.time() - start
        export.main(["--checkpoint", root + "/run/checkpoints/5", "--sft", root + "/sft",
                     "--out", root + "/hf_bf16", "--mesh", "fsdp=4,tp=2", "--dtype", "bfloat16"])
        with mesh:
          back = nnx.state(models.load(root + "/hf", mesh, dtype=jnp.float32), nnx.Param)
        diff = max(float(jnp.max(jnp.abs(a - b)))
                   for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(nnx.state(model, nnx.Param))))
        out[name] = dict(logits=np.asarray(logits, np.float32).tolist(), round_trip=diff,
                         files=written["files"], seconds=seconds)
      print(json.dumps(out))
  """,
    compile_cache,
  )
  return root, got


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_transformers_logits_match_tunix(name, exported):
  root, got = exported
  model = transformers.AutoModelForCausalLM.from_pretrained(root / name / "hf", dtype=torch.float32)
  with torch.no_grad():
    logits = model(torch.tensor(TOKENS)).logits.numpy()
  expected = np.asarray(got[name]["logits"])
  print(f"{name}: max |transformers - tunix| = {np.max(np.abs(logits - expected)):.2e}")
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  # Loader -> export -> loader gives the params back bit for bit.
  assert got[name]["round_trip"] == 0.0


@pytest.mark.parametrize("name", [m[0] for m in MODELS])
def test_export_writes_the_hugging_face_layout(name, exported):
  root, got = exported
  folder, sft = root / name / "hf", root / name / "sft"
  # The SFT params exported are the SFT tensors, names, shapes and values.
  identity, sft_tensors = read_folder(root / name / "identity"), read_folder(sft)
  assert identity.keys() == sft_tensors.keys()
  for key, value in sft_tensors.items():
    np.testing.assert_array_equal(identity[key], value, err_msg=key)
  assert ("lm_head.weight" in sft_tensors) == (name != "qwen3_tied")
  assert ("model.layers.0.self_attn.q_proj.bias" in sft_tensors) == (name == "qwen2")
  # Shards of at most 40 kB (a larger tensor alone), indexed as Hugging Face does.
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"]) == set(sft_tensors)
  assert sorted(set(index["weight_map"].values())) == sorted(got[name]["files"])
  sizes = {n: v.nbytes for n, v in read_folder(folder).items()}
  assert index["metadata"]["total_size"] == sum(sizes.values())
  for file in got[name]["files"]:
    members = [n for n, f in index["weight_map"].items() if f == file]
    assert len(members) == 1 or sum(sizes[n] for n in members) <= 40_000, file
  assert len(got[name]["files"]) > 1
  config = json.loads((folder / "config.json").read_text())
  assert config == json.loads((sft / "config.json").read_text())
  assert (folder / "tokenizer.json").read_bytes() == (sft / "tokenizer.json").read_bytes()
  assert (folder / "tokenizer_config.json").exists()


def test_bfloat16_export(exported):
  root, _ = exported
  folder = root / "qwen2" / "hf_bf16"
  assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert [p.name for p in folder.glob("*.safetensors")] == ["model.safetensors"]
  full = read_folder(root / "qwen2" / "hf")
  for key, value in read_folder(folder).items():
    assert value.dtype == ml_dtypes.bfloat16, key
    np.testing.assert_array_equal(value, full[key].astype(ml_dtypes.bfloat16), err_msg=key)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder)
  assert model.dtype == torch.bfloat16


def test_export_on_2_processes_gathers_the_same_tensors(exported):
  # A 2-host job: each process holds half of each tensor; process 0 writes.
  root, _ = exported
  run_on_2_processes(
    [
      "--checkpoint",
      str(root / "llama" / "run" / "checkpoints" / "5"),
      "--sft",
      str(root / "llama" / "sft"),
      "--out",
      str(root / "llama" / "hf2"),
      "--mesh",
      "fsdp=4,tp=2",
      "--max-shard-size",
      "40KB",
    ],
    module="experiments.llm_dpo.export",
  )
  one, two = read_folder(root / "llama" / "hf"), read_folder(root / "llama" / "hf2")
  assert one.keys() == two.keys()
  for key, value in one.items():
    np.testing.assert_array_equal(two[key], value, err_msg=key)
  assert (root / "llama" / "hf2" / "model.safetensors.index.json").read_text() == (
    root / "llama" / "hf" / "model.safetensors.index.json"
  ).read_text()


def test_unknown_architecture_is_named(tmp_path):
  tiny.write_all(tmp_path, "qwen2", n_pairs=2, layers=1)
  config = json.loads((tmp_path / "sft" / "config.json").read_text())
  (tmp_path / "sft" / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
  with pytest.raises(ValueError, match="model_type 'mistral' is not supported"):
    export.main(
      ["--checkpoint", str(tmp_path), "--sft", str(tmp_path / "sft"), "--out", str(tmp_path / "hf")]
    )


def test_shard_plan_and_sizes():
  assert hf_folder.parse_size("5GB") == 5 * 10**9
  assert hf_folder.parse_size("2MiB") == 2 * 2**20
  assert hf_folder.parse_size("1000") == 1000
  with pytest.raises(ValueError, match="must look like"):
    hf_folder.parse_size("5 parsecs")
  plan = hf_folder.plan_shards({"a": 30, "b": 30, "c": 100, "d": 10, "e": 10}, 64)
  assert plan == [["a", "b"], ["c"], ["d", "e"]]
