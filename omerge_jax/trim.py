"""TIES trim: which entries of a leaf are its ``k = floor(p * n)`` largest magnitudes.

`ties_select` reduces a leaf to a small `TiesSelection` (a threshold on the
magnitude bits and a row-major tie cutoff); `ties_keep_mask` turns it back
into a mask inside the fused update, so no parameter-sized mask is written.

* ``topk="exact"`` (`ties_select_exact`): the k-th largest magnitude's bits
  from histograms of the leaf (a sample brackets them, so one pass usually
  settles them), ties at the threshold broken by row-major position,
  exactly ``k`` kept.
* ``topk="sampled"`` (`ties_select_sampled`): the threshold at the matching
  rank of a fixed sample of about ``SAMPLE_SIZE`` entries spread over every
  axis; a kept fraction of ``p`` within sampling error, for a few passes over
  the sample only.

The samples of many tensors are ranked together (``_rank_samples``).
Where the same work can be done two ways, the platform or the process's
device count chooses; ``benchmarks/trim_branches.py`` measures what each
choice buys. Non-finite entries rank as zeros (SPEC 12). Nothing here flattens a leaf or
slices it at a data-dependent position, so on a leaf sharded over a mesh the
selection runs shard by shard and only the histograms (at most ``2**16``
counters) and the sample are all-reduced. (In a one-device CPU process, where
nothing is sharded, the leaf-sized histograms walk the leaf in slices:
``_leaf_histogram``.)
"""

from __future__ import annotations

import math
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from omerge_jax import _sharding

# Size of the sample used by ``topk="sampled"``: the kept fraction is p within
# a relative sqrt((1 - p) / (p * SAMPLE_SIZE)), 3.9% at p = 0.01. 2**18 would
# halve that, but a leaf's sample costs about the same whatever the leaf's
# size (a scattered read of both of Adam's moments, then the radix passes):
# at 2**18 it made OnTIES 1.8x AdamW's step on 4 leaves and about 6x on
# 64 smaller ones (benchmarks/RESULTS.md).
SAMPLE_SIZE = 1 << 16
# TIES counts a leaf's entries in uint32 (histograms, k, tie positions).
TIES_MAX_ENTRIES = (1 << 32) - 1


class TiesSelection(NamedTuple):
  """Which entries of a leaf TIES keeps, as two small arrays.

  An entry is kept when its magnitude bits exceed ``threshold``, or equal it and
  its row-major (flat) position is below ``cutoff``. Keeping the
  selection this small lets the mask be recomputed inside the fused update
  instead of being written out as a parameter-sized boolean array.
  """

  threshold: jax.Array  # uint32 bits of the k-th largest |x|, or just below the kept set
  cutoff: jax.Array  # uint32: row-major position of the first tie dropped


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


def topk_count(size, reserve_p: float) -> jax.Array:
  """``k = floor(p * n)`` as uint32, the floor of the float64 product (``size``: an int or a NumPy vector).

  That is Python's ``int(p * n)``, as the authors' code computes it (0.3 of
  1000 entries is 300; 0.29 of 100 is 28, since ``0.29 * 100`` is
  28.999999999999996). ``p`` is fixed when the program is built: a traced
  float32 product would round differently (``1.0 * (2**24 + 1)`` to
  ``2**24``), so a traced ``p`` is refused.
  """
  if isinstance(reserve_p, jax.core.Tracer):
    raise TypeError(
      "TIES's k = floor(reserve_p * n) is fixed when the program is built: reserve_p must "
      "be a number, not a traced value (under optax.inject_hyperparams list it in static_args)"
    )
  return jnp.asarray(np.floor(float(reserve_p) * np.asarray(size, np.float64)).astype(np.uint32))


def _histogram(indices, length):
  # Indices keep their shape: flattening a leaf sharded over several axes
  # would gather it, while a scatter of sharded indices only all-reduces the
  # (small) histogram.
  axes = _sharding.explicit_axes(indices)
  out_sharding = None if axes is None else jax.sharding.NamedSharding(axes[0], P())
  return (
    jnp.zeros((length,), jnp.uint32)
    .at[indices]
    .add(jnp.uint32(1), mode="drop", out_sharding=out_sharding)
  )


# Digits per block of `_select_digit`.
_BLOCK = 256
# Entries per scatter of `_leaf_histogram` on one CPU (at least: whole slices
# of the leading axis). A slice's indices and ones (128 KiB) and a 2**16-bin
# histogram (256 KiB) stay in a core's L2 cache: a pass over a 256 x 1024
# leaf took 1.1 ns an entry against 1.9 ns in slices of 2**16 entries.
_CHUNK = 1 << 14


