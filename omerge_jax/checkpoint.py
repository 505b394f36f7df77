"""Checkpoints: the restore targets Orbax needs, and digests that catch wrong numbers.

Every field of `omerge_jax.OnlineMergeState` is a plain array (the DARE masks
are a hash of ``(seed, step, leaf, coordinates)``, so there is no PRNG key to
serialise), and Orbax's standard handlers save and restore it as it is. To
restore onto a different mesh, Orbax needs a target: a pytree of
``jax.ShapeDtypeStruct`` with the new shardings. `abstract_state` builds it
for any Optax transformation from the (abstract) params.

Orbax's OCDBT format checksums its manifest and index, not the array data: a
byte flipped on disk or in transit may restore as other numbers, silently.
`digests` computes a 64-bit digest of every shard of every array at save
(stored with the step, e.g. as Orbax's ``custom_metadata``) and `verify`
compares the restored arrays with it, naming the array and the shard that
differ.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from omerge_jax import sparsify


def abstract_state(
  tx: optax.GradientTransformation,
  params: optax.Params,
  *,
  replicated: jax.sharding.Sharding | None = None,
) -> optax.OptState:
  """The shape, dtype and sharding of ``tx.init(params)``, without computing it.

  A leaf of the state whose key path ends with the key path of a param and
  that has the param's shape (Adam's moments, the reference delta, the
  step-K accumulator: ``mu['dense']['w']`` for ``params['dense']['w']``)
  takes that param's sharding; the longest such path wins. Every other leaf
  (step counters, statistics) is replicated. Matching by path rather than
  with ``optax.tree.map_params`` works for any ``init``, including those that
  look at the params' values. Nothing is allocated: ``tx.init`` runs under
  ``jax.eval_shape``.

  Example:
    The optimizer may be built from an abstract reference delta too: the
    restore reads the state's values, reference included, from the checkpoint.

    >>> import jax, jax.numpy as jnp, omerge_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from omerge_jax.checkpoint import abstract_state
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> target_params = {"w": jax.ShapeDtypeStruct(
    ...     (1024, 512), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))}
    >>> tx = omerge_jax.ondare(1e-6, target_params, merge_every=4)
    >>> target = {"params": target_params, "opt_state": abstract_state(tx, target_params)}
    >>> merge_state = target["opt_state"][2]
    >>> merge_state.reference["w"].sharding.spec == P("fsdp")  # as the param
    True
    >>> merge_state.accumulator["w"].sharding.spec == P("fsdp")
    True
    >>> merge_state.count.sharding.spec == P()  # replicated
    True
    >>> import orbax.checkpoint as ocp  # doctest: +SKIP
    >>> restored = ocp.StandardCheckpointer().restore(path, target)  # doctest: +SKIP

  Args:
    tx: the optimizer, built exactly as for the run that saved the state.
    params: the params or a pytree of ``jax.ShapeDtypeStruct`` whose
      ``sharding`` (required) is the target sharding of each leaf.
    replicated: the sharding of the leaves that are not shaped like a param;
      by default, replicated over the mesh of the first param.

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` with the structure of
    ``tx.init(params)``, to pass as Orbax's restore target.

  Raises:
    ValueError: a leaf of ``params`` has no sharding (the path is named).
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(
        f"params{jax.tree_util.keystr(path)} has no sharding: pass arrays or "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
      )
    by_path[tuple(path)] = leaf
  if replicated is None:
    first = next(iter(by_path.values())).sharding
    # A single-device (or other non-mesh) sharding is already "replicated".
    replicated = (
      NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    )

  def target(path, leaf):
    for start in range(len(path) + 1):
      param = by_path.get(tuple(path[start:]))
      if param is not None and tuple(param.shape) == tuple(leaf.shape):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param.sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

  return jax.tree_util.tree_map_with_path(target, jax.eval_shape(tx.init, params))


class DigestMismatch(ValueError):
  """Restored values that differ from, or have no, digest written at save.

  Attributes:
    path: the array's key path (``jax.tree_util.keystr``).
    shard: the shard's index (``"[0:512, 0:64]"``), or ``None`` when the
      whole array was compared (restored onto another layout) or no digest
      was saved for it.
  """

  def __init__(self, path: str, shard: str | None, detail: str):
    where = path if shard is None else f"{path} shard {shard}"
    super().__init__(f"{where}: {detail}")
    self.path, self.shard = path, shard


def _word_bits(dtype) -> int:
  """The bits of a ``dtype`` entry, for its uint32 words; 0 where there is no digest."""
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return 8
  if dtype.kind == "c" or getattr(dtype, "itemsize", 0) * 8 not in (8, 16, 32, 64):
    return 0
  if dtype.itemsize == 1 and dtype.name.endswith(("int4", "int2", "float4_e2m1fn")):
    return 0  # sub-byte types stored one per byte: their padding bits are not data
  return dtype.itemsize * 8


def _words(x: jax.Array) -> jax.Array:
  """The bits of ``x`` as uint32 words (a 64-bit dtype adds a trailing axis of 2)."""
  bits = _word_bits(x.dtype)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if bits >= 32:
    return lax.bitcast_convert_type(x, jnp.uint32)
  return lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)


def _block_digest(block: jax.Array, offsets) -> jax.Array:
  """uint32[2]: two sums over the block's words ``w`` at global coordinates ``c``.

  With ``h = hash(c)`` (`sparsify`'s mix, one axis at a time), the lanes are
  ``sum mix(w ^ h)`` and ``sum w * (h | 1)``, modulo 2**32. A sum over global
  coordinates is additive: the digests of a partition of an array add up to
  the whole array's, whatever the layout, so an array restored onto another
  mesh is checked too. Any change of one word changes the second lane (an odd
  multiplier is invertible); other changes leave both lanes equal with
  probability about 2**-64.
  """
  words = _words(block)
  offsets = tuple(offsets) + (0,) * (words.ndim - len(offsets))
  h = jnp.uint32(0x6A09E667)
  for axis, (size, offset) in enumerate(zip(words.shape, offsets, strict=True)):
    coord = lax.iota(jnp.uint32, size) + jnp.asarray(offset, jnp.uint32)
    salt = jnp.uint32((0x9E3779B9 * (axis + 1)) & 0xFFFFFFFF)
    h = sparsify._mix32(h[..., None] + sparsify._mix32(coord ^ salt))  # pylint: disable=protected-access
  mixed = sparsify._mix32(words ^ h)  # pylint: disable=protected-access
  linear = words * (h | jnp.uint32(1))
  # One reduction of both lanes: XLA:CPU fuses it into one pass over the
  # words, where two sums took 14x longer (1.4 s/GB against 0.1 on 2 cores).
  zero = jnp.uint32(0)
  sums = lax.reduce(
    (mixed, linear), (zero, zero), lambda a, b: (a[0] + b[0], a[1] + b[1]), tuple(range(words.ndim))
  )
  return jnp.stack(sums)


def _spec(sharding: NamedSharding, ndim: int) -> tuple:
  return tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))


@functools.partial(jax.jit, static_argnums=0)
def _device_digests(shardings: tuple, leaves: list) -> list:
  """Each device's digest of its block of each leaf: uint32[*mesh.shape, 2] per leaf.

  One program for the whole tree (compiled once per run); each device reads
  its own block once, and nothing but the 8 bytes per device leaves it.
  """
  out = []
  for sharding, x in zip(shardings, leaves, strict=True):
    mesh, spec = sharding.mesh, _spec(sharding, x.ndim)

    def local(block, spec=spec, mesh=mesh):
      offsets = [
        0 if axes is None else lax.axis_index(axes) * block.shape[dim]
        for dim, axes in enumerate(spec)
      ]
      return _block_digest(block, offsets)[(None,) * len(mesh.axis_names)]

    out.append(
      jax.shard_map(
        local,
        mesh=mesh,
        in_specs=PartitionSpec(*spec),
        out_specs=PartitionSpec(*mesh.axis_names),
        check_vma=False,
      )(x)
    )
  return out


_whole_digest = jax.jit(lambda x: _block_digest(x, ()))


def _index_key(index: tuple, shape: tuple) -> str:
  """``"[0:512, 0:64]"``: a shard's slice of each axis."""
  parts = []
  for s, n in zip(index, shape, strict=True):
    start, stop, _ = s.indices(n)
    parts.append(f"{start}:{stop}")
  return "[" + ", ".join(parts) + "]"


def _shard_keys(x) -> dict:
  """``{device: shard index}`` of ``x``; ``{None: the whole}`` without a ``NamedSharding``."""
  if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
    return {d: _index_key(i, x.shape) for d, i in x.sharding.devices_indices_map(x.shape).items()}
  return {None: _index_key((slice(None),) * np.ndim(x), np.shape(x))}


def _shard_table(tree, gather: bool) -> dict[str, dict[str, np.ndarray]]:
  """``{path: {shard index: uint32[2]}}`` of every array of ``tree``.

  With ``gather`` (a collective: every process calls it), every shard of the
  global arrays, from whichever process holds it; else this process's
  addressable shards only.
  """
  named, other = [], []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    key = jax.tree_util.keystr(path)
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    if not _word_bits(dtype):
      raise TypeError(f"{key}: no digest for dtype {dtype} (complex or sub-byte)")
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
      named.append((key, x))
    else:
      # Replicated or single-device leaves (step counters): one shard, the whole.
      other.append((key, x))
  table: dict[str, dict[str, np.ndarray]] = {}
  for key, x in other:
    if isinstance(x, jax.Array) and not x.is_fully_replicated:
      raise TypeError(f"{key}: no digest for an array sharded with {type(x.sharding).__name__}")
    value = np.asarray(_whole_digest(x if isinstance(x, jax.Array) else np.asarray(x)))
    table[key] = {_shard_keys(x)[None]: value}
  if not named:
    return table
  out = _device_digests(tuple(x.sharding for _, x in named), [x for _, x in named])
  if gather:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    # Every device's digests, on every process: ``(device, digest)`` per leaf.
    per_device = [
      [(x.sharding.mesh.devices[i], grid[i]) for i in np.ndindex(x.sharding.mesh.devices.shape)]
      for (_, x), grid in zip(
        named, multihost_utils.process_allgather(out, tiled=True), strict=True
      )
    ]
  else:
    per_device = [[(s.device, np.asarray(s.data)) for s in y.addressable_shards] for y in out]
  for (key, x), digests_of in zip(named, per_device, strict=True):
    index_of = _shard_keys(x)
    table[key] = {}
    for device, value in digests_of:  # replicas of a shard: one entry
      table[key].setdefault(index_of[device], np.asarray(value).reshape(2))
  return table


def _hex(value: np.ndarray) -> str:
  return "".join(f"{int(v):08x}" for v in value)


def digests(tree) -> dict[str, dict[str, str]]:
  r"""A digest of every shard of every array of ``tree``, to save with it.

  The digest of a block of 32-bit words :math:`w_c` (the entries' bits; a
  64-bit entry is two words, a narrower one is widened) at global
  coordinates :math:`c` is two sums modulo :math:`2^{32}`,

  .. math::

    \Big(\sum_c \operatorname{mix}(w_c \oplus h_c),\;
    \sum_c w_c\,(h_c \mathbin{|} 1)\Big),

  with :math:`h_c` a hash of the coordinates (the mix of `omerge_jax.sparsify`).
  A change of one word always changes the second sum (an odd factor is
  invertible); other changes go unseen with probability about
  :math:`2^{-64}`. The sums over a partition of an array add up to the whole
  array's, so `verify` checks a state restored onto any layout.

  Each device digests its own blocks in one program for the whole tree; only
  the digests, 8 bytes per device and array, are gathered across processes,
  never an array. Call it on every process (it is a collective), before or
  while the arrays are saved.

  Example:
    >>> import jax.numpy as jnp
    >>> from omerge_jax import checkpoint
    >>> state = {"w": jnp.arange(6.0).reshape(2, 3), "count": jnp.int32(3)}
    >>> saved = checkpoint.digests(state)
    >>> sorted(saved), list(saved["['w']"])
    (["['count']", "['w']"], ['[0:2, 0:3]'])
    >>> checkpoint.verify(state, saved)  # the same values: nothing raised
    >>> checkpoint.verify({**state, "w": state["w"].at[1, 2].set(7.0)}, saved)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    omerge_jax.checkpoint.DigestMismatch: ['w'] shard [0:2, 0:3]: the restored values differ ...

  Args:
    tree: a pytree of arrays: ``jax.Array`` (sharded with a ``NamedSharding``,
      replicated or on one device), NumPy arrays or scalars.

  Returns:
    ``{key path: {shard index: 16 hex digits}}``: JSON-ready, the same on
    every process; the shard index is the shard's slice of each axis,
    e.g. ``"[0:512, 0:64]"``. Replicas of a shard have one entry.

  Raises:
    TypeError: naming the leaf, for a complex or sub-byte dtype, or a sharding
      other than ``NamedSharding`` that is not replicated.
  """
  return {
    path: {index: _hex(value) for index, value in shards.items()}
    for path, shards in _shard_table(tree, gather=True).items()
  }


def _sum(values) -> np.ndarray:
  return np.sum(np.stack(list(values)).astype(np.uint64), axis=0) % np.uint64(2**32)


def verify(tree, saved: Mapping[str, Mapping[str, str]]) -> None:
  """Check restored arrays against the `digests` written when they were saved.

  On the layout they were saved with, each process compares the shards it
  holds, with no communication. Restored onto another layout (other shard
  indices), each array's whole digest (the sum of its shards', as the
  digest is additive) is compared instead, which gathers 8 bytes per device
  and array across processes: every process must then call it.

  Args:
    tree: the restored arrays.
    saved: what `digests` returned for the saved arrays (the same key paths).

  Raises:
    DigestMismatch: the first array (and shard) whose values differ from
      their digest, or that has no digest in ``saved``.
  """
  layouts = {}  # path -> every shard index of the restored layout (the same on every process)
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    key = jax.tree_util.keystr(path)
    if key not in saved:
      raise DigestMismatch(key, None, "no digest was saved for it")
    layouts[key] = set(_shard_keys(x).values())
  same = all(layouts[key] <= saved[key].keys() for key in layouts)
  # Decided from global facts, so every process takes the same branch.
  table = _shard_table(tree, gather=not same)
  for key, shards in table.items():
    if layouts[key] <= saved[key].keys():
      for index, value in shards.items():
        if _hex(value) != saved[key][index]:
          raise DigestMismatch(
            key, index, "the restored values differ from the digest written at save"
          )
    else:
      expected = _sum(np.array([int(h[:8], 16), int(h[8:], 16)]) for h in saved[key].values())
      if not np.array_equal(_sum(shards.values()), expected):
        raise DigestMismatch(
          key, None, "the restored array differs from the digest written at save"
        )
