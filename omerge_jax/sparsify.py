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
threshold from a fixed strided sample of the leaf (about ``SAMPLE_SIZE``
entries, see `ties_select_sampled`) and keeps every entry at or above it: a
kept fraction close to, not exactly, ``p`` (within 2% at ``p = 0.01``, one
standard deviation), at the cost of a few passes over the sample only.

Nothing here flattens a leaf or slices it at a data-dependent position, so on
a leaf sharded over a mesh the selection runs shard by shard and only the
histograms (``2**16`` counters) are all-reduced.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

# Hash streams: the update and the reference delta draw independent masks.
UPDATE_STREAM = 0
REFERENCE_STREAM = 1

_GOLDEN = 0x9E3779B9
# Largest float32 below 2**32: float32(2**32 - 1) would round up and overflow.
_MAX_U32_AS_F32 = 4294967040.0
# Size of the strided sample used by ``topk="sampled"``.
SAMPLE_SIZE = 1 << 18
# TIES counts a leaf's entries in uint32 (histograms, k, tie positions).
TIES_MAX_ENTRIES = (1 << 32) - 1


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
  return _element_hash(shape, seed, stream, step, leaf_index, None)


def _explicit_axes(x):
  """Mesh axes of each axis of ``x`` when they are in its type (Explicit mesh axes).

  ``None`` otherwise (no mesh, or Auto axes that the compiler partitions).
  Arrays built from iotas must then carry the same sharding as ``x``: under
  Explicit axes, combining a replicated array with a sharded one is an error.
  """
  sharding = jax.typeof(x).sharding
  if jax.sharding.AxisType.Explicit not in tuple(sharding.mesh.axis_types):
    return None
  return sharding.mesh, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def _axes_of(axes, dims):
  """The mesh axes of some of a leaf's axes (``None`` stays ``None``)."""
  return None if axes is None else (axes[0], tuple(axes[1][d] for d in dims))


def _iota(shape, axis, axes):
  """``broadcasted_iota`` over ``shape``, sharded like a leaf with mesh ``axes``."""
  if axes is None:
    return lax.broadcasted_iota(jnp.uint32, shape, axis)
  mesh, spec = axes
  return lax.broadcasted_iota(
      jnp.uint32, shape, axis, out_sharding=jax.sharding.NamedSharding(mesh, P(*spec))
  )


def _element_hash(shape, seed, stream, step, leaf_index, axes):
  u32 = lambda v: jnp.asarray(v, jnp.uint32)  # a Python seed may exceed int32
  h = _mix32(u32(seed) ^ jnp.uint32(0x6A09E667))
  h = _mix32(h + u32(stream) * jnp.uint32(_GOLDEN))
  h = _mix32(h + u32(step))
  h = _mix32(h + u32(leaf_index) * jnp.uint32(_GOLDEN))
  for axis, size in enumerate(shape):
    coord = _iota((size,), 0, _axes_of(axes, [axis]))
    salt = jnp.uint32((_GOLDEN * (axis + 2)) & 0xFFFFFFFF)
    h = _mix32(h[..., None] + _mix32(coord ^ salt))
  return h


def dare_keep_mask(shape, reserve_p, seed, stream, step, leaf_index):
  """Bernoulli(reserve_p) keep mask of ``shape`` (True = keep).

  The keep probability is ``floor(p * 2**32) / 2**32``, equal to ``p`` within
  a relative 2**-24 + 1/(p * 2**32); ``p = 1`` keeps everything exactly.
  """
  return _dare_keep(shape, reserve_p, seed, stream, step, leaf_index, None)


def _dare_keep(shape, reserve_p, seed, stream, step, leaf_index, axes):
  p = jnp.asarray(reserve_p, jnp.float32)
  threshold = jnp.clip(jnp.floor(p * 2.0**32), 1.0, _MAX_U32_AS_F32)
  threshold = threshold.astype(jnp.uint32)
  h = _element_hash(shape, seed, stream, step, leaf_index, axes)
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
  keep = dare_mask(x, reserve_p, seed=seed, stream=stream, step=step, leaf_index=leaf_index)
  return jnp.where(keep, x / jnp.asarray(reserve_p, x.dtype), 0)