def _leaf_histogram(x, to_bins, length):
  """``_histogram(to_bins(x), length)`` of a whole leaf, a chunk at a time on one CPU.

  XLA:CPU writes a scatter's index array and its array of ones to memory
  before it runs, in buffers allocated afresh (and page-faulted) at every
  execution: for a leaf-sized scatter that costs more than the scatter
  (benchmarks/RESULTS.md: the exact selection on 4 leaves of 4M entries
  went from 94 to 35 ms in slices). On CPU the leaf's
  leading axis is therefore walked in slices of about ``_CHUNK`` entries,
  whose temporaries stay small. The slices are taken from ``x`` itself: a
  reshape of ``x`` into blocks would be a second copy of it for XLA. Only
  in a process with one device, where no leaf can be sharded: the
  partitioner would gather a sharded leaf to slice it at a loop index.
  Other platforms and multi-device processes take one scatter.
  """
  whole = lambda x: _histogram(to_bins(x), length)
  if jax.device_count() > 1 or x.size <= 2 * _CHUNK:
    return whole(x)

  def chunked(x):
    per_block = max(1, _CHUNK // math.prod(x.shape[1:]))
    blocks = x.shape[0] // per_block

    def body(i, hist):
      # uint32: the start of the last block can exceed int32 on a 1-D leaf.
      block = lax.dynamic_slice_in_dim(x, i.astype(jnp.uint32) * per_block, per_block)
      return hist.at[to_bins(block)].add(jnp.uint32(1), mode="drop")

    return lax.fori_loop(0, blocks, body, whole(x[blocks * per_block :]))

  return lax.platform_dependent(x, cpu=chunked, default=whole)


def _suffix_counts(counts):
  """``out[i] = sum(counts[i:])``, for short vectors only (XLA's scan is slow)."""
  return jnp.cumsum(counts[::-1])[::-1]


def _around(counts, k):
  """#(counts >= k) (int32), the largest count below ``k`` (0 if none), the smallest at or above it.

  One reduction with three results (``lax.reduce`` of a tuple), where three
  reductions would be three ops.
  """
  dtype = counts.dtype
  none = jnp.asarray(jnp.iinfo(dtype).max, dtype)
  reached = counts >= k
  return lax.reduce(
    (reached.astype(jnp.int32), jnp.where(reached, 0, counts), jnp.where(reached, counts, none)),
    (jnp.int32(0), jnp.asarray(0, dtype), none),
    lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1]), jnp.minimum(a[2], b[2])),
    (0,),
  )


def _select_digit(hist, k):
  """Largest digit d with #(entries >= d) >= k (uint32; 2**32 - 1 if none), #(entries above d), #(at d).

  Two levels (blocks of ``_BLOCK`` digits, then the digits of one block) so
  that no prefix sum runs over the whole histogram: a long ``cumsum`` costs
  far more than the sums. Suffix counts do not increase, so the digit and
  both counts come from reductions over them (`_around`) rather than
  positions sliced out: in the TPU compiler's plan every small op of a
  leaf's selection costs some 2,000 estimated cycles, whatever its size.
  """
  block = _BLOCK if hist.shape[0] % _BLOCK == 0 else 1
  blocks = hist.reshape(-1, block)
  with_k, later, _ = _around(_suffix_counts(jnp.sum(blocks, axis=1, dtype=hist.dtype)), k)
  # `later`: the entries in the blocks after the last with k or more at or after it.
  row = lax.dynamic_index_in_dim(blocks, jnp.maximum(with_k - 1, 0), keepdims=False)
  in_row, above, at = _around(_suffix_counts(row) + later, k)
  above = jnp.maximum(above, later)
  digit = jnp.where(with_k > 0, (with_k - 1) * block + in_row - 1, -1).astype(jnp.uint32)
  return digit, above, at - above


def _row_major_before(shape, cutoff, axes) -> jax.Array:
  """Boolean array: row-major positions below ``cutoff``."""
  # Flat positions fit uint32: a leaf has fewer than 2**32 entries (TIES_MAX_ENTRIES).
  position = jnp.uint32(0)
  for axis in range(len(shape)):
    position = position + _sharding.iota(shape, axis, axes) * jnp.uint32(
      math.prod(shape[axis + 1 :])
    )
  return position < cutoff


def _when(pred, fn, otherwise, slices=()):
  """``fn()`` where ``pred`` holds, else ``otherwise``; ``fn`` runs only if some slice needs it.

  ``slices`` names the ``vmap`` axes of a stacked leaf's slices (`keep_mask`).
  Under ``vmap`` a ``lax.cond`` on a per-slice predicate becomes a select that
  runs ``fn`` for every slice, needed or not (a pass over the leaf, for the
  rare branches here); with the predicate reduced over the slices it stays a
  branch, run for all of them when one needs it, and each slice keeps its own
  result.
  """
  if not slices:
    return lax.cond(pred, lambda _: fn(), lambda _: otherwise, None)
  some = lax.psum(pred.astype(jnp.uint32), slices) > 0
  out = lax.cond(some, lambda _: fn(), lambda _: otherwise, None)
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), out, otherwise)


