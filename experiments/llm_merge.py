"""Offline merges of Hugging Face checkpoints (the paper's baselines), tensor by tensor.

    python -m experiments.llm_merge --base SFT --models DPO --method linear --weights 0.5 --out DIR
    python -m experiments.llm_merge --base BASE --models A B --method ties --weights 1 1 \\
        --density 0.2 --out DIR

The result is ``base + merge(models - base)`` with the semantics of
`omerge_jax.offline` (``linear``: task arithmetic; ``dare``: drop and rescale
each task vector, then linear; ``ties``: trim, elect sign, disjoint mean),
applied to one tensor at a time: each is read from the memory-mapped
``*.safetensors`` of every folder, merged (linear and DARE in float64, so that
a weight of 1 gives a model back bit for bit; TIES in float32) and streamed
into the output, so a host holds a few tensors, never a model. DARE's masks hash the
tensor's index among the sorted tensor names (its leaf index in the
``{name: tensor}`` tree), so the merge equals `omerge_jax.offline.dare` on
the whole models with the same ``--seed``. ``--models SFT --weights 1.0
--method linear`` writes the SFT model back. Config and tokenizer are the
first model's (a pre-trained base may have no chat template).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.llm_dpo import extra
from experiments.llm_dpo import hf_folder
from experiments.llm_dpo import models as llm_models
from omerge_jax import offline

METHODS = ("linear", "dare", "ties")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="folder whose task vectors are taken from")
  p.add_argument("--models", nargs="+", required=True, help="folders merged into --base")
  p.add_argument("--method", choices=METHODS, required=True)
  p.add_argument("--weights", nargs="+", type=float, required=True, help="one per model")
  p.add_argument("--density", type=float, help="kept fraction of each task vector (dare, ties)")
  p.add_argument("--seed", type=int, default=0, help="DARE's masks")
  p.add_argument("--out", required=True, help="Hugging Face folder to write")
  p.add_argument(
    "--dtype",
    choices=sorted(hf_folder.DTYPES),
    default=None,
    help="dtype written (default: the first model's)",
  )
  p.add_argument("--max-shard-size", default="5GB", help="bound of one *.safetensors file")
  args = p.parse_args(argv)
  if len(args.weights) != len(args.models):
    p.error(f"--weights has {len(args.weights)} values for {len(args.models)} --models")
  if args.method != "linear" and args.density is None:
    p.error(f"--method {args.method} needs --density")
  return args


@functools.partial(jax.jit, static_argnames=("method", "weights", "density", "seed"))
def merge_tensor(method: str, base, models, weights: tuple, *, density=None, seed=0, leaf_index=0):
  """One tensor of the merge: `omerge_jax.offline` on the one-leaf trees ``base``, ``models``.

  Compiled once per method and shape (eagerly, TIES's selection would
  dispatch many small programs per tensor).
  """
  if method == "linear":
    return offline.linear(base, models, weights)
  if method == "dare":
    return offline.dare(base, models, weights, density=density, seed=seed, leaf_offset=leaf_index)
  return offline.ties(base, models, weights, density=density)


def _open(folder, stack: contextlib.ExitStack) -> dict:
  """Tensor name -> the memory-mapped file holding it."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  handles = {}
  for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
    f = stack.enter_context(safe_open(path, framework="flax"))
    handles |= {name: f for name in f.keys()}
  return handles


def merge(
  base,
  models,
  out,
  *,
  method: str,
  weights,
  density=None,
  seed: int = 0,
  dtype: str | None = None,
  max_shard_size="5GB",
) -> dict[str, int]:
  """Merge Hugging Face folders ``models`` into ``base``; write the folder ``out``.

  Returns:
    file name -> bytes of each ``*.safetensors`` written.

  Raises:
    ValueError: the folders do not hold the same tensors (names and shapes).
  """
  llm_models.read_hf_config(base)  # a Hugging Face folder, or a clear error
  header = hf_folder.read_header(base)
  shapes = {n: s for n, (s, _) in header.items()}
  for folder in models:
    if {n: s for n, (s, _) in hf_folder.read_header(folder).items()} != shapes:
      raise ValueError(f"{folder} does not hold the tensors of {base} (names and shapes)")
  dtype = dtype or hf_folder.default_dtype(
    llm_models.read_hf_config(models[0]), hf_folder.read_header(models[0])
  )
  # Linear and DARE in float64: base + (sft - base) is sft again, which float32
  # rounding can miss. TIES in float32: its selection (omerge_jax.sparsify) is
  # written for 32-bit integers and does not trace with x64 on large tensors.
  wide = method != "ties"
  # The leaf order of the {name: tensor} tree that omerge_jax.offline would flatten.
  names = sorted(header)
  leaf_index = {name: i for i, name in enumerate(names)}
  with contextlib.ExitStack() as stack:
    handles = [_open(folder, stack) for folder in (base, *models)]

    def produce(name):
      tensors = [h[name].get_tensor(name) for h in handles]
      if not jnp.issubdtype(tensors[0].dtype, jnp.floating):
        return np.asarray(tensors[0])  # integer buffers are not merged
      with jax.enable_x64(wide):
        tensors = [t.astype(jnp.float64 if wide else jnp.float32) for t in tensors]
        return np.asarray(
          merge_tensor(
            method,
            tensors[0],
            tensors[1:],
            tuple(weights),
            density=density,
            seed=seed,
            leaf_index=leaf_index[name],
          )
        )

    files = hf_folder.write_safetensors(
      out, {n: shapes[n] for n in names}, dtype, produce, max_shard_size=max_shard_size
    )
  hf_folder.copy_config_and_tokenizer(models[0], out, dtype)
  return files


def main(argv=None):
  args = parse_args(argv)
  extra.require("experiments.llm_merge", modules=("safetensors",))
  start = time.time()
  files = merge(
    args.base,
    args.models,
    args.out,
    method=args.method,
    weights=args.weights,
    density=args.density,
    seed=args.seed,
    dtype=args.dtype,
    max_shard_size=args.max_shard_size,
  )
  sizes = ", ".join(f"{f} {b:,} bytes" for f, b in files.items())
  print(f"wrote {args.out} ({args.method}: {sizes}) in {time.time() - start:.1f} s")
  return files


if __name__ == "__main__":
  main()
