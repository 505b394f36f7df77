"""Hugging Face checkpoint folders -> Tunix models, sharded on the mesh as they load.

A folder holds ``config.json`` and ``*.safetensors`` (the layout of every
Qwen2/Qwen2.5, Qwen3 and Llama-3 release). The config is translated to the
Tunix ``ModelConfig`` of the same family and the weights are read with
Tunix's safetensors loader, which memory-maps the files and ``device_put``s
each tensor straight to its ``NamedSharding``: a process only materialises
the tensors it is transposing and the shards its own devices hold.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
from flax import nnx

FAMILIES = ("qwen2", "qwen3", "llama")


def read_hf_config(folder) -> dict:
  path = pathlib.Path(folder) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{folder} has no config.json: expected a Hugging Face model folder")
  if not list(pathlib.Path(folder).glob("*.safetensors")):
    raise FileNotFoundError(f"{folder} has no *.safetensors file")
  return json.loads(path.read_text())


def _family(hf: dict) -> str:
  model_type = hf.get("model_type")
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; expected one of {FAMILIES}")
  return model_type


def tunix_config(hf: dict, *, param_dtype=jnp.float32, dtype=jnp.bfloat16, remat: bool = False):
  """The Tunix ``ModelConfig`` of a Hugging Face ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``.
    param_dtype: storage dtype of the weights (Qwen only: Tunix's Llama-3
      keeps the loader's dtype for both storage and compute).
    dtype: compute dtype of the activations (Qwen only).
    remat: rematerialise each decoder layer in the backward pass.

  Returns:
    ``(family, config)``; ``family`` is one of `FAMILIES`.
  """
  family = _family(hf)
  if hf.get("rope_scaling"):
    # Tunix's RoPE has no scaling: Llama-3.1's long-context rescale is
    # ignored, which changes the attention beyond the original context.
    print(f"warning: rope_scaling {hf['rope_scaling']} is ignored by Tunix's {family} model")
  heads = hf["num_attention_heads"]
  common = dict(
      num_layers=hf["num_hidden_layers"],
      vocab_size=hf["vocab_size"],
      embed_dim=hf["hidden_size"],
      hidden_dim=hf["intermediate_size"],
      num_heads=heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      num_kv_heads=hf.get("num_key_value_heads", heads),
      rope_theta=int(hf.get("rope_theta", 10000)),
      norm_eps=hf.get("rms_norm_eps", 1e-6),
  )
  tied = bool(hf.get("tie_word_embeddings", False))
  if family == "llama":
    from tunix.models.llama3 import model as llama3  # pylint: disable=g-import-not-at-top

    remat_config = llama3.RematConfig.DECODER if remat else llama3.RematConfig.NONE
    return family, llama3.ModelConfig(**common, weight_tying=tied, remat_config=remat_config)
  if family == "qwen2":
    from tunix.models.qwen2 import model as lib  # pylint: disable=g-import-not-at-top
  else:
    from tunix.models.qwen3 import model as lib  # pylint: disable=g-import-not-at-top
  remat_config = lib.RematConfig.DECODER if remat else lib.RematConfig.NONE
  return family, lib.ModelConfig(
      **common, use_tied_embedding=tied, remat_config=remat_config,
      param_dtype=param_dtype, dtype=dtype,
  )


def params_module(family: str):
  """Tunix's ``params`` module of ``family`` (its safetensors key mapping and loader)."""
  if family == "qwen2":
    from tunix.models.qwen2 import params  # pylint: disable=g-import-not-at-top
  elif family == "qwen3":
    from tunix.models.qwen3 import params  # pylint: disable=g-import-not-at-top
  else:
    from tunix.models.llama3 import params  # pylint: disable=g-import-not-at-top
  return params


def load(folder, mesh: jax.sharding.Mesh, *, param_dtype=jnp.float32, dtype=jnp.bfloat16,
         remat: bool = False, expect: dict | None = None) -> nnx.Module:
  """Load a Hugging Face folder into a Tunix model whose params live on ``mesh``.

  Args:
    folder: a folder with ``config.json`` and ``*.safetensors``.
    mesh: a mesh with axes ``fsdp`` and ``tp`` (Tunix's sharding rules).
    param_dtype, dtype, remat: see `tunix_config`.
    expect: the config of another checkpoint that must have the same
      architecture (base and SFT must match for a task vector).

  Returns:
    The Tunix model (``Qwen2``, ``Qwen3`` or ``Llama3``).
  """
  hf = read_hf_config(folder)
  family, config = tunix_config(hf, param_dtype=param_dtype, dtype=dtype, remat=remat)
  if expect is not None:
    _, other = tunix_config(expect, param_dtype=param_dtype, dtype=dtype, remat=remat)
    if dataclasses.astuple(config) != dataclasses.astuple(other):
      raise ValueError(f"{folder} does not have the architecture of the other checkpoint")
  return params_module(family).create_model_from_safe_tensors(
      str(folder), config, mesh=mesh, dtype=param_dtype
  )


def param_state(model: nnx.Module) -> nnx.State:
  """The trainable parameters, as the ``nnx.Optimizer`` passes them to Optax."""
  return nnx.state(model, nnx.Param)