# 2**32 / golden ratio: ``m * _WEYL mod 2**32`` spreads evenly over [0, 2**32)
# for every run of consecutive m, with no period a leaf's structure could share.
_WEYL = 0x9E3779B9


def _sample_positions(n, size, m):
  """Row-major positions in a leaf of ``n`` entries of the fixed sample's entries ``m``.

  ``n`` may be a NumPy vector, one leaf size per entry of ``m``.

  The ``size`` entries are one in each of ``size`` equal runs that tile the
  flat leaf, so the sample covers every axis (every layer of a stacked leaf,
  every row, and so every shard) in proportion to its size, and the position
  inside each run moves along a Weyl sequence, so that columns, or any period
  along the last axis, are not aliased either. Positions increase with ``m``.
  """
  q, r = np.divmod(n, size)
  q, fraction = jnp.asarray(q, jnp.uint32), jnp.asarray(r / size, jnp.float32)

  def run_start(m):
    # floor(m * n / size) without 64-bit products: m * r / size is below size.
    return m * q + jnp.floor(m.astype(jnp.float32) * fraction).astype(jnp.uint32)

  start = run_start(m)
  length = run_start(m + 1) - start  # q or q + 1, at least 1
  phase = (m * jnp.uint32(_WEYL)).astype(jnp.float32) * 2.0**-32
  return start + jnp.minimum((phase * length.astype(jnp.float32)).astype(jnp.uint32), length - 1)


def _sample(x, size):
  """The fixed sample of a leaf (`_sample_positions`), ``size`` entries (the whole leaf when smaller)."""
  n = math.prod(x.shape)
  if n <= size:
    return x
  flat = _sample_positions(n, size, lax.iota(jnp.uint32, size))
  coords = []
  for axis_size in reversed(x.shape[1:]):
    coords.append(flat % axis_size)
    flat = flat // axis_size
  return x[(flat, *coords[::-1])]


def take_sample(x: jax.Array, size: int | None = None) -> jax.Array:
  """The fixed sample of ``x`` that ``topk="sampled"`` reads, replicated.

  The same coordinates for every array of ``x``'s shape: Adam's new moments
  sampled here give, through Adam's last formula, the sample of Adam's
  update without that update being written out (`omerge_jax.onties` does this).
  Under Explicit mesh axes the gather runs with the axes switched to Auto, so
  each shard gathers the entries it holds and only the sample is all-reduced.
  """
  size = SAMPLE_SIZE if size is None else size
  axes = _sharding.explicit_axes(x)
  if axes is None:
    return _sample(x, size)
  replicated = jax.sharding.NamedSharding(axes[0], P())
  # auto_axes's result is typed as a callable or an array: it is the sample here.
  return cast(
    jax.Array, jax.sharding.auto_axes(lambda v: _sample(v, size), out_sharding=replicated)(x)
  )


# Radix digits of `_radix_statistic`, most significant first: a magnitude's
# bit 31 is 0, so 31 bits suffice, and a sample (at most 2**16 entries) takes
# three short passes: clearing and scanning 2**16-bin histograms would cost
# more than its entries.
_DIGITS = (11, 10, 10)


def _rows_histogram(x, prefix, to_bins, length):
  """``_leaf_histogram`` of each row of ``x`` with ``to_bins(row, prefix)``, its ``prefix``.

  One row at a time in a one-device process (a scatter's temporaries stay in
  cache, as in `_leaf_histogram`: 64 rows of 2**16 entries took 8 ms this
  way, 20 ms as one scatter keyed by row and 29 ms batched), batched
  elsewhere, where a mesh shards the rows (a stacked leaf's slices) and
  their scatters with them.
  """
  one = lambda row_prefix: _leaf_histogram(
    row_prefix[0], lambda row: to_bins(row, row_prefix[1]), length
  )
  if jax.device_count() > 1:
    return jax.vmap(one)((x, prefix))
  if x.shape[0] == 1:
    # One row (an unstacked leaf's sample): no one-trip loop around it.
    return one((x[0], prefix[0]))[None]
  return lax.map(one, (x, prefix))


