"""Write a tiny base/SFT checkpoint pair, tokenizer, preference and prompts files.

Everything the DPO and GRPO commands need, in the layout of a real Hugging Face
release (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` with a chat template), made locally in a second, so
the command and its tests run anywhere with no download:

    python -m experiments.llm_dpo.tiny --out /tmp/tiny --arch qwen2

writes ``/tmp/tiny/{base,sft}/``, ``/tmp/tiny/prefs.jsonl`` and
``/tmp/tiny/prompts.jsonl``. The SFT model is the base plus a small random
perturbation (so the task vector is known), and the preferences follow a rule
a model can learn in a few steps: the chosen answer uses words from one list,
the rejected answer from another. The prompts are sums with their ``answer``
(for ``--reward exact_answer``); `letters` is a reward a random tiny model
learns in a few GRPO steps (``--reward experiments.llm_dpo.tiny:letters``).
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Qwen's ChatML template, which the data pipeline renders prompts with.
CHAT_TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]
GOOD = ["sun", "tree", "river", "bread", "song", "light", "kind", "warm"]
BAD = ["rust", "mud", "noise", "ash", "cold", "dust", "crack", "fog"]
TOPICS = ["tell", "me", "about", "a", "day", "by", "the", "sea", "in", "town", "please"]

ARCHS = {
  # Divisible by fsdp=4 and tp=2 wherever Tunix shards a dimension.
  "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], bias=True),
  # RoPE base 1e6, the default of Tunix's Qwen3 and Llama-3 (the loader makes
  # them use the config's: tests/test_real_lm.py checks a Llama with 1e4).
  "qwen3": dict(
    model_type="qwen3", architectures=["Qwen3ForCausalLM"], qk_norm=True, rope_theta=1_000_000.0
  ),
  "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], rope_theta=1_000_000.0),
}


def hf_config(arch: str, vocab_size: int, layers: int = 2, tied: bool = False) -> dict:
  """A Hugging Face ``config.json`` of a model of width 32 (``tied``: no ``lm_head``)."""
  spec = ARCHS[arch]
  return {
    "architectures": spec["architectures"],
    "model_type": spec["model_type"],
    "vocab_size": vocab_size,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": layers,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rope_theta": spec.get("rope_theta", 10000.0),
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": tied,
    "max_position_embeddings": 256,
    "torch_dtype": "float32",
  }


def random_weights(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Random float32 weights named and shaped as in a Hugging Face checkpoint."""
  e, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
  hd = config["head_dim"]
  q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
  normal = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)
  ones = lambda n: (1.0 + rng.standard_normal(n) * 0.01).astype(np.float32)
  w = {
    "model.embed_tokens.weight": normal(v, e),
    "model.norm.weight": ones(e),
  }
  if not config["tie_word_embeddings"]:
    w["lm_head.weight"] = normal(v, e)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w |= {
      p + "self_attn.q_proj.weight": normal(q, e),
      p + "self_attn.k_proj.weight": normal(kv, e),
      p + "self_attn.v_proj.weight": normal(kv, e),
      p + "self_attn.o_proj.weight": normal(e, q),
      p + "mlp.gate_proj.weight": normal(f, e),
      p + "mlp.up_proj.weight": normal(f, e),
      p + "mlp.down_proj.weight": normal(e, f),
      p + "input_layernorm.weight": ones(e),
      p + "post_attention_layernorm.weight": ones(e),
    }
    if ARCHS[config["model_type"]].get("bias"):
      w |= {
        p + "self_attn.q_proj.bias": normal(q),
        p + "self_attn.k_proj.bias": normal(kv),
        p + "self_attn.v_proj.bias": normal(kv),
      }
    if ARCHS[config["model_type"]].get("qk_norm"):
      w |= {p + "self_attn.q_norm.weight": ones(hd), p + "self_attn.k_norm.weight": ones(hd)}
  return w


