"""Offline merges of Hugging Face checkpoints (experiments.llm_merge) against omerge_jax.offline.

The tiny base/SFT pair of `experiments.llm_dpo.tiny` and a third model (the
SFT moved further, standing for a DPO model) are merged tensor by tensor from
their files; the same merge on the whole ``{name: tensor}`` trees with
`omerge_jax.offline` must give the same tensors. Needs the ``test`` extra.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from experiments import llm_merge
from experiments.llm_dpo import tiny
from omerge_jax import offline

# One worker runs this file (conftest.ONE_WORKER): its module fixture (a subprocess)
# then runs once, not once per worker.


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("merge")
  _, sft = tiny.write_all(root, "qwen2", n_pairs=2, layers=1)
  rng = np.random.default_rng(5)
  dpo = {k: v + (rng.standard_normal(v.shape) * 0.02).astype(np.float32) for k, v in sft.items()}
  tiny.write_checkpoint(root / "dpo", json.loads((root / "sft" / "config.json").read_text()), dpo)
  return root


def read(folder):
  tensors = {}
  for path in sorted(folder.glob("*.safetensors")):
    tensors |= load_file(path)
  return tensors


@pytest.mark.parametrize(
  "method, weights, extra",
  [
    ("linear", [0.7, 0.4], []),
    ("dare", [0.7, 0.4], ["--density", "0.5", "--seed", "3"]),
    ("ties", [1.0, 0.5], ["--density", "0.3"]),
  ],
)
def test_tensor_by_tensor_equals_offline_on_whole_models(method, weights, extra, folders):
  out = folders / f"out_{method}"
  files = llm_merge.main(
    [
      "--base",
      str(folders / "base"),
      "--models",
      str(folders / "sft"),
      str(folders / "dpo"),
      "--method",
      method,
      "--weights",
      *map(str, weights),
      *extra,
      "--out",
      str(out),
      "--max-shard-size",
      "50KB",
    ]
  )
  assert len(files) > 1 and (out / "model.safetensors.index.json").exists()
  got = read(out)
  base, models = read(folders / "base"), [read(folders / "sft"), read(folders / "dpo")]
  kwargs = {"dare": dict(density=0.5, seed=3), "ties": dict(density=0.3)}.get(method, {})
  whole = jax.jit(lambda b, ms: getattr(offline, method)(b, ms, weights, **kwargs))
  wide = method != "ties"  # the precision the command merges in
  with jax.enable_x64(wide):
    cast = lambda tree: {
      k: jnp.asarray(v, jnp.float64 if wide else jnp.float32) for k, v in tree.items()
    }
    expected = whole(cast(base), [cast(m) for m in models])
  assert got.keys() == base.keys()
  for key, value in got.items():
    np.testing.assert_array_equal(value, np.asarray(expected[key], np.float32), err_msg=key)
  if method == "dare":
    # Each tensor has its own masks: an entry is dropped from both task vectors w.p. 0.25.
    tau = got["lm_head.weight"] - base["lm_head.weight"]
    assert 0.2 < np.mean(tau == 0) < 0.3
  model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  np.testing.assert_array_equal(model.state_dict()["lm_head.weight"].numpy(), got["lm_head.weight"])
  with torch.no_grad():
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_ties_on_a_tensor_of_the_bracketed_path(tmp_path):
  # Above 4 * 2**16 entries TIES brackets its threshold from a sample.
  rng = np.random.default_rng(0)
  trees = [{"w": rng.standard_normal((600, 512)).astype(np.float32)} for _ in range(3)]
  for name, tree in zip(("base", "a", "b"), trees, strict=True):
    tiny.write_checkpoint(tmp_path / name, {"torch_dtype": "float32"}, tree)
  llm_merge.main(
    [
      "--base",
      str(tmp_path / "base"),
      "--models",
      str(tmp_path / "a"),
      str(tmp_path / "b"),
      "--method",
      "ties",
      "--weights",
      "1",
      "0.5",
      "--density",
      "0.2",
      "--out",
      str(tmp_path / "out"),
    ]
  )
  expected = jax.jit(lambda b, ms: offline.ties(b, ms, [1.0, 0.5], density=0.2))(
    trees[0], trees[1:]
  )["w"]
  np.testing.assert_array_equal(read(tmp_path / "out")["w"], expected)


def test_weight_one_gives_the_model_back(folders):
  out = folders / "identity"
  llm_merge.main(
    [
      "--base",
      str(folders / "base"),
      "--models",
      str(folders / "sft"),
      "--weights",
      "1.0",
      "--method",
      "linear",
      "--out",
      str(out),
    ]
  )
  sft = read(folders / "sft")
  got = read(out)
  assert got.keys() == sft.keys()
  for key, value in sft.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    assert json.loads((out / name).read_text()) == json.loads((folders / "sft" / name).read_text())


def test_bfloat16_output_and_mismatched_models(folders, tmp_path):
  out = folders / "bf16"
  llm_merge.main(
    [
      "--base",
      str(folders / "sft"),
      "--models",
      str(folders / "dpo"),
      "--weights",
      "0.5",
      "--method",
      "linear",
      "--dtype",
      "bfloat16",
      "--out",
      str(out),
    ]
  )
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
  tiny.write_all(tmp_path, "llama", n_pairs=2, layers=1)
  with pytest.raises(ValueError, match="does not hold the tensors"):
    llm_merge.main(
      [
        "--base",
        str(folders / "base"),
        "--models",
        str(tmp_path / "sft"),
        "--weights",
        "1",
        "--method",
        "linear",
        "--out",
        str(tmp_path / "x"),
      ]
    )
  with pytest.raises(SystemExit):
    llm_merge.parse_args(
      ["--base", "b", "--models", "m", "--weights", "1", "--method", "dare", "--out", "o"]
    )  # no --density