def _radix_statistic(k, bits):
  """The k-th largest of each row of ``bits`` (uint32), how many exceed it, how many equal it.

  A radix select (CPU): a scatter-add histogram per digit (`_rows_histogram`)
  of the entries whose higher digits match the prefix found so far; the last
  histogram gives the ties.
  """
  prefix = above = ties = jnp.zeros(bits.shape[:1], jnp.uint32)
  shift = sum(_DIGITS)
  for i, width in enumerate(_DIGITS):
    shift -= width

    def to_bins(row, prefix, shift=shift, width=width, i=i):
      digits = (row >> shift) & ((1 << width) - 1)
      if not i:
        return digits
      return jnp.where(row >> (shift + width) == prefix, digits, 1 << width)

    hist = _rows_histogram(bits, prefix, to_bins, 1 << width)
    # The last digit's count is the ties (earlier ones are dead code to XLA).
    digit, above_digit, ties = jax.vmap(_select_digit)(hist, k - above)
    above = above + above_digit
    prefix = (prefix << width) | digit
  return prefix, above, ties


def _sorted_statistic(k, bits):
  """`_radix_statistic` by one sort of all the rows (GPU and TPU)."""
  # Unstable: equal keys are equal words (a stable sort carries an index along).
  ordered = lax.sort(bits, dimension=1, is_stable=False)
  value = jnp.take_along_axis(ordered, (bits.shape[1] - k)[:, None], axis=1)
  count = lambda where: jnp.sum(where, axis=1, dtype=jnp.uint32)
  return value[:, 0], count(bits > value), count(bits == value)


def _rank_samples(samples, rank_rows):
  """``rank_rows(statistic, bits, rows)`` of every row of ``samples``, split back per array.

  ``samples`` are arrays of shape ``(m, s)`` (the samples, `take_sample`, of
  ``m`` tensors each); ``rank_rows`` gets ``statistic``
  (`_radix_statistic` or `_sorted_statistic`), the magnitude bits of some
  rows and the ``slice`` of all rows they are, and returns arrays with one
  entry per row. On GPU and TPU the samples are stacked and ranked
  together: one sort and one set of counts for all of them, where a step
  made one per leaf (in the TPU compiler's plan the radix select of a
  2**16-entry sample is about a hundred small ops, 9x the sort's estimated
  cycles; on GPU each would be a kernel launch). On CPU
  each array is ranked alone by a radix select, whose last histogram gives
  the counts (XLA:CPU's integer reductions run near 1.5 ns an entry, its
  small scatters near 0.5), and which stays in cache through its passes:
  stacked, the samples of 64 leaves made the step 25 % slower.
  """
  ends = np.cumsum([a.shape[0] for a in samples])
  rows = [slice(int(end) - a.shape[0], int(end)) for a, end in zip(samples, ends, strict=True)]

  def together(*samples):
    # float32, so that a bf16 and an f32 sample stack.
    bits = _magnitude_bits(jnp.concatenate([a.astype(jnp.float32) for a in samples]))
    return rank_rows(_sorted_statistic, bits, slice(None))

  def one_by_one(*samples):
    parts = [
      rank_rows(_radix_statistic, _magnitude_bits(a), r) for a, r in zip(samples, rows, strict=True)
    ]
    return tuple(jnp.concatenate(part) for part in zip(*parts, strict=True))

  ranked = lax.platform_dependent(*samples, cpu=one_by_one, default=together)
  return [tuple(a[r] for a in ranked) for r in rows]


def _cut_ties(x, threshold, need):
  """Row-major position of the first entry equal to ``threshold`` not kept.

  Counts ties per row (a reduction over the last axis), finds the row of the
  ``need``-th tie with a prefix sum over rows, then the column with a prefix
  sum over that row, picked out by a masked sum rather than a dynamic slice
  so that a sharded leaf is not gathered.
  """
  shape = x.shape
  if x.ndim < 2:
    x = x[None]
  axes = _sharding.explicit_axes(x)
  tied = jnp.equal(_magnitude_bits(x), threshold)
  lead = tied.shape[:-1]
  per_row = jnp.sum(tied, axis=-1, dtype=jnp.uint32)
  if axes is not None:
    # Small (one count per row): replicate it before flattening.
    per_row = jax.sharding.reshard(per_row, jax.sharding.NamedSharding(axes[0], P()))
  per_row = per_row.reshape(-1)
  before_row = jnp.cumsum(per_row) - per_row
  row = jnp.sum(before_row + per_row < need).astype(jnp.uint32)
  row_index = sum(
    _sharding.iota(lead, axis, _sharding.axes_of(axes, range(len(lead))))
    * math.prod(lead[axis + 1 :])
    for axis in range(len(lead))
  )
  in_row = jnp.sum(
    tied & jnp.equal(row_index, row)[..., None], axis=tuple(range(len(lead))), dtype=jnp.uint32
  )
  if axes is not None:
    in_row = jax.sharding.reshard(in_row, jax.sharding.NamedSharding(axes[0], P()))
  col = jnp.sum(before_row[row] + jnp.cumsum(in_row) < need).astype(jnp.uint32)
  return row * shape[-1] + col + 1


