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

TIES ties at the threshold are broken by position: among entries whose
magnitude equals the k-th largest, the first ones in row-major order are kept,
so exactly ``k`` entries survive. ``topk="sampled"`` instead estimates the
threshold from a fixed strided sample of the leaf and keeps every entry at or
above it (a kept fraction close to, not exactly, ``p``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

# Hash streams: the update and the reference delta draw independent masks.
UPDATE_STREAM = 0
REFERENCE_STREAM = 1

_GOLDEN = 0x9E3779B9
# Largest float32 below 2**32: float32(2**32 - 1) would round up and overflow.
_MAX_U32_AS_F32 = 4294967040.0
# Size of the strided sample used by ``topk="sampled"``.
SAMPLE_SIZE = 1 << 16


def _mix32(x: jax.Array) -> jax.Array:
  """`lowbias32` finaliser (C. Wellons): a bijection on uint32, full avalanche."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def element_hash(shape, seed, stream, step, leaf_index) -> jax.Array:
  """Uniform uint32 per entry, a function of its coordinates and the key only.

  The key ``(seed, stream, step, leaf_index)`` is hashed to a scalar, then the
  coordinates are folded in one axis at a time: ``h <- mix(h + g_d(i_d))`` with
  ``g_d`` itself a hash of the coordinate. Only the last fold runs per entry;
  earlier ones run on the (small) leading axes. No flat index is formed, so
  leaves with more than 2**32 entries do not overflow.
  """
  u32 = lambda v: jnp.asarray(v).astype(jnp.uint32)
  h = _mix32(u32(seed) ^ jnp.uint32(0x6A09E667))
  h = _mix32(h + u32(stream) * jnp.uint32(_GOLDEN))
  h = _mix32(h + u32(step))
  h = _mix32(h + u32(leaf_index) * jnp.uint32(_GOLDEN))
  for axis, size in enumerate(shape):
    coord = lax.iota(jnp.uint32, size)
    salt = jnp.uint32((_GOLDEN * (axis + 2)) & 0xFFFFFFFF)
    h = _mix32(h[..., None] + _mix32(coord ^ salt))
  return h


def dare_keep_mask(shape, reserve_p, seed, stream, step, leaf_index):
  """Bernoulli(reserve_p) keep mask of ``shape`` (True = keep).

  The keep probability is ``floor(p * 2**32) / 2**32``, equal to ``p`` within
  a relative 2**-24 + 1/(p * 2**32); ``p = 1`` keeps everything exactly.
  """
  p = jnp.asarray(reserve_p, jnp.float32)
  threshold = jnp.clip(jnp.floor(p * 2.0**32), 1.0, _MAX_U32_AS_F32)
  threshold = threshold.astype(jnp.uint32)
  h = element_hash(shape, seed, stream, step, leaf_index)
  return (h < threshold) | (p >= 1.0)


def dare(x, reserve_p, *, seed, stream, step, leaf_index):
  """DARE: keep with probability ``reserve_p``, scale survivors by ``1/p``.

  Args:
    x: a float array (math is done in float32 or wider).
    reserve_p: keep probability ``p`` in (0, 1]; may be traced.
    seed, stream, step, leaf_index: the counter that fixes the mask.

  Returns:
    ``where(mask, x / p, 0)`` in the promoted float dtype of ``x`` and float32.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  keep = dare_keep_mask(x.shape, reserve_p, seed, stream, step, leaf_index)
  return jnp.where(keep, x / jnp.asarray(reserve_p, x.dtype), jnp.zeros_like(x))


def l1_rescale(dense, sparse, eps: float = 1e-8):
  """Multiply ``sparse`` by ``|dense|_1 / (|sparse|_1 + eps)`` when ``|dense|_1 >= 1e-8``."""
  dense_l1 = jnp.sum(jnp.abs(dense))
  factor = jnp.where(dense_l1 >= 1e-8, dense_l1 / (jnp.sum(jnp.abs(sparse)) + eps), 1.0)
  return sparse * factor.astype(sparse.dtype)


def clip(x, bound):
  """Clip to ``[-bound, bound]``; ``bound=None`` leaves ``x`` as it is."""
  return x if bound is None else jnp.clip(x, -bound, bound)


class TiesSelection(NamedTuple):
  """Which entries of a leaf TIES keeps, as two small arrays.

  An entry is kept when its magnitude bits exceed ``threshold``, or equal it and
  its coordinates come before ``cutoff`` in row-major order. Keeping the
  selection this small lets the mask be recomputed inside the fused update
  instead of being written out as a parameter-sized boolean array.
  """

  threshold: jax.Array  # uint32 bits of the k-th largest |x| (0 keeps all)
  cutoff: jax.Array  # uint32[ndim]: row-major coordinates of the first tie dropped


def _magnitude_bits(x):
  # For non-negative IEEE floats the bit pattern orders like the value.
  return lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)


def topk_count(size: int, reserve_p) -> jax.Array:
  """``k = floor(p * n)`` as uint32: exact for a Python ``p``, float32 if traced."""
  if isinstance(reserve_p, (int, float)):
    return jnp.uint32(math.floor(reserve_p * size))
  return jnp.floor(jnp.asarray(reserve_p, jnp.float32) * size).astype(jnp.uint32)


def _histogram(indices, length):
  return jnp.zeros((length,), jnp.uint32).at[indices.reshape(-1)].add(
      jnp.uint32(1), mode="drop"
  )


