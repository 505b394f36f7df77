"""Sparsification operators F of the paper, applied leaf by leaf.

Two operators, both used by the online transform and by the offline merges:

* **DARE** (random): keep each entry independently with probability ``p`` and
  scale survivors by ``1/p``, so that :math:`\\mathbb{E}[F(x)] = x`.
* **TIES** (magnitude): keep the :math:`k = \\lfloor p\\,n \\rfloor` entries of
  largest magnitude of a leaf of ``n`` entries; no rescaling. A leaf with
  ``k < 1`` is left dense.

DARE masks come from a counter-based hash of ``(seed, stream, step, leaf,
element coordinates)``: no PRNG state is carried, the mask of an entry does not
depend on how the array is laid out or sharded across devices, and the hash
fuses into the elementwise update (it costs about one extra pass of integer
arithmetic, where ``jax.random.bernoulli`` costs several passes of memory).

TIES's selection (which entries are the top k, exactly or from a sample, and
per slice of a stacked leaf) lives in `omerge_jax.trim`; `ties` applies it.
"""

from __future__ import annotations

import math
import numbers

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from omerge_jax import _sharding
from omerge_jax import trim

# Hash streams: the update and the reference delta draw independent masks.
UPDATE_STREAM = 0
REFERENCE_STREAM = 1

_GOLDEN = 0x9E3779B9
# Largest float32 below 2**32: float32(2**32 - 1) would round up and overflow.
_MAX_U32_AS_F32 = 4294967040.0


def _mix32(x: jax.Array) -> jax.Array:
  """`lowbias32` finaliser (C. Wellons): a bijection on uint32, full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def element_hash(
  shape: Sequence[int], seed: ArrayLike, stream: ArrayLike, step: ArrayLike, leaf_index: ArrayLike
) -> jax.Array:
  """Uniform uint32 per entry, a function of its coordinates and the key only.

  The key is two 32-bit words: one hashes ``(seed, stream, step)``, the other
  ``(seed, stream, leaf_index)``, each a bijection of its counter, so no two
  ``(step, leaf)`` pairs share both words (a single 32-bit key would be shared
  by about ``(steps * leaves)**2 / 2**33`` pairs, each a whole mask drawn
  twice). The step word starts the hash; the coordinates' hashes
  ``g_d(i_d)`` are folded in one axis at a time, ``h <- mix(h + g_d(i_d))``,
  the leaf word mixed into the first axis's: ``g_0(i_0) = mix(g(i_0) +
  leaf)``. Only the last fold runs per entry; earlier ones run on the
  (small) leading axes. No flat index is formed, so leaves with
  more than 2**32 entries do not overflow.
  """
  return _element_hash(shape, seed, stream, step, leaf_index, None)


def _element_hash(shape, seed, stream, step, leaf_index, axes):
  u32 = lambda v: jnp.asarray(v, jnp.uint32)
  key = _mix32(u32(seed) ^ jnp.uint32(0x6A09E667))
  key = _mix32(key + u32(stream) * jnp.uint32(_GOLDEN))
  h = _mix32(key + u32(step))
  leaf = _mix32((key ^ jnp.uint32(0xBB67AE85)) + u32(leaf_index) * jnp.uint32(_GOLDEN))
  if not shape:
    return _mix32(h + _mix32(leaf))
  for axis, size in enumerate(shape):
    coord = _sharding.iota((size,), 0, _sharding.axes_of(axes, [axis]))
    salt = jnp.uint32((_GOLDEN * (axis + 2)) & 0xFFFFFFFF)
    g = _mix32(coord ^ salt)
    # The leaf word enters the first axis only, so that every later axis's
    # g is one vector for all leaves of that size (XLA builds it once, not
    # per leaf), and by addition: with coord ^ leaf, row i of one leaf would
    # hash as row i ^ leaf ^ leaf' of another, the same draws.
    h = _mix32(h[..., None] + (_mix32(g + leaf) if axis == 0 else g))
  return h


def dare_keep_mask(
  shape: Sequence[int],
  reserve_p: ArrayLike,
  seed: ArrayLike,
  stream: ArrayLike,
  step: ArrayLike,
  leaf_index: ArrayLike,
) -> jax.Array:
  """Bernoulli(reserve_p) keep mask of ``shape`` (True = keep).

  The keep probability is ``floor(p * 2**32) / 2**32`` (at least ``2**-32``),
  computed exactly for a Python ``p`` (in float32 for a traced one, within a
  relative 2**-24); ``p = 1`` keeps everything exactly.
  """
  return _dare_keep(shape, reserve_p, seed, stream, step, leaf_index, None)


def _dare_keep(shape, reserve_p, seed, stream, step, leaf_index, axes) -> jax.Array:
  h = _element_hash(shape, seed, stream, step, leaf_index, axes)
  if isinstance(reserve_p, numbers.Real):
    p = float(reserve_p)
    if p >= 1:
      return jnp.ones_like(h, dtype=bool)
    threshold = min(max(math.floor(p * 2**32), 1), 2**32 - 1)  # exact: a power of 2
    return h < jnp.uint32(threshold)
  p = jnp.asarray(reserve_p, jnp.float32)
  threshold = jnp.clip(jnp.floor(p * 2.0**32), 1.0, _MAX_U32_AS_F32)
  return (h < threshold.astype(jnp.uint32)) | (p >= 1.0)


def dare(
  x: jax.Array,
  reserve_p: ArrayLike,
  *,
  seed: ArrayLike,
  stream: ArrayLike,
  step: ArrayLike,
  leaf_index: ArrayLike,
) -> jax.Array:
  """DARE: keep with probability ``reserve_p``, scale survivors by ``1/p``.

  Args:
    x: a float array (math is done in float32 or wider).
    reserve_p: keep probability ``p`` in (0, 1]; may be traced.
    seed, stream, step, leaf_index: the counter that fixes the mask.

  Returns:
    ``where(mask, x / p, 0)`` in the promoted float dtype of ``x`` and float32.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  keep = dare_mask(x, reserve_p, seed=seed, stream=stream, step=step, leaf_index=leaf_index)
  return jnp.where(keep, x / jnp.asarray(reserve_p, x.dtype), 0)