# Bins of the bracketed pass of `ties_select_exact` inside the bracket; the
# next one counts the entries above it. The histogram is twice as long, so
# that `_select_digit` reads a power of two of whole blocks (2**16 bins and
# one more made 257 blocks: the TPU compiler padded and sliced them, two more
# small ops per leaf).
_BRACKET_BINS = 1 << 15
_BRACKET_LENGTH = 2 * _BRACKET_BINS
# Size of the sample that places the bracket. A smaller sample widens the
# bracket, which costs nothing more (the bins narrow instead), and the
# sample's gather and order statistics cost less: at 2**14 rather than 2**16
# the exact step on 64 leaves of 256x1024 took 108 ms instead of 126 ms on
# CPU, 93 instead of 99 ms on 4 leaves of 4096x1024 (interleaved in one run).
_BRACKET_SAMPLE = 1 << 14
# Half-width of the bracket around the sample's estimate, in standard
# deviations of the sample rank; a miss only costs the slower path.
_BRACKET_SIGMAS = 5.0


def _brackets(samples, n, k):
  """The bracket ``(lo, hi)`` of the k-th largest magnitude bits of each row's tensor, from its sample.

  ``samples`` are arrays of shape ``(m, _BRACKET_SAMPLE)`` (`take_sample`
  of ``m`` tensors each, all of more than ``4 * _BRACKET_SAMPLE`` entries),
  ``n`` the tensors' sizes (a NumPy vector, one per row), ``k`` their ranks
  (uint32, at least 1). The k-th largest lies in ``[lo, hi)`` unless the
  sample misses it by more than ``_BRACKET_SIGMAS`` standard deviations of
  its rank, which only costs `ties_select_exact` its slower path.
  """

  def rank_rows(statistic, bits, rows):
    s = bits.shape[1]
    rank = k[rows].astype(jnp.float32) * jnp.asarray(s / n[rows], jnp.float32)
    margin = _BRACKET_SIGMAS * jnp.sqrt(rank) + 2.0
    hi_rank = jnp.floor(rank - margin)
    lo_rank = jnp.ceil(rank + margin)
    # Top 16 bits of the two order statistics (one sort on GPU and TPU: XLA merges the two).
    hi_digit, lo_digit = (
      statistic(r.astype(jnp.uint32), bits)[0] >> 16
      for r in (jnp.maximum(hi_rank, 1), jnp.minimum(lo_rank, s))
    )
    lo = jnp.where(lo_rank > s, jnp.uint32(0), lo_digit << 16)
    # 2**31 is above every magnitude's bits: used when no sample rank is safe.
    hi = jnp.where(hi_rank < 1, jnp.uint32(1 << 31), (hi_digit + 1) << 16)
    return lo, hi

  return _rank_samples(samples, rank_rows)


