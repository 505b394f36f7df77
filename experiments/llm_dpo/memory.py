"""Memory per device of a DPO run, from the models' ``config.json`` numbers.

    python -m experiments.llm_dpo.memory                     # the table in docs/llm.md
    python -m experiments.llm_dpo.memory --config my/config.json --devices 16 64

Counts what lives on the devices for the whole run, fully sharded over
``fsdp x tp`` (every weight of these models is split over both axes; the
norms, replicated over ``fsdp``, are too small to show):

- the policy's master weights, its gradients and Adam's two moments, in
  ``--param-dtype`` (float32: a step of lr 5e-7 is below bfloat16's
  resolution of a weight);
- the frozen DPO reference model, in ``--ref-dtype`` (bfloat16);
- for OnDARE/OnTIES, the sparsified task vector :math:`F(\\tau_r)`, stored
  dense in ``--reference-dtype``, and with ``--merge-every`` K > 1 the step-K
  accumulator in float32.

Activations are not included: they depend on batch, sequence length and
``--remat``, and are what ``--grad-accum`` trades against.
"""

from __future__ import annotations

import argparse
import json

# config.json values of the models the paper aligned (Qwen1.5, Llama-3) and
# of their current successors.
CONFIGS = {
  "Qwen1.5-1.8B": dict(
    model_type="qwen2",
    num_hidden_layers=24,
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5504,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
  ),
  "Qwen1.5-7B": dict(
    model_type="qwen2",
    num_hidden_layers=32,
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
  ),
  "Qwen2.5-0.5B": dict(
    model_type="qwen2",
    num_hidden_layers=24,
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
  ),
  "Qwen2.5-7B": dict(
    model_type="qwen2",
    num_hidden_layers=28,
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
  ),
  "Llama-3-8B": dict(
    model_type="llama",
    num_hidden_layers=32,
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
  ),
  "Llama-3-70B": dict(
    model_type="llama",
    num_hidden_layers=80,
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    tie_word_embeddings=False,
  ),
}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 1024**3


def parameter_count(hf: dict) -> int:
  """Number of parameters of a Qwen2/Qwen3/Llama ``config.json``."""
  e, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  heads = hf["num_attention_heads"]
  d = hf.get("head_dim") or e // heads
  kv = hf.get("num_key_value_heads", heads)
  layer = (
    e * heads * d
    + 2 * e * kv * d
    + heads * d * e  # q, k, v, o
    + 3 * e * f  # gate, up, down
    + 2 * e  # the two RMS norms
  )
  if hf["model_type"] == "qwen2":
    layer += heads * d + 2 * kv * d  # q, k, v biases
  if hf["model_type"] == "qwen3":
    layer += 2 * d  # q and k norms
  embeddings = v * e * (1 if hf.get("tie_word_embeddings") else 2)
  return hf["num_hidden_layers"] * layer + embeddings + e


def bytes_per_parameter(
  optimizer: str, param_dtype="float32", ref_dtype="bfloat16", reference_dtype=None, merge_every=1
) -> dict[str, int]:
  """Bytes per model parameter of each resident buffer."""
  p = BYTES[param_dtype]
  parts = {"policy": p, "grads": p, "adam": 2 * p, "reference model": BYTES[ref_dtype]}
  if optimizer != "adamw":
    parts["F(tau)"] = BYTES[reference_dtype or param_dtype]
    if merge_every > 1:
      parts["step-K accumulator"] = 4
  return parts


def table(configs: dict, devices, **dtypes) -> str:
  head = ["model", "params", "optimizer", "bytes/param"] + [f"GiB/device, {n} dev" for n in devices]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, hf in configs.items():
    n = parameter_count(hf)
    for optimizer in ("adamw", "ondare/onties"):
      parts = bytes_per_parameter(optimizer, **dtypes)
      total = sum(parts.values())
      cells = [
        name,
        f"{n / 1e9:.2f} B",
        optimizer,
        f"{total} ({' + '.join(str(b) for b in parts.values())})",
      ]
      cells += [f"{n * total / d / GIB:.1f}" for d in devices]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", action="append", default=[], help="a config.json (repeatable)")
  p.add_argument("--devices", type=int, nargs="+", default=[8, 32, 64, 256])
  p.add_argument("--param-dtype", default="float32", choices=sorted(BYTES))
  p.add_argument("--ref-dtype", default="bfloat16", choices=sorted(BYTES))
  p.add_argument("--reference-dtype", default=None, choices=sorted(BYTES))
  p.add_argument("--merge-every", type=int, default=1)
  args = p.parse_args(argv)
  configs = {path: json.load(open(path)) for path in args.config} or CONFIGS
  dtypes = dict(
    param_dtype=args.param_dtype,
    ref_dtype=args.ref_dtype,
    reference_dtype=args.reference_dtype,
    merge_every=args.merge_every,
  )
  names = " + ".join(bytes_per_parameter("ondare", **dtypes))
  print(f"bytes/param = {names} (AdamW: without F(tau)); activations not included\n")
  print(table(configs, args.devices, **dtypes))


if __name__ == "__main__":
  main()