def dare_mask(
  x: jax.Array,
  reserve_p: ArrayLike,
  *,
  seed: ArrayLike,
  stream: ArrayLike,
  step: ArrayLike,
  leaf_index: ArrayLike,
) -> jax.Array:
  """The keep mask `dare` applies to ``x``, laid out (sharded) like ``x``."""
  return _dare_keep(x.shape, reserve_p, seed, stream, step, leaf_index, _sharding.explicit_axes(x))


def _finite_l1(x):
  return jnp.sum(jnp.where(jnp.isfinite(x), jnp.abs(x), 0))


def l1_rescale(dense: jax.Array, sparse: jax.Array, eps: float = 1e-8) -> jax.Array:
  """Multiply ``sparse`` by ``|dense|_1 / (|sparse|_1 + eps)`` when ``|dense|_1 >= 1e-8``.

  ``eps`` is fixed at 1e-8, not the base optimizer's: the merge may follow any
  optimizer (the authors' code, AdamW only, uses Adam's eps, 1e-8 by default).
  The norms sum finite entries only, so that one NaN or infinity does not turn
  the whole leaf non-finite: that entry alone stays non-finite (SPEC 12).
  """
  dense_l1 = _finite_l1(dense)
  factor = jnp.where(dense_l1 >= 1e-8, dense_l1 / (_finite_l1(sparse) + eps), 1.0)
  return sparse * factor.astype(sparse.dtype)


def clip(x: jax.Array, bound: jax.Array | float | None) -> jax.Array:
  """Clip to ``[-bound, bound]``; ``bound=None`` leaves ``x`` as it is."""
  return x if bound is None else jnp.clip(x, -bound, bound)


def ties(x: jax.Array, reserve_p: float, topk: str = "exact", stacked_axes: int = 0) -> jax.Array:
  """TIES trim: keep the ``floor(p * n)`` largest-magnitude entries of ``x``.

  Args:
    x: a float array.
    reserve_p: density ``p`` in (0, 1]; ``floor(p * n) < 1`` keeps ``x`` dense.
    topk: ``"exact"`` (ties broken by row-major position) or ``"sampled"``.
    stacked_axes: number of leading axes that index separate tensors (a
      layer axis): each slice is trimmed on its own, ``n`` its size.

  Returns:
    ``x`` with the other entries set to zero, in the promoted float dtype of
    ``x`` and float32.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.where(ties_mask(x, reserve_p, topk, stacked_axes), x, 0)


def ties_mask(
  x: jax.Array,
  reserve_p: float,
  topk: str = "exact",
  stacked_axes: int = 0,
) -> jax.Array:
  """The keep mask `ties` applies to ``x``: True on the entries it keeps."""
  return trim.keep_mask(x, reserve_p, topk, stacked_axes)