def ties_select_exact(x: jax.Array, k: jax.Array, slices=(), bracket=None) -> TiesSelection:
  """Exact top-k by magnitude: a bracketed histogram of the float bits, ties by position.

  The k-th largest magnitude's bits lie in a bracket ``[lo, hi)``: from a
  fixed sample of the leaf (``_BRACKET_SAMPLE`` entries, ``_brackets``), or
  ``bracket`` where it was made with other leaves' (`ties_select_many`).
  One scatter-add pass over the leaf (``_leaf_histogram``: in slices on CPU)
  counts the entries above the bracket and histograms those inside it in
  ``2**15`` bins. Only if the k-th entry shares its bin with entries that
  are not kept does a second pass (under ``lax.cond``) histogram that bin
  exactly. If the bracket misses, both passes run over the whole range of
  magnitudes, ``[0, 2**31)``, where a leaf too small for a sample starts.
  Either way the result is exact. If the entries equal to the k-th
  magnitude are more than needed, one more pass (only then) finds the
  row-major position of the last tie to keep.
  """
  if x.ndim == 0:
    x = x.reshape(1)  # a scalar: one entry (`ties_keep_mask` reads only its threshold)
  n = math.prod(x.shape)
  if n == 0:
    return TiesSelection(jnp.uint32(0), jnp.uint32(0))
  dense = k < 1
  k = jnp.clip(k, jnp.uint32(1), jnp.uint32(n))  # n may exceed int32
  # 2**31 is above every magnitude's bits (bit 31 is the sign).
  everything = (jnp.uint32(0), jnp.uint32(1 << 31))
  if bracket is None and n <= 4 * _BRACKET_SAMPLE:
    bracket = everything  # too small for a sample to pay
  elif bracket is None:
    sample = take_sample(x, _BRACKET_SAMPLE).reshape(1, -1)
    bracket = jax.tree.map(lambda a: a[0], _brackets([sample], np.array([n]), k[None])[0])

  def locate(lo, hi):
    """Whether the k-th largest is in ``[lo, hi)``; its bin's edge and width, entries above and in it."""
    shift = jnp.maximum(32 - lax.clz(hi - lo - 1), 15) - 15

    def to_bins(x):
      bits = _magnitude_bits(x)
      inside = jnp.where(bits >= lo, (bits - lo) >> shift, _BRACKET_LENGTH)
      return jnp.where(bits >= hi, _BRACKET_BINS, inside)

    # Bin _BRACKET_BINS counts the entries above the bracket: a digit there,
    # or none (too few entries at or above the bracket's low end), is a miss.
    digit, above, in_bin = _select_digit(_leaf_histogram(x, to_bins, _BRACKET_LENGTH), k)
    return digit < _BRACKET_BINS, (lo + (digit << shift), shift, above, in_bin)

  def split_bin(edge, shift, above):
    """The k-th largest's bits, the ties to keep, the ties: a pass over its bin."""

    def to_bins(x):
      bits = _magnitude_bits(x)
      return jnp.where((bits >= edge) & ((bits - edge) >> shift == 0), bits - edge, 1 << 16)

    low, above_low, ties = _select_digit(_leaf_histogram(x, to_bins, 1 << 16), k - above)
    return edge + low, k - above - above_low, ties

  hit, (edge, shift, above, in_bin) = locate(*bracket)
  # The bin of the k-th entry: kept whole (threshold edge - 1, no tie kept),
  # one value wide (its entries are the ties), or split by one more pass.
  whole_bin = (above + in_bin == k) & (edge > 0)
  settled = (
    jnp.where(whole_bin, edge - 1, edge),
    jnp.where(whole_bin, 0, k - above),
    jnp.where(whole_bin, 0, in_bin),
  )
  split = hit & ~whole_bin & (shift > 0)
  found = _when(split, lambda: split_bin(edge, shift, above), settled, slices)
  if bracket is not everything:
    # A missed bracket: both passes over the whole range, which always holds
    # the k-th largest (the second pass settles any bin, split or not).
    def over_everything():
      edge, shift, above, _ = locate(*everything)[1]
      return split_bin(edge, shift, above)

    found = _when(~hit, over_everything, found, slices)
  threshold, need, ties = found
  end = jnp.uint32(n)
  cutoff = _when(
    need < ties, lambda: _cut_ties(x, threshold, need), jnp.where(need == 0, 0, end), slices
  )
  # k == 0: the leaf is left dense (threshold 0 keeps every entry).
  return TiesSelection(
    jnp.where(dense, 0, threshold).astype(jnp.uint32), jnp.where(dense, end, cutoff)
  )


def ties_select_sampled(shapes, samples, reserve_p: float) -> list[TiesSelection]:
  """Approximate top-k of tensors of ``shapes``: thresholds at the matching ranks of their samples.

  ``samples[i]``, of shape ``(m, s)``, holds the samples (`take_sample`) of
  ``m`` tensors of ``shapes[i]`` (the slices of a stacked leaf, or one
  leaf), and ``selections[i]`` their ``m`` selections. A sample has
  ``s = SAMPLE_SIZE`` entries (the whole leaf when smaller), one from each
  of ``s`` runs of ``n / s`` consecutive entries of the flat leaf, at a
  position that moves along a Weyl sequence (``_sample_positions``). Every layer of a stacked
  leaf, every row and every column is thus sampled in proportion to its
  size, whatever the scales of layers, rows or columns. A leaf's threshold
  is its sample's ``ceil(k * s / n)``-th largest magnitude
  (``k = floor(reserve_p * n)``), and every entry above it is kept. Nothing
  reads the tensors themselves; the samples of one length are ranked
  together (``_rank_samples``).

  The bound: a stratified sample counts the entries above any fixed threshold
  with at most the variance of ``s`` independent draws, so the kept fraction
  is ``p`` up to a relative ``sqrt((1 - p) / (p * s))`` (one standard
  deviation): 3.9% at ``p = 0.01``, and within 11.7% (three) in the tests on
  layer-stacked, row-, column- and embedding-structured leaves. A leaf of at
  most ``s`` entries is its own sample: exactly ``k`` kept, ties broken by
  row-major position as in `ties_select_exact`.

  Ties keep the bound (the tie rule): entries above the threshold are kept
  and, of those equal to it, the ones before a row-major cutoff: the position
  of the sample's ``j``-th tie, ``j`` being the ties the sample needs to reach
  its rank. The sample runs in row-major order, so the ties before that
  position are estimated like any other count (at Adam's first step, where
  most magnitudes equal the learning rate, keeping every tie would keep
  most of the leaf). Non-finite entries rank as zeros.
  """
  selections = []
  groups: dict[int, list[int]] = {}
  for i, (shape, sample) in enumerate(zip(shapes, samples, strict=True)):
    zeros = jnp.zeros(sample.shape[:1], jnp.uint32)
    selections.append(TiesSelection(zeros, zeros))
    if math.prod(shape):
      groups.setdefault(sample.shape[1], []).append(i)
  for s, members in groups.items():
    # Each row's (sample's) leaf size, as a vector.
    n = np.concatenate([np.full(samples[i].shape[0], math.prod(shapes[i])) for i in members])
    ranked = _rank_samples(
      [samples[i] for i in members],
      lambda statistic, bits, rows, n=n, s=s: _sampled_rows(statistic, bits, n[rows], s, reserve_p),
    )
    for i, (threshold, stop) in zip(members, ranked, strict=True):
      selections[i] = TiesSelection(threshold, stop)
  return selections