def _select_digit(hist, k):
  """Largest digit d with #(entries >= d) >= k, and #(entries above digit d)."""
  count_ge = jnp.cumsum(hist[::-1])[::-1]
  digit = jnp.sum(count_ge >= k).astype(jnp.uint32) - 1
  above = jnp.concatenate([count_ge, jnp.zeros((1,), jnp.uint32)])[digit + 1]
  return digit, above


def _coords_of(flat, shape):
  coords = []
  for size in reversed(shape[1:]):
    coords.append(flat % size)
    flat = flat // size
  coords.append(flat)
  return jnp.stack(coords[::-1]).astype(jnp.uint32)


def _row_major_before(shape, cutoff):
  """Boolean array: coordinates strictly before ``cutoff`` in row-major order."""
  before = None
  for axis in reversed(range(len(shape))):
    coord = lax.broadcasted_iota(jnp.uint32, shape, axis)
    here = coord < cutoff[axis]
    before = here if before is None else here | ((coord == cutoff[axis]) & before)
  return before


def ties_select_exact(x, k) -> TiesSelection:
  """Exact top-k by magnitude: radix select on the float bits, ties by position.

  Two histogram passes of 16 bits each find the bits ``T`` of the k-th largest
  magnitude. If the entries equal to ``T`` are more than needed, one more pass
  (only then, under ``lax.cond``) finds the row-major position of the last tie
  to keep.
  """
  shape = x.shape
  n = math.prod(shape)
  if n == 0:
    return TiesSelection(jnp.uint32(0), jnp.zeros((len(shape),), jnp.uint32))
  bits = _magnitude_bits(x)
  hi_digit, above_hi = _select_digit(_histogram(bits >> 16, 1 << 16), k)
  lo = jnp.where((bits >> 16) == hi_digit, bits & 0xFFFF, 1 << 16)
  lo_hist = _histogram(lo, 1 << 16)
  lo_digit, above_lo = _select_digit(lo_hist, k - above_hi)
  threshold = (hi_digit << 16) | lo_digit
  need = k - above_hi - above_lo
  ties = lo_hist[lo_digit]
  end = jnp.asarray([shape[0]] + [0] * (len(shape) - 1), jnp.uint32)

  def cut_ties(_):
    tied = (bits == threshold).reshape(-1).astype(jnp.uint32)
    last_kept = jnp.sum(jnp.cumsum(tied) < need).astype(jnp.uint32)
    return _coords_of(last_kept + 1, shape)

  cutoff = lax.cond(need < ties, cut_ties, lambda _: end, None)
  # k == 0: the leaf is left dense (threshold 0 keeps every entry).
  threshold = jnp.where(k >= 1, threshold, 0)
  cutoff = jnp.where(k >= 1, cutoff, end)
  return TiesSelection(threshold.astype(jnp.uint32), cutoff)


def ties_select_sampled(x, k) -> TiesSelection:
  """Approximate top-k: threshold at the matching rank of a fixed strided sample.

  The sample is every ``ceil(n / SAMPLE_SIZE)``-th entry in row-major order
  (at most ``SAMPLE_SIZE`` entries); the threshold is its ``ceil(k * s / n)``-th
  largest magnitude and every entry at or above it is kept. The kept fraction
  is ``p`` up to the sampling error of a quantile, about
  ``1 / sqrt(p * SAMPLE_SIZE)`` relative.
  """
  n = math.prod(x.shape)
  if n == 0:
    return TiesSelection(jnp.uint32(0), jnp.zeros((x.ndim,), jnp.uint32))
  stride = -(-n // SAMPLE_SIZE)
  sample = _magnitude_bits(x.reshape(-1)[::stride])
  s = sample.shape[0]
  rank = jnp.clip(jnp.ceil(k.astype(jnp.float32) * s / n), 1, s).astype(jnp.int32)
  threshold = jnp.sort(sample)[s - rank]
  threshold = jnp.where(k >= 1, threshold, 0).astype(jnp.uint32)
  end = jnp.asarray([x.shape[0]] + [0] * (x.ndim - 1), jnp.uint32)
  return TiesSelection(threshold, end)


def ties_keep_mask(x, selection: TiesSelection):
  """Boolean mask of the entries of ``x`` that ``selection`` keeps."""
  bits = _magnitude_bits(x)
  if x.ndim == 0:
    return bits >= selection.threshold
  tied = (bits == selection.threshold) & _row_major_before(x.shape, selection.cutoff)
  return (bits > selection.threshold) | tied


def ties_select(x, reserve_p, topk: str = "exact") -> TiesSelection:
  """The TIES selection of ``x`` at density ``reserve_p`` (see `ties`)."""
  k = topk_count(math.prod(x.shape), reserve_p)
  if x.ndim == 0:
    x = x.reshape(1)
  if topk == "sampled":
    return ties_select_sampled(x, k)
  return ties_select_exact(x, k)


def ties(x, reserve_p, topk: str = "exact"):
  """TIES trim: keep the ``floor(p * n)`` largest-magnitude entries of ``x``.

  Args:
    x: a float array.
    reserve_p: density ``p`` in (0, 1]; ``floor(p * n) < 1`` keeps ``x`` dense.
    topk: ``"exact"`` (ties broken by row-major position) or ``"sampled"``.

  Returns:
    ``x`` with the other entries set to zero, in the promoted float dtype of
    ``x`` and float32.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  keep = ties_keep_mask(x, ties_select(x, reserve_p, topk))
  return jnp.where(keep, x, jnp.zeros_like(x))