def dare_mask(x, reserve_p, *, seed, stream, step, leaf_index):
  """The keep mask `dare` applies to ``x``, laid out (sharded) like ``x``."""
  return _dare_keep(x.shape, reserve_p, seed, stream, step, leaf_index, _explicit_axes(x))


def _finite_l1(x):
  return jnp.sum(jnp.where(jnp.isfinite(x), jnp.abs(x), 0))


def l1_rescale(dense, sparse, eps: float = 1e-8):
  """Multiply ``sparse`` by ``|dense|_1 / (|sparse|_1 + eps)`` when ``|dense|_1 >= 1e-8``.

  ``eps`` is fixed at 1e-8, not the base optimizer's: the merge may follow any
  optimizer (the authors' code, AdamW only, uses Adam's eps, 1e-8 by default).
  The norms sum finite entries only, so that one NaN or infinity does not turn
  the whole leaf non-finite: that entry alone stays non-finite (SPEC 12).
  """
  dense_l1 = _finite_l1(dense)
  factor = jnp.where(dense_l1 >= 1e-8, dense_l1 / (_finite_l1(sparse) + eps), 1.0)
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

  threshold: jax.Array  # uint32 bits of the k-th largest |x|, or just below the kept set
  cutoff: jax.Array  # uint32[ndim]: row-major coordinates of the first tie dropped


# Bits of float32 infinity: every magnitude at or above it is non-finite.
_INF_BITS = 0x7F800000


def _magnitude_bits(x):
  """Magnitude bits of ``x``, which order like ``|x|``; non-finite entries rank as 0.

  For non-negative IEEE floats the bit pattern orders like the value. A NaN or
  an infinity must not take a top-k slot from a finite entry (SPEC 12): it is
  ranked as a zero, and the transform puts it back into the update afterwards.
  """
  bits = lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.uint32)
  return jnp.where(bits < _INF_BITS, bits, jnp.uint32(0))


def topk_count(size: int, reserve_p) -> jax.Array:
  """``k = floor(p * n)`` as uint32: exact for a Python ``p``, float32 if traced."""
  if isinstance(reserve_p, (int, float)):
    return jnp.uint32(math.floor(reserve_p * size))
  return jnp.floor(jnp.asarray(reserve_p, jnp.float32) * size).astype(jnp.uint32)


def _histogram(indices, length):
  # Indices keep their shape: flattening a leaf sharded over several axes
  # would gather it, while a scatter of sharded indices only all-reduces the
  # (small) histogram.
  axes = _explicit_axes(indices)
  out_sharding = None if axes is None else jax.sharding.NamedSharding(axes[0], P())
  return jnp.zeros((length,), jnp.uint32).at[indices].add(
      jnp.uint32(1), mode="drop", out_sharding=out_sharding
  )


def _suffix_counts(counts):
  """``out[i] = sum(counts[i:])``, for short vectors only (XLA's scan is slow)."""
  return jnp.cumsum(counts[::-1])[::-1]


def _select_digit(hist, k):
  """Largest digit d with #(entries >= d) >= k, and #(entries above digit d).

  Two levels (blocks of 256 digits, then digits) so that no prefix sum runs
  over the whole histogram: a long ``cumsum`` costs far more than the sums.
  """
  block = 256 if hist.shape[0] % 256 == 0 else 1
  blocks = hist.reshape(-1, block)
  above_block = jnp.concatenate(
      [_suffix_counts(jnp.sum(blocks, axis=1)), jnp.zeros((1,), jnp.uint32)]
  )
  b = jnp.sum(above_block[:-1] >= k).astype(jnp.uint32) - 1
  row = lax.dynamic_index_in_dim(blocks, b, keepdims=False)
  in_block = _suffix_counts(row) + above_block[b + 1]
  offset = jnp.sum(in_block >= k).astype(jnp.uint32) - 1
  digit = b * block + offset
  above = jnp.concatenate([in_block, above_block[b + 1][None]])[offset + 1]
  return digit, above


def _coords_of(flat, shape):
  coords = []
  for size in reversed(shape[1:]):
    coords.append(flat % size)
    flat = flat // size
  coords.append(flat)
  return jnp.stack(coords[::-1]).astype(jnp.uint32)