def _sampled_rows(statistic, bits, n, s, reserve_p):
  """Threshold and tie cutoff of each row of ``bits`` (a sample), of a leaf of ``n`` entries."""
  k = topk_count(n, reserve_p)
  rank = jnp.clip(jnp.ceil(k.astype(jnp.float32) * jnp.asarray(s / n, jnp.float32)), 1, s)
  rank = rank.astype(jnp.uint32)
  threshold, above, ties = statistic(rank, bits)
  need = rank - above
  cut = need < ties  # rare past Adam's first steps

  def last_tie():
    # Each sample's need-th tie: the largest reversed index with >= need ties at or after it.
    tied = jnp.equal(bits, threshold[:, None]).astype(jnp.uint32)
    return s - 1 - jax.vmap(_select_digit)(tied[:, ::-1], need)[0]

  last = lax.cond(jnp.any(cut), last_tie, lambda: need)
  # A leaf of at most s entries is its own sample.
  at = jnp.where(jnp.asarray(n == s), last, _sample_positions(n, s, last))
  n = jnp.asarray(n, jnp.uint32)
  stop = jnp.where(cut, at + 1, n)
  # k == 0: the leaf is left dense (threshold 0 keeps every entry).
  dense = k < 1
  return jnp.where(dense, 0, threshold), jnp.where(dense, n, stop)


def ties_keep_mask(x: jax.Array, selection: TiesSelection) -> jax.Array:
  """Boolean mask of the entries of ``x`` that ``selection`` keeps."""
  bits = _magnitude_bits(x)
  if x.ndim == 0:
    return bits >= selection.threshold
  tied = (bits == selection.threshold) & _row_major_before(
    x.shape, selection.cutoff, _sharding.explicit_axes(x)
  )
  return (bits > selection.threshold) | tied


def ties_select(x: jax.Array, reserve_p: float, topk: str = "exact") -> TiesSelection:
  """The TIES selection of one tensor ``x`` at density ``reserve_p`` (`ties_select_many`)."""
  return ties_select_many([x], reserve_p, topk)[0]


def ties_select_many(leaves, reserve_p: float, topk: str = "exact", samples=None):
  """The TIES selections of ``leaves``, a list of tensors, their samples ranked together.

  ``samples[i]``, where given and not None, is ``take_sample(leaves[i])``
  made elsewhere (``topk="sampled"`` only: `omerge_jax.onties` samples
  Adam's update from its moments, so that the update is not written out for
  it). Sampled, this is `ties_select_sampled` of the leaves. Exact, a leaf
  of at most ``SAMPLE_SIZE`` entries is its own sample, so the same route
  selects exactly its top-k (the tie rule keeps exactly ``k``); the larger
  leaves' bracket samples are ranked together (``_brackets``), then each leaf
  is histogrammed alone (`ties_select_exact`).

  >>> import jax.numpy as jnp
  >>> from omerge_jax import trim
  >>> leaves = [jnp.array([3.0, -1.0, 0.5, -4.0]), jnp.arange(10.0).reshape(2, 5)]
  >>> selections = trim.ties_select_many(leaves, reserve_p=0.5)
  >>> [trim.ties_keep_mask(x, s).astype(int).tolist() for x, s in zip(leaves, selections)]
  [[1, 0, 0, 1], [[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]]
  """
  for x in leaves:
    _check_leaf(x.shape, x.dtype)
  sizes = [math.prod(x.shape) for x in leaves]
  # Sampled, every leaf; exact, those that are their own sample (the tie rule
  # then keeps exactly k), ranked with the rest of their length.
  own = [i for i, n in enumerate(sizes) if topk == "sampled" or n <= SAMPLE_SIZE]
  samples = [None] * len(leaves) if samples is None else samples
  found = ties_select_sampled(
    [leaves[i].shape for i in own],
    [(take_sample(leaves[i]) if (s := samples[i]) is None else s).reshape(1, -1) for i in own],
    reserve_p,
  )
  selections = dict(zip(own, [jax.tree.map(lambda a: a[0], s) for s in found], strict=True))
  big = [i for i, n in enumerate(sizes) if i not in selections and n > 4 * _BRACKET_SAMPLE]
  brackets = {}
  if big:
    n = np.array([sizes[i] for i in big])
    found = _brackets(
      [take_sample(leaves[i], _BRACKET_SAMPLE).reshape(1, -1) for i in big],
      n,
      jnp.maximum(topk_count(n, reserve_p), 1),
    )
    brackets.update(zip(big, [jax.tree.map(lambda a: a[0], b) for b in found], strict=True))
  return [
    selections[i]
    if i in selections
    else ties_select_exact(x, topk_count(sizes[i], reserve_p), bracket=brackets.get(i))
    for i, x in enumerate(leaves)
  ]


