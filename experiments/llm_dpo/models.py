"""Hugging Face checkpoint folders -> Tunix models, sharded on the mesh as they load.

A folder holds ``config.json`` and ``*.safetensors`` (the layout of every
Qwen2/Qwen2.5, Qwen3 and Llama-3 release). The config is translated to the
Tunix ``ModelConfig`` of the same family; the tensors are renamed and
reshaped by Tunix's own key mapping, but read shard by shard: each device's
block of each parameter is cut from the memory-mapped file
(``jax.make_array_from_callback``), so a host never holds a whole tensor,
only its own devices' shards, one at a time. (Tunix's loader would first
build every reshaped attention weight in host memory.)
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
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


def rope_theta(hf: dict) -> float:
  """The RoPE base of a ``config.json`` dict.

  ``rope_theta`` at the top level (transformers 4), or in ``rope_parameters``
  (transformers 5 writes it there); Hugging Face's default 10000 otherwise.
  """
  return float(hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta") or 10000)


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
  parameters = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or (
    parameters if parameters.get("rope_type", "default") != "default" else None
  )
  if scaling:
    # Tunix's RoPE has no scaling: Llama-3.1's long-context rescale is
    # ignored, which changes the attention beyond the original context.
    print(f"warning: rope_scaling {scaling} is ignored by Tunix's {family} model")
  theta = rope_theta(hf)
  if theta != int(theta):
    raise ValueError(f"rope_theta {theta} is not an integer, as Tunix's ModelConfig.rope_theta is")
  heads = hf["num_attention_heads"]
  common = dict(
    num_layers=hf["num_hidden_layers"],
    vocab_size=hf["vocab_size"],
    embed_dim=hf["hidden_size"],
    hidden_dim=hf["intermediate_size"],
    num_heads=heads,
    head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
    num_kv_heads=hf.get("num_key_value_heads", heads),
    rope_theta=int(theta),
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
    **common,
    use_tied_embedding=tied,
    remat_config=remat_config,
    param_dtype=param_dtype,
    dtype=dtype,
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


# The RoPE base of the Tunix model being called (`_model_class`), read by `_rope_with_theta`.
_ROPE_THETA = contextvars.ContextVar("rope_theta", default=None)


def _rope_with_theta(apply_rope):
  """Tunix's ``apply_rope`` with the calling model's theta (`_ROPE_THETA`), when one is set."""

  @functools.wraps(apply_rope)
  def wrapped(*args, **kwargs):
    theta = _ROPE_THETA.get()
    if theta is not None:
      kwargs.setdefault("rope_theta", theta)
    return apply_rope(*args, **kwargs)

  wrapped.reads_rope_theta = True
  return wrapped


@functools.cache
def _model_class(family: str):
  """Tunix's model class of ``family``; for Llama-3 and Qwen3, one that honours ``rope_theta``.

  Tunix 0.1.7's Llama-3 and Qwen3 attention call their module's
  ``apply_rope`` without the config's ``rope_theta``, so they use its default
  1,000,000 whatever the checkpoint says (SmolLM2 has 100,000, Llama-3
  500,000): a silently different model. The subclass sets the theta for the
  duration of its call (a context variable, so per thread) and the module's
  ``apply_rope`` passes it on; jit traces the call, so the compiled model
  has it too. An explicit ``rope_theta`` (a later Tunix) takes precedence.
  """
  if family == "qwen2":  # Qwen2 passes the config's rope_theta itself
    from tunix.models.qwen2 import model  # pylint: disable=g-import-not-at-top

    return model.Qwen2
  module = importlib.import_module(
    f"tunix.models.{'llama3' if family == 'llama' else 'qwen3'}.model"
  )
  if not getattr(module.apply_rope, "reads_rope_theta", False):
    module.apply_rope = _rope_with_theta(module.apply_rope)
  base = module.Llama3 if family == "llama" else module.Qwen3

  class Model(base):
    __doc__ = base.__doc__

    def __call__(self, *args, **kwargs):
      token = _ROPE_THETA.set(self.config.rope_theta)
      try:
        return super().__call__(*args, **kwargs)
      finally:
        _ROPE_THETA.reset(token)

  Model.__name__ = Model.__qualname__ = base.__name__
  return Model


def read_block(tensor: np.ndarray, transform, index) -> np.ndarray:
  """``index`` of Tunix's ``reshape(transpose(tensor, permute), shape)``, read sparingly.

  ``tensor`` is a memory-mapped Hugging Face tensor and ``transform`` Tunix's
  ``(permute, reshape)`` for it (either may be ``None``). A reshape splits a
  transposed axis into several (e.g. ``H*D -> (H, D)``); when the block takes
  whole trailing sub-axes of a split axis, only its rows are read, otherwise
  the whole axis is.
  """
  permute, reshape = transform or (None, None)
  perm = tuple(permute) if permute else tuple(range(tensor.ndim))
  moved = tuple(tensor.shape[i] for i in perm)
  target = tuple(reshape) if reshape else moved
  index = [slice(*s.indices(n)) for s, n in zip(index, target, strict=True)]
  axis, moved_slices, block_shape, rest = 0, [], [], []
  for size in moved:
    group = [axis]
    while math.prod(target[a] for a in group) < size:
      group.append(group[-1] + 1)
    if math.prod(target[a] for a in group) != size:
      raise ValueError(f"reshape {target} does not split the axes of {moved}")
    axis = group[-1] + 1
    first, inner = index[group[0]], group[1:]
    inner_size = math.prod(target[a] for a in inner)
    if first.step == 1 and all(index[a] == slice(0, target[a], 1) for a in inner):
      moved_slices.append(slice(first.start * inner_size, first.stop * inner_size))
      block_shape += [first.stop - first.start] + [target[a] for a in inner]
      rest += [slice(None)] * len(group)
    else:
      moved_slices.append(slice(None))
      block_shape += [target[a] for a in group]
      rest += [index[a] for a in group]
  source = [None] * tensor.ndim
  for moved_axis, source_axis in enumerate(perm):
    source[source_axis] = moved_slices[moved_axis]
  block = tensor[tuple(source)].transpose(perm).reshape(block_shape)
  return block[tuple(rest)]


def hf_layout(value: np.ndarray, transform, hf_shape) -> np.ndarray:
  """The inverse of Tunix's ``reshape(transpose(tensor, permute), shape)``.

  ``value`` is a parameter in Tunix's layout, ``transform`` the
  ``(permute, reshape)`` the loader applied to the Hugging Face tensor (either
  may be ``None``) and ``hf_shape`` that tensor's shape; returns the tensor.
  """
  permute, _ = transform or (None, None)
  perm = tuple(permute) if permute else tuple(range(len(hf_shape)))
  moved = value.reshape(tuple(hf_shape[i] for i in perm))
  return moved.transpose(np.argsort(perm))


def _open_safetensors(folder):
  """Memory-mapped views of every tensor of the folder, by Hugging Face name."""
  from tunix.models import safetensors_loader  # pylint: disable=g-import-not-at-top

  tensors = {}
  for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
    flat, metadata, _, handle = safetensors_loader.load_safetensors_with_offsets(path)
    handle.close()  # the memory map stays open while `flat` is referenced
    for m in metadata:
      start = m["offset_elements"]
      tensors[m["name"]] = flat[start : start + m["size_elements"]].reshape(m["shape"])
  return tensors


def abstract_model(
  hf: dict,
  mesh: jax.sharding.Mesh,
  *,
  param_dtype=jnp.float32,
  dtype=jnp.bfloat16,
  remat: bool = False,
):
  """The Tunix model of ``config.json`` dict ``hf``, with no weights allocated.

  Returns:
    ``(family, config, graph, state, shardings)``: ``state`` holds
    ``jax.ShapeDtypeStruct`` leaves and ``shardings`` (a pure dict) the
    ``NamedSharding`` of each on ``mesh``, by Tunix's sharding rules.
  """
  family, config = tunix_config(hf, param_dtype=param_dtype, dtype=dtype, remat=remat)
  if getattr(config, "num_experts", None):
    raise ValueError("mixture-of-experts checkpoints are not supported")
  model_class = _model_class(family)
  with mesh:
    abstract = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(params=0)))
  graph, state = nnx.split(abstract)
  shardings = nnx.get_named_sharding(state, mesh).to_pure_dict()
  return family, config, graph, state, shardings


def parameter_sources(family: str, config, names) -> dict:
  """Tunix parameter key -> ``(Hugging Face name, (permute, reshape))``, for tensors ``names``.

  Tunix's own key mapping, the one table both the loader (Hugging Face ->
  Tunix) and the export (`experiments.llm_dpo.export`, Tunix -> Hugging
  Face) read. Tensors the mapping does not name (e.g. rotary caches some
  checkpoints store) have no parameter and are left out.
  """
  from tunix.utils import torch_utils  # pylint: disable=g-import-not-at-top

  mapping = params_module(family)._get_key_and_transform_mapping(config)  # pylint: disable=protected-access
  sources = {}
  for name in names:
    try:
      key, transform = torch_utils.torch_key_to_jax_key(mapping, name)
    except ValueError:
      continue
    sources[key] = (name, transform)
  return sources


def load(
  folder,
  mesh: jax.sharding.Mesh,
  *,
  param_dtype=jnp.float32,
  dtype=jnp.bfloat16,
  remat: bool = False,
  expect: dict | None = None,
) -> nnx.Module:
  """Load a Hugging Face folder into a Tunix model whose params live on ``mesh``.

  Args:
    folder: a folder with ``config.json`` and ``*.safetensors``.
    mesh: a mesh with axes ``fsdp`` and ``tp`` (Tunix's sharding rules).
    param_dtype, dtype, remat: see `tunix_config`.
    expect: the config of another checkpoint that must have the same
      architecture (base and SFT must match for a task vector).

  Returns:
    The Tunix model (``Qwen2``, ``Qwen3`` or ``Llama3``).

  Raises:
    ValueError: a parameter has no tensor in the files, or one of another shape.
  """
  from tunix.models import safetensors_loader  # pylint: disable=g-import-not-at-top

  hf = read_hf_config(folder)
  family, config, graph, state, shardings = abstract_model(
    hf, mesh, param_dtype=param_dtype, dtype=dtype, remat=remat
  )
  if expect is not None:
    _, other = tunix_config(expect, param_dtype=param_dtype, dtype=dtype, remat=remat)
    if dataclasses.astuple(config) != dataclasses.astuple(other):
      raise ValueError(f"{folder} does not have the architecture of the other checkpoint")

  tensors = _open_safetensors(folder)
  sources = parameter_sources(family, config, tensors)

  def build(path, abstract_leaf, sharding):
    key = safetensors_loader.path_to_key(path)
    if key not in sources:
      raise ValueError(f"{folder}: no tensor for parameter {key}")
    name, transform = sources[key]

    def shard(index):
      block = read_block(tensors[name], transform, index)
      # A copy, so that no device buffer aliases the memory map.
      return np.array(block, dtype=param_dtype)

    try:
      return jax.make_array_from_callback(abstract_leaf.shape, sharding, shard)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"{folder}: {name} does not fit parameter {key} {abstract_leaf.shape}: {e}"
      ) from e

  loaded = jax.tree.map_with_path(build, state.to_pure_dict(), shardings)
  state.replace_by_pure_dict(loaded)
  return nnx.merge(graph, state)


def param_state(model: nnx.Module) -> nnx.State:
  """The trainable parameters, as the ``nnx.Optimizer`` passes them to Optax."""
  return nnx.state(model, nnx.Param)