def _row_major_before(shape, cutoff, axes):
  """Boolean array: coordinates strictly before ``cutoff`` in row-major order."""
  before = None
  for axis in reversed(range(len(shape))):
    coord = _iota(shape, axis, axes)
    here = coord < cutoff[axis]
    before = here if before is None else here | ((coord == cutoff[axis]) & before)
  return before


def _sample_strides(shape, size):
  """Per-axis strides of the fixed sample: about ``n / size`` in all, leading axes first."""
  strides, remaining = [], -(-math.prod(shape) // size)
  for dim in shape:
    stride = max(1, min(dim, remaining))
    strides.append(stride)
    remaining = -(-remaining // stride)
  return strides


def _strided_sample(bits, size):
  """The fixed sample of a leaf: a strided slice, at most about ``size`` entries.

  A slice along each axis (every row of a matrix, every column of those rows
  when that is few enough) rather than a stride through the flattened leaf:
  on a sharded leaf each shard slices its own part.
  """
  strides = _sample_strides(bits.shape, size)
  return lax.slice(bits, (0,) * bits.ndim, bits.shape, strides)


def _from_sample(fn, x, k, size):
  """``fn(sample of |x|'s bits, k)``, a tuple of scalars, computed where ``x`` lives.

  Under Explicit mesh axes a strided slice need not split evenly over the
  shards, which sharding in types rejects: the sample is then taken with the
  axes switched to Auto (the compiler keeps it distributed, as it does for
  Auto meshes) and only the scalar results are replicated.
  """
  take = lambda v, k: fn(_strided_sample(_magnitude_bits(v), size), k)
  axes = _explicit_axes(x)
  if axes is None:
    return take(x, k)
  replicated = jax.sharding.NamedSharding(axes[0], P())
  out = jax.eval_shape(take, x, k)
  return jax.sharding.auto_axes(take, out_sharding=jax.tree.map(lambda _: replicated, out))(x, k)


def _kth_largest(bits, k):
  """Bits of the k-th largest entry of a uint32 array (1 <= k <= size).

  Two 16-bit radix passes with scatter-add histograms.
  """
  hi_digit, above_hi = _select_digit(_histogram(bits >> 16, 1 << 16), k)
  lo = jnp.where((bits >> 16) == hi_digit, bits & 0xFFFF, 1 << 16)
  lo_hist = _histogram(lo, 1 << 16)
  lo_digit, above_lo = _select_digit(lo_hist, k - above_hi)
  threshold = (hi_digit << 16) | lo_digit
  return threshold, above_hi + above_lo, lo_hist[lo_digit]


def _cut_ties(x, threshold, need):
  """Row-major coordinates of the first entry equal to ``threshold`` not kept.

  Counts ties per row (a reduction over the last axis), finds the row of the
  ``need``-th tie with a prefix sum over rows, then the column with a prefix
  sum over that row, picked out by a masked sum rather than a dynamic slice
  so that a sharded leaf is not gathered.
  """
  shape = x.shape
  if x.ndim < 2:
    x = x[None]
  axes = _explicit_axes(x)
  tied = _magnitude_bits(x) == threshold
  lead = tied.shape[:-1]
  per_row = jnp.sum(tied, axis=-1, dtype=jnp.uint32)
  if axes is not None:
    # Small (one count per row): replicate it before flattening.
    per_row = jax.sharding.reshard(per_row, jax.sharding.NamedSharding(axes[0], P()))
  per_row = per_row.reshape(-1)
  before_row = jnp.cumsum(per_row) - per_row
  row = jnp.sum(before_row + per_row < need).astype(jnp.uint32)
  row_index = sum(
      _iota(lead, axis, _axes_of(axes, range(len(lead)))) * math.prod(lead[axis + 1:])
      for axis in range(len(lead))
  )
  in_row = jnp.sum(
      tied & (row_index == row)[..., None], axis=tuple(range(len(lead))), dtype=jnp.uint32
  )
  if axes is not None:
    in_row = jax.sharding.reshard(in_row, jax.sharding.NamedSharding(axes[0], P()))
  col = jnp.sum(before_row[row] + jnp.cumsum(in_row) < need).astype(jnp.uint32)
  return _coords_of(row * shape[-1] + col + 1, shape)


def _with_ties_cut(x, threshold, need, ties, dense) -> TiesSelection:
  """The selection keeping entries above ``threshold`` and ``need`` of its ``ties``."""
  shape = x.shape
  end = jnp.asarray([shape[0]] + [0] * (len(shape) - 1), jnp.uint32)
  start = jnp.zeros((len(shape),), jnp.uint32)
  cutoff = lax.cond(
      need < ties,
      lambda _: _cut_ties(x, threshold, need),
      lambda _: jnp.where(need == 0, start, end),
      None,
  )
  # k == 0: the leaf is left dense (threshold 0 keeps every entry).
  threshold = jnp.where(dense, 0, threshold).astype(jnp.uint32)
  return TiesSelection(threshold, jnp.where(dense, end, cutoff))


# Histogram bins of the bracketed pass of `ties_select_exact` (plus one for
# the entries above the bracket).
_BRACKET_BINS = 1 << 16
# Size of the sample that places the bracket (a smaller one than
# ``SAMPLE_SIZE`` suffices: a wider bracket costs nothing more).
_BRACKET_SAMPLE = 1 << 16
# Half-width of the bracket around the sample's estimate, in standard
# deviations of the sample rank; a miss only costs the slower path.
_BRACKET_SIGMAS = 5.0


def ties_select_exact(x, k) -> TiesSelection:
  """Exact top-k by magnitude: radix select on the float bits, ties by position.

  A fixed strided sample (as in `ties_select_sampled`, ``_BRACKET_SAMPLE``
  entries) brackets the k-th largest magnitude between two 16-bit digits; one scatter-add pass over the leaf
  then counts the entries above the bracket and histograms those inside it.
  Only if the k-th entry shares its histogram bin with entries that are not
  kept does a second pass (under ``lax.cond``) histogram that bin exactly; if
  the bracket misses, a plain two-pass radix select runs instead. Either way
  the result is exact. Leaves of up to ``4 * _BRACKET_SAMPLE`` entries skip
  the bracket and run the two-pass radix select directly. If the entries
  equal to the k-th magnitude are more than needed, one more pass (only
  then) finds the row-major position of the last tie to keep.
  """
  shape = x.shape
  n = math.prod(shape)
  if n == 0:
    return TiesSelection(jnp.uint32(0), jnp.zeros((len(shape),), jnp.uint32))
  bits = _magnitude_bits(x)
  dense = k < 1
  k = jnp.clip(k, jnp.uint32(1), jnp.uint32(n))  # n may exceed int32

  if n <= 4 * _BRACKET_SAMPLE:
    # Too small for a bracket to pay: a plain two-pass radix select.
    threshold, above, ties = _kth_largest(bits, k)
    return _with_ties_cut(x, threshold, k - above, ties, dense)

  # Bracket [lo, hi) of 16-bit digits from the sample's order statistics.
  def bracket(sample, k):
    s = sample.size
    rank = k.astype(jnp.float32) * (s / n)
    margin = _BRACKET_SIGMAS * jnp.sqrt(rank) + 2.0
    sample_hist = _histogram(sample >> 16, 1 << 16)
    hi_rank = jnp.floor(rank - margin)
    lo_rank = jnp.ceil(rank + margin)
    hi_digit, _ = _select_digit(sample_hist, jnp.maximum(hi_rank, 1).astype(jnp.uint32))
    lo_digit, _ = _select_digit(sample_hist, jnp.minimum(lo_rank, s).astype(jnp.uint32))
    lo = jnp.where(lo_rank > s, jnp.uint32(0), lo_digit << 16)
    # 2**31 is above every magnitude's bits: used when no sample rank is safe.
    hi = jnp.where(hi_rank < 1, jnp.uint32(1 << 31), (hi_digit + 1) << 16)
    return lo, hi

  lo, hi = _from_sample(bracket, x, k, _BRACKET_SAMPLE)
  width_bits = 32 - lax.clz(hi - lo - 1)
  shift = jnp.maximum(width_bits, 16) - 16
  binned = jnp.where(
      bits >= hi, _BRACKET_BINS, jnp.where(bits >= lo, (bits - lo) >> shift, _BRACKET_BINS + 1)
  )
  hist = _histogram(binned, _BRACKET_BINS + 1)
  above_bracket = hist[_BRACKET_BINS]
  in_bracket = jnp.sum(hist[:_BRACKET_BINS])
  hit = (above_bracket < k) & (above_bracket + in_bracket >= k)

  def bracketed(_):
    digit, above = _select_digit(hist[:_BRACKET_BINS], k - above_bracket)
    above = above + above_bracket
    edge = lo + (digit << shift)

    def keep_whole_bin(_):
      # Every entry >= edge and none below: threshold edge - 1, no tie kept.
      return edge - 1, jnp.uint32(0), jnp.uint32(0)

    def unit_bin(_):
      return edge, k - above, hist[digit]

    def split_bin(_):
      # Bits are recomputed from x in each branch: a branch operand is
      # materialised, and x already is.
      bits = _magnitude_bits(x)
      inside = jnp.where((bits >= edge) & ((bits - edge) >> shift == 0), bits - edge, 1 << 16)
      bin_hist = _histogram(inside, 1 << 16)
      low, above_low = _select_digit(bin_hist, k - above)
      return edge + low, k - above - above_low, bin_hist[low]

    whole_bin = (above + hist[digit] == k) & (edge > 0)
    branch = jnp.where(whole_bin, 0, jnp.where(shift == 0, 1, 2))
    return lax.switch(branch, (keep_whole_bin, unit_bin, split_bin), None)

  def fallback(_):
    threshold, above, ties = _kth_largest(_magnitude_bits(x), k)
    return threshold, k - above, ties

  threshold, need, ties = lax.cond(hit, bracketed, fallback, None)
  return _with_ties_cut(x, threshold, need, ties, dense)


def ties_select_sampled(x, k) -> TiesSelection:
  """Approximate top-k: threshold at the matching rank of a fixed strided sample.

  The sample is a strided slice of the leaf with about ``SAMPLE_SIZE``
  entries (all of it when smaller): strides are taken from the leading axes
  first, so a ``(4096, 1024)`` matrix is sampled as every 16th row, whole.
  The threshold is the sample's ``ceil(k * s / n)``-th largest magnitude
  (two radix passes over the ``s`` sampled entries, none over the leaf) and
  every entry at or above it is kept. The kept fraction is ``p`` up to the
  sampling error of a quantile, about ``1 / sqrt(p * s)`` relative (one
  standard deviation): 2% at ``p = 0.01`` on leaves of ``SAMPLE_SIZE``
  entries or more. Entries tied at the threshold are all kept, so a leaf of
  few distinct magnitudes may keep many more than ``k``.
  """
  n = math.prod(x.shape)
  if n == 0:
    return TiesSelection(jnp.uint32(0), jnp.zeros((x.ndim,), jnp.uint32))
  def quantile(sample, k):
    s = sample.size
    rank = jnp.clip(jnp.ceil(k.astype(jnp.float32) * (s / n)), 1, s).astype(jnp.uint32)
    return _kth_largest(sample, rank)[:1]

  (threshold,) = _from_sample(quantile, x, k, SAMPLE_SIZE)
  threshold = jnp.where(k >= 1, threshold, 0).astype(jnp.uint32)
  end = jnp.asarray([x.shape[0]] + [0] * (x.ndim - 1), jnp.uint32)
  return TiesSelection(threshold, end)


def ties_keep_mask(x, selection: TiesSelection):
  """Boolean mask of the entries of ``x`` that ``selection`` keeps."""
  bits = _magnitude_bits(x)
  if x.ndim == 0:
    return bits >= selection.threshold
  tied = (bits == selection.threshold) & _row_major_before(
      x.shape, selection.cutoff, _explicit_axes(x)
  )
  return (bits > selection.threshold) | tied


def ties_select(x, reserve_p, topk: str = "exact") -> TiesSelection:
  """The TIES selection of ``x`` at density ``reserve_p`` (see `ties`)."""
  if math.prod(x.shape) > TIES_MAX_ENTRIES:
    raise ValueError(f"TIES needs a leaf of fewer than 2**32 entries, got shape {x.shape}")
  if jnp.dtype(x.dtype).itemsize > 4:
    raise TypeError(f"TIES ranks float32 bits: cast the {x.dtype} leaf to float32 first")
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
  return jnp.where(ties_mask(x, reserve_p, topk), x, 0)


def ties_mask(x, reserve_p, topk: str = "exact"):
  """The keep mask `ties` applies to ``x``: True on the entries it keeps."""
  return ties_keep_mask(x, ties_select(x, reserve_p, topk))