def _check_leaf(shape, dtype):
  if math.prod(shape) > TIES_MAX_ENTRIES:
    raise ValueError(f"TIES needs a tensor of fewer than 2**32 entries, got shape {shape}")
  if jnp.dtype(dtype).itemsize > 4:
    raise TypeError(f"TIES ranks float32 bits: cast the {dtype} leaf to float32 first")


def _select_slices(slices, reserve_p, one_at_a_time) -> TiesSelection:
  """The exact `TiesSelection` of each ``slices[i]``, by ``lax.map`` or by ``vmap`` (`keep_mask`)."""
  k = topk_count(math.prod(slices.shape[1:]), reserve_p)
  if one_at_a_time:
    return lax.map(lambda t: ties_select_exact(t, k), slices)
  select = lambda t: ties_select_exact(t, k, slices=("slices",))
  return jax.vmap(select, axis_name="slices")(slices)


def keep_mask(
  x: jax.Array,
  reserve_p: float,
  topk: str = "exact",
  stacked_axes: int = 0,
) -> jax.Array:
  """Mask of the entries TIES keeps, each slice along the leading ``stacked_axes`` trimmed alone.

  A leaf that stacks the layers of one kind (``nnx.scan``, scanned LLMs) is
  trimmed as the separate tensors it holds (SPEC 13): ``k = floor(p * m)``
  for slices of ``m`` entries, ties broken by row-major position inside each
  slice. Sampled, and exact for slices of at most ``SAMPLE_SIZE`` entries
  (their own samples), the slices' samples are ranked together
  (`ties_select_sampled`). Exact, larger slices are selected one at a time
  (``lax.map``): under ``vmap`` each ``lax.cond`` of the selection would
  become a select running all its branches, and the batched scatters and
  gathers run slower (an 8 x 512 x 600 leaf on CPU: 5.3 ms against 10.1 ms,
  ``benchmarks/trim_branches.py``).
  Where the stacked axes may be sharded
  (a multi-device process, unless Explicit axes say they are not), the
  selection is vmapped instead, since ``lax.map`` would gather the leaf to
  slice it: its rare branches then run only if some slice needs them
  (a ``lax.cond`` on the predicate reduced over the slices). Under Explicit
  mesh axes it runs with the axes switched to Auto and the mask comes back
  sharded like ``x``.
  """
  if stacked_axes == 0:
    return ties_keep_mask(x, ties_select(x, reserve_p, topk))
  _check_leaf(x.shape[stacked_axes:], x.dtype)
  axes = _sharding.explicit_axes(x)
  local = jax.device_count() == 1 if axes is None else not any(axes[1][:stacked_axes])

  def mask(x):
    slices = x.reshape((-1,) + x.shape[stacked_axes:])
    # Slices of at most SAMPLE_SIZE entries are their own samples: exact.
    if topk == "sampled" or math.prod(slices.shape[1:]) <= SAMPLE_SIZE:
      samples = jax.vmap(lambda t: take_sample(t).reshape(-1))(slices)
      selections = ties_select_sampled([slices.shape[1:]], [samples], reserve_p)[0]
    else:
      selections = _select_slices(slices, reserve_p, local)
    return jax.vmap(ties_keep_mask)(slices, selections).reshape(x.shape)

  if axes is None:
    return mask(x)
  return cast(jax.Array, jax.sharding.auto_axes(mask, out_sharding=jax.typeof(x).sharding)(x))