def write_tokenizer(folder: pathlib.Path) -> int:
  """Train and save a byte-level BPE tokenizer (Qwen's kind); returns its size."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=SPECIAL_TOKENS,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  words = ROLES + GOOD + BAD + TOPICS
  tok.train_from_iterator([" ".join(words), "\n".join(words)] * 8, trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(
    json.dumps(
      {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
      },
      indent=1,
    )
  )
  return tok.get_vocab_size()


def write_checkpoint(folder: pathlib.Path, config: dict, weights: dict) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(config, indent=1))
  save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def preference_rows(n: int, rng: np.random.Generator) -> list[dict]:
  """UltraFeedback-binarized rows; every other one uses plain strings."""
  rows = []
  for i in range(n):
    prompt = " ".join(rng.choice(TOPICS, size=4))
    chosen = " ".join(rng.choice(GOOD, size=int(rng.integers(3, 7))))
    rejected = " ".join(rng.choice(BAD, size=int(rng.integers(3, 7))))
    if i % 2:
      rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    else:
      user = {"role": "user", "content": prompt}
      rows.append(
        {
          "prompt": prompt,
          "chosen": [user, {"role": "assistant", "content": chosen}],
          "rejected": [user, {"role": "assistant", "content": rejected}],
        }
      )
  return rows


def prompt_rows(n: int, rng: np.random.Generator) -> list[dict]:
  """GSM8K-style rows: a sum to compute and its ``answer``; every other prompt is a chat."""
  rows = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(0, 50, size=2))
    prompt = f"what is {a} + {b}"
    if i % 2:
      rows.append({"prompt": prompt, "answer": str(a + b)})
    else:
      rows.append({"prompt": [{"role": "user", "content": prompt}], "answer": str(a + b)})
  return rows


def letters(prompts, completions, **kwargs) -> list[float]:
  """The share of each completion's characters that are the letters ``a``-``z``.

  A reward for tests: a random model samples mostly other bytes and special
  tokens, some letters, so its rewards differ from the first step, and
  raising the letters' probabilities raises the reward.
  """
  del prompts, kwargs
  return [sum("a" <= ch <= "z" for ch in c) / max(len(c), 1) for c in completions]


def write_all(
  out,
  arch: str = "qwen2",
  n_pairs: int = 64,
  sft_scale: float = 0.01,
  seed: int = 0,
  layers: int = 2,
  tied: bool = False,
):
  """Write ``out/base``, ``out/sft`` (both with the tokenizer), ``out/prefs.jsonl`` and ``out/prompts.jsonl``.

  Returns:
    ``(base_weights, sft_weights)``, the Hugging Face tensors written.
  """
  out = pathlib.Path(out)
  rng = np.random.default_rng(seed)
  for name in ("base", "sft"):
    (out / name).mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out / name)
  # A vocabulary larger than the tokenizer's, as real releases pad it.
  config = hf_config(arch, vocab_size=-(-vocab // 16) * 16, layers=layers, tied=tied)
  base = random_weights(config, rng)
  sft = {
    k: v + (rng.standard_normal(v.shape) * sft_scale).astype(np.float32) for k, v in base.items()
  }
  write_checkpoint(out / "base", config, base)
  write_checkpoint(out / "sft", config, sft)
  with open(out / "prefs.jsonl", "w") as f:
    for row in preference_rows(n_pairs, rng):
      f.write(json.dumps(row) + "\n")
  with open(out / "prompts.jsonl", "w") as f:
    for row in prompt_rows(n_pairs, rng):
      f.write(json.dumps(row) + "\n")
  return base, sft


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--arch", choices=sorted(ARCHS), default="qwen2")
  parser.add_argument("--pairs", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  write_all(args.out, args.arch, args.pairs, seed=args.seed)
  print(
    f"wrote {args.out}/base, {args.out}/sft, {args.out}/prefs.jsonl and "
    f"{args.out}/prompts.jsonl ({args.arch})"
  )


if __name__ == "__main__":
  main()
