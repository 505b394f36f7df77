"""Export a trained policy as a Hugging Face folder (``config.json``, ``*.safetensors``, tokenizer).

    python -m experiments.llm_dpo.export --checkpoint runs/x/checkpoints/955 \\
        --sft /models/SFT --out runs/x/hf [--dtype bfloat16] [--max-shard-size 5GB]

The params of the Orbax checkpoint (``model_params`` of Tunix's checkpoint
manager) are restored onto a mesh, sharded as in training, and written under
the Hugging Face names and layouts of the SFT folder's tensors: the inverse
of the loader's key mapping and reshapes (`models.parameter_sources` reads
Tunix's table, `models.hf_layout` undoes its transpose and reshape). One
tensor at a time is gathered to the host (every process takes part, process
0 writes), streamed into the files (`hf_folder.write_safetensors`): a host
holds one tensor at a time, never the model.
The SFT folder's ``config.json`` (with ``torch_dtype`` set to the written
dtype) and tokenizer files are copied, so the folder loads with
``transformers.AutoModelForCausalLM.from_pretrained``, lm-evaluation-harness
and vLLM. A tied model (``tie_word_embeddings``) has no ``lm_head.weight``,
as in the SFT folder.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.llm_dpo import distributed
from experiments.llm_dpo import hf_folder
from experiments.llm_dpo import models


def _gather(leaf) -> np.ndarray:
  """The whole of one parameter on every process (a collective when it spans processes)."""
  if leaf.is_fully_addressable:
    return np.asarray(jax.device_get(leaf))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))


def write_hf(
  params: dict, sft, out, *, dtype: str | None = None, max_shard_size: int | str = "5GB"
) -> dict:
  """Write ``params`` (Tunix's layout, a pure dict of arrays) as a Hugging Face folder.

  Args:
    params: the model's state as ``nnx.State.to_pure_dict()``, on any mesh.
    sft: the SFT folder: names, shapes, config and tokenizer of the output.
    out: the folder to write (created).
    dtype: ``float32``, ``bfloat16`` or ``float16``; default: the SFT's.
    max_shard_size: bound of one ``*.safetensors`` file (bytes or ``"5GB"``).

  Returns:
    ``{"files": {file: bytes}, "dtype": dtype}``.
  """
  from tunix.models import safetensors_loader  # pylint: disable=g-import-not-at-top

  hf = models.read_hf_config(sft)
  family, config = models.tunix_config(hf)
  header = hf_folder.read_header(sft)
  dtype = dtype or hf_folder.default_dtype(hf, header)
  if dtype not in hf_folder.DTYPES:
    raise ValueError(f"dtype {dtype!r} is not one of {sorted(hf_folder.DTYPES)}")
  sources = models.parameter_sources(family, config, header)
  leaves = {
    safetensors_loader.path_to_key(path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  if set(leaves) != set(sources):
    raise ValueError(
      f"the params and {sft}'s tensors differ: params only "
      f"{sorted(set(leaves) - set(sources))}, {sft} only "
      f"{sorted(set(sources) - set(leaves))}"
    )
  by_name = {name: (key, transform) for key, (name, transform) in sources.items()}

  def produce(name):
    key, transform = by_name[name]
    return models.hf_layout(_gather(leaves[key]), transform, header[name][0])

  writer = jax.process_index() == 0
  files = hf_folder.write_safetensors(
    out,
    {n: header[n][0] for n in header if n in by_name},
    dtype,
    produce,
    max_shard_size=max_shard_size,
    write=writer,
  )
  if writer:
    hf_folder.copy_config_and_tokenizer(sft, out, dtype)
  return {"files": files, "dtype": dtype}


def export_policy(args, model: nnx.Module) -> None:
  """With ``--export DIR``, write a trained ``model`` as a Hugging Face folder (`write_hf`)."""
  write_hf(nnx.state(model).to_pure_dict(), args.sft, args.export, dtype=args.export_dtype)


def restore_params(checkpoint, sft, mesh: jax.sharding.Mesh) -> dict:
  """The float32 params of a Tunix checkpoint step folder, sharded on ``mesh`` as in training."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(checkpoint).absolute() / "model_params"
  if not path.is_dir():
    raise FileNotFoundError(f"{checkpoint} has no model_params: expected OUT/checkpoints/STEP")
  hf = models.read_hf_config(sft)
  _, _, _, state, shardings = models.abstract_model(hf, mesh, param_dtype=jnp.float32)
  target = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state.to_pure_dict(), shardings
  )
  state.replace_by_pure_dict(target)
  restored = ocp.PyTreeCheckpointer().restore(
    path,
    args=ocp.args.PyTreeRestore(
      item=state, restore_args=ocp.checkpoint_utils.construct_restore_args(state)
    ),
  )
  return restored.to_pure_dict()


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--checkpoint", required=True, help="a step folder: OUT/checkpoints/STEP")
  p.add_argument("--sft", required=True, help="the SFT folder the run started from")
  p.add_argument("--out", required=True, help="Hugging Face folder to write")
  p.add_argument(
    "--dtype",
    choices=sorted(hf_folder.DTYPES),
    default=None,
    help="dtype of the weights written (default: the SFT checkpoint's)",
  )
  p.add_argument("--max-shard-size", default="5GB", help="bound of one *.safetensors file")
  p.add_argument("--mesh", default=None, help="e.g. fsdp=8,tp=1; default: fsdp over all devices")
  distributed.add_args(p)
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  distributed.start(args)
  start = time.time()
  models.tunix_config(models.read_hf_config(args.sft))  # an unknown architecture fails here
  mesh = distributed.make_mesh(args.mesh)
  with mesh:
    params = restore_params(args.checkpoint, args.sft, mesh)
    written = write_hf(
      params, args.sft, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size
    )
  if jax.process_index() == 0:
    sizes = ", ".join(f"{f} {b:,} bytes" for f, b in written["files"].items())
    print(f"wrote {args.out} ({written['dtype']}: {sizes}) in {time.time() - start:.1f} s")
  return written


if __name__ == "__main__":
  main()
