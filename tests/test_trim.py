"""The exact top-k on large leaves against a NumPy ranking.

Leaves of more than 2**16 entries take the bracket; on one CPU device the
histograms over leaves of more than 2**15 entries run in slices.

In this process, on one device; `test_sharding.py` checks it on a sharded
leaf. Kept apart from that file, whose tests run on one worker with its
child process, so that xdist spreads these.
"""

import decimal
import math

import numpy as np
import pytest


def _numpy_keep(x, p):
  """NumPy's exact TIES mask: the k largest magnitudes, ties by row-major position; k = 0 dense."""
  flat = x.reshape(-1)
  n = flat.size
  # k from p's decimal digits, an oracle apart from the implementation's float64
  # product (they agree on this file's densities and sizes).
  k = math.floor(decimal.Decimal(repr(p)) * n)
  if k < 1:
    return np.ones(x.shape, bool)
  order = np.lexsort((np.arange(n), -np.abs(flat)))
  keep = np.zeros(n, bool)
  keep[order[:k]] = True
  return keep.reshape(x.shape)


def _numpy_ties(x, p):
  return np.where(_numpy_keep(x, p), x, 0)


def _cases():
  """Leaves above the size cut, each with the densities that reach one code path."""
  import jax.numpy as jnp

  from omerge_jax import trim

  rng = np.random.default_rng(1)
  shape = (640, 512)  # 327,680 entries
  normal = rng.standard_normal(shape)
  # The entries of the bracket's sample (take_sample of each entry's position).
  sampled = np.zeros(shape, bool).reshape(-1)
  positions = trim.take_sample(jnp.arange(normal.size).reshape(shape), trim._BRACKET_SAMPLE)
  sampled[np.asarray(positions).reshape(-1)] = True
  sampled = sampled.reshape(shape)
  cluster = 1.0 + 2.0**-24 * rng.integers(-200, 200, shape)  # across a 16-bit digit edge
  return {
    # continuous values: the bracket holds, the k-th entry alone in its bin
    "normal": (normal, (0.003, 0.3)),
    # large values only where the sample does not look: the bracket misses
    "hidden": (np.where(~sampled & (rng.random(shape) < 0.05), 100.0, 1.0) * normal, (0.003,)),
    # a few distinct values: ties at the threshold, cut by position
    "levels": (rng.integers(-3, 4, shape).astype(np.float64), (0.003, 0.3)),
    # half spread over [1e-3, 1e3], half within 200 ulps of 1: the bracket
    # spans two digits, the k-th entry's bin holds entries to drop: split
    "cluster": (np.where(rng.random(shape) < 0.5, cluster, rng.uniform(1e-3, 1e3, shape)), (0.75,)),
    # 1% zeros, in the lowest bin: ties cut among them, or at p = 1 all kept
    "zeros": (np.where(rng.random(shape) < 0.01, 0.0, normal), (0.995, 1.0)),
  }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_bracketed_topk_is_exact(case):
  import jax
  import jax.numpy as jnp

  from omerge_jax import sparsify

  x, densities = _cases()[case]
  x = x.astype(np.float32)
  f = jax.jit(sparsify.ties, static_argnums=(1,))
  for p in densities:
    got = np.asarray(f(jnp.asarray(x), p))
    np.testing.assert_array_equal(got, _numpy_ties(x, p), err_msg=f"{case} p={p}")


def _choose_branch(monkeypatch, branch):
  """Every `lax.platform_dependent` of the library takes ``branch``: "default" is GPU and TPU's."""
  from omerge_jax import trim

  monkeypatch.setattr(
    trim.lax,
    "platform_dependent",
    lambda *args, cpu, default: {"cpu": cpu, "default": default}[branch](*args),
  )


@pytest.mark.parametrize("branch", ["cpu", "default"])
def test_exact_selections_of_many_leaves_are_exact(branch, monkeypatch):
  # The transform ranks the bracket samples of all its unstacked leaves
  # together (`trim.ties_select_many`): on CPU each alone, elsewhere stacked
  # in one sort ("default", run here by choosing that branch of every
  # `lax.platform_dependent`). Each leaf's mask must be its exact top-k,
  # including where its bracket misses ("hidden") and where it has none
  # (small leaves, their own samples ranked together, a scalar, an empty leaf).
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  _choose_branch(monkeypatch, branch)
  rng = np.random.default_rng(3)
  cases = _cases()
  leaves = [
    cases["normal"][0],
    cases["hidden"][0],
    cases["levels"][0],
    1e3 * rng.standard_normal((300, 700)),  # another scale: another bracket
    rng.standard_normal((70, 40)),  # no bracket: its own sample
    np.round(2 * rng.standard_normal((70, 40))),  # ranked with it; ties at the k-th
    np.float32(-3.0),
    np.zeros((0, 4)),
  ]
  leaves = [jnp.asarray(np.asarray(x, np.float32)) for x in leaves]
  p = 0.003
  masks = jax.jit(
    lambda leaves: [
      trim.ties_keep_mask(x, selection)
      for x, selection in zip(leaves, trim.ties_select_many(leaves, p), strict=True)
    ]
  )
  for x, got in zip(leaves, masks(leaves), strict=True):
    np.testing.assert_array_equal(got, _numpy_keep(np.asarray(x), p), err_msg=str(x.shape))
  # Any bracket gives the exact mask (a miss only costs the slower path): that
  # each leaf gets its own is seen in the brackets themselves.
  big = leaves[:4]
  samples = [trim.take_sample(x, trim._BRACKET_SAMPLE).reshape(1, -1) for x in big]
  # A new function: jit would reuse the other branch's trace of a known one.
  n = np.array([x.size for x in big])
  k = jnp.asarray(np.floor(p * n), jnp.uint32)
  brackets = jax.jit(lambda s: trim._brackets(s, n, k))(samples)
  for case, x, (lo, hi) in zip(["normal", "hidden", "levels", "other"], big, brackets, strict=True):
    bits = np.sort(np.abs(np.asarray(x)).reshape(-1).view(np.uint32))
    kth = bits[bits.size - math.floor(p * bits.size)]
    assert (int(lo[0]) <= kth < int(hi[0])) == (case != "hidden"), (case, lo, hi, kth)


def test_exact_selection_without_a_bracket_is_exact():
  # A leaf too small for a bracket, selected by `ties_select_exact` itself
  # (the library sends such leaves to their own samples): its two passes
  # run over the whole range of magnitudes, as after a bracket's miss.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  rng = np.random.default_rng(4)
  select = jax.jit(lambda x, k: trim.ties_keep_mask(x, trim.ties_select_exact(x, k)))
  for x in (rng.standard_normal((70, 40)), np.round(2 * rng.standard_normal(3000))):
    x = x.astype(np.float32)
    for p in (0.003, 0.3, 1.0):
      k = trim.topk_count(x.size, p)
      np.testing.assert_array_equal(select(jnp.asarray(x), k), _numpy_keep(x, p), err_msg=f"p={p}")


@pytest.mark.parametrize(
  "shape", [(1000, 333), (400_001,), (3, 300, 400), (70_000, 5), (500, 401), (200_003,)]
)
def test_exact_topk_is_exact_on_leaves_not_cut_in_equal_chunks(shape):
  # On CPU the histograms over a leaf walk the leading axis a slice at a
  # time; these leaves leave a remainder, are 1-D, or have slices above the
  # chunk.
  import jax
  import jax.numpy as jnp

  from omerge_jax import sparsify, trim

  rng = np.random.default_rng(2)
  f = jax.jit(sparsify.ties, static_argnums=(1,))
  for x in (rng.standard_normal(shape), rng.integers(-3, 4, shape)):
    x = x.astype(np.float32)
    for p in (0.003, 0.3):
      np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), p)), _numpy_ties(x, p))
  # The chunked histogram is the one-scatter histogram, bins past the end dropped.
  bins = lambda v: jax.lax.bitcast_convert_type(v, jnp.uint32) >> 20
  x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
  chunked = jax.jit(lambda v: trim._leaf_histogram(v, bins, 1 << 10))(x)
  np.testing.assert_array_equal(chunked, trim._histogram(bins(x), 1 << 10))
  assert 0 < int(chunked.sum()) < x.size


def test_leaf_histograms_run_in_slices_on_one_cpu_device():
  # XLA:CPU writes a scatter's indices and ones to fresh buffers at every
  # step: over a whole 2M-entry leaf that is 16 MB of temporaries; in slices
  # of 2**16 entries, about 1 MB. This process has one device.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  assert jax.device_count() == 1
  leaf = jax.ShapeDtypeStruct((2048, 1024), jnp.float32)
  bins = lambda x: trim._magnitude_bits(x) >> 16
  histogram = jax.jit(lambda x: trim._leaf_histogram(x, bins, trim._BRACKET_LENGTH))
  temporaries = histogram.lower(leaf).compile().memory_analysis().temp_size_in_bytes
  assert temporaries < 2 * 2**20, temporaries


def _sample_bits(rng, kind, shape):
  if kind == "normal":
    x = rng.standard_normal(shape)
  elif kind == "levels":  # many ties at every rank
    x = rng.integers(-3, 4, shape)
  else:  # zeros and non-finite entries, which rank as zeros
    x = np.where(rng.random(shape) < 0.3, 0.0, rng.standard_normal(shape))
    x[rng.random(shape) < 0.01] = np.inf
    x[rng.random(shape) < 0.01] = np.nan
  return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["normal", "levels", "zeros"])
@pytest.mark.parametrize("shape", [(65536,), (300, 200)])
def test_sample_statistics_by_sort_equal_the_radix_select(kind, shape):
  # GPU and TPU take the samples' k-th largest magnitude (sampled
  # thresholds, the bracket of the exact top-k) and the counts above and at
  # it from one sort of all the samples stacked, CPU from a radix select
  # whose histograms are taken row by row: both routes run here and must
  # agree on every sample, each at its own rank, on a full-size sample and
  # on a shorter one (a leaf small enough to be its own sample).
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  rng = np.random.default_rng(3)
  leaves = jnp.asarray(np.stack([_sample_bits(rng, kind, shape) for _ in range(6)]))
  n = math.prod(shape)
  ranks = jnp.asarray([1, 2, 655, n // 3, n - 1, n], jnp.uint32)
  values = np.sort(np.asarray(trim._magnitude_bits(leaves)).reshape(6, n), axis=1)
  expected = values[np.arange(6), n - np.asarray(ranks)]
  above = (values > expected[:, None]).sum(1)
  ties = (values == expected[:, None]).sum(1)
  bits = trim._magnitude_bits(leaves.reshape(6, n))
  for got in (
    jax.jit(trim._radix_statistic)(ranks, bits),
    jax.jit(trim._sorted_statistic)(ranks, bits),
  ):
    np.testing.assert_array_equal(got[0], expected)
    np.testing.assert_array_equal(got[1], above)
    np.testing.assert_array_equal(got[2], ties)


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_stacked_slices_each_take_their_own_path(one_at_a_time):
  # A stacked leaf whose slices take different paths of the exact selection
  # (bracket hit, miss, ties cut by position, bin split), selected by
  # lax.map (one device) and by vmap (where the stacked axis may be sharded):
  # each slice's mask is the NumPy ranking of that slice alone.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  cases = _cases()
  x = np.stack([cases[c][0] for c in sorted(cases)]).astype(np.float32)
  for p in (0.003, 0.75):

    @jax.jit
    def mask(x, p=p):
      return jax.vmap(trim.ties_keep_mask)(x, trim._select_slices(x, p, one_at_a_time))

    got = np.where(np.asarray(mask(jnp.asarray(x))), x, 0)
    for i, case in enumerate(sorted(cases)):
      np.testing.assert_array_equal(got[i], _numpy_ties(x[i], p), err_msg=f"{case} p={p}")
  # A stacked 1-D leaf: its slices are scalars, each kept (k = floor(p) = 0: dense).
  scalars = jnp.asarray([3.0, -1.0, 0.0, -4.0])
  kept = jax.vmap(trim.ties_keep_mask)(scalars, trim._select_slices(scalars, 0.5, one_at_a_time))
  np.testing.assert_array_equal(kept, np.ones(4, bool))


@pytest.mark.parametrize("devices", [1, 8])
def test_small_stacked_slices_are_ranked_together_and_exact(devices, monkeypatch):
  # Exact slices of at most SAMPLE_SIZE entries are their own samples, ranked
  # together (`ties_select_sampled`), in one process with one device and where
  # the stacked axis may be sharded: each slice's mask is its exact top-k,
  # ties cut by row-major position inside that slice.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  monkeypatch.setattr(trim.jax, "device_count", lambda: devices)
  rng = np.random.default_rng(5)
  x = np.round(2 * rng.standard_normal((2, 3, 70, 40))).astype(np.float32)
  x[1, 2] = rng.standard_normal((70, 40))  # a slice without ties
  for p in (0.003, 0.3):
    got = np.asarray(jax.jit(lambda x, p=p: trim.keep_mask(x, p, "exact", 2))(jnp.asarray(x)))
    for i in np.ndindex(2, 3):
      np.testing.assert_array_equal(got[i], _numpy_keep(x[i], p), err_msg=f"{i} p={p}")


def test_sampled_slices_ranked_together_keep_their_own_tie_cut():
  # Sampled: one slice's sample holds exactly the ties it needs (its first
  # entries are 2.0, up to one past a sampled entry, the rest 1.0: every 2.0
  # is kept), the other's more (a few levels: its tie cut runs). Ranked
  # together, the cut runs for both slices, and each keeps its own answer.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  shape = (640, 512)
  n, s = math.prod(shape), trim.SAMPLE_SIZE
  positions = np.asarray(trim._sample_positions(n, s, jnp.arange(s, dtype=jnp.uint32)))
  j = int(np.argmax(np.diff(positions) > 2))  # an entry past the j-th sampled one is unsampled
  end = int(positions[j]) + 2
  halves = np.where(np.arange(n) < end, 2.0, 1.0).reshape(shape)
  p = (j + 1) * (n // s) / n  # the sample's rank j + 1: its 2.0s exactly
  assert int(trim.topk_count(n, p)) == (j + 1) * (n // s) and n % s == 0
  x = jnp.asarray(np.stack([halves, _cases()["levels"][0]]).astype(np.float32))
  together = np.asarray(jax.jit(lambda x: trim.keep_mask(x, p, "sampled", stacked_axes=1))(x))
  alone = [np.asarray(jax.jit(lambda t: trim.keep_mask(t, p, "sampled"))(t)) for t in x]
  np.testing.assert_array_equal(together, np.stack(alone))
  assert together[0].sum() == end


def test_vmapped_slices_keep_their_branches():
  # Under vmap a lax.cond on a per-slice predicate becomes a select that runs
  # every branch (a pass over the leaf each); `_when` keeps every branch of
  # the one-slice selection a branch.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  conds = lambda f, shape: sum(
    e.primitive.name == "cond"
    for e in jax.make_jaxpr(f)(jax.ShapeDtypeStruct(shape, jnp.float32)).jaxpr.eqns
  )
  one = conds(lambda t: trim.ties_select(t, 0.01), (640, 512))
  stacked = conds(lambda x: trim._select_slices(x, 0.01, False), (3, 640, 512))
  assert stacked == one >= 5, (stacked, one)
  # The sampled selection ranks the slices' samples together: the
  # platform's route and, inside each, the tie cut stay one branch each for
  # all the slices (the jaxpr's text shows the nested ones).
  nested = lambda f, shape: str(jax.make_jaxpr(f)(jax.ShapeDtypeStruct(shape, jnp.float32))).count(
    " cond["
  )
  one = nested(lambda t: trim.ties_select(t, 0.01, "sampled"), (640, 512))
  stacked = nested(lambda x: trim.keep_mask(x, 0.01, "sampled", 1), (3, 640, 512))
  assert stacked == one >= 3, (stacked, one)


def _numpy_sampled(x, p, positions):
  """NumPy's sampled TIES mask: the sample at ``positions`` (row-major), ranked; ties cut by position."""
  flat = np.abs(x.reshape(-1).astype(np.float32))
  flat = np.where(np.isfinite(flat), flat, 0)
  n, s = flat.size, positions.size
  k = math.floor(decimal.Decimal(repr(p)) * n)
  if k < 1:
    return np.ones(x.shape, bool)
  sample = flat[positions]
  rank = int(min(max(math.ceil(np.float32(k) * np.float32(s / n)), 1), s))
  threshold = np.sort(sample)[s - rank]
  need = rank - int((sample > threshold).sum())
  stop = n
  if need < int((sample == threshold).sum()):
    stop = int(positions[np.flatnonzero(sample == threshold)[need - 1]]) + 1
  tied = (flat == threshold) & (np.arange(n) < stop)
  return ((flat > threshold) | tied).reshape(x.shape)


@pytest.mark.parametrize("branch", ["cpu", "default"])
def test_sampled_selections_of_many_leaves_are_each_leafs_own(branch, monkeypatch):
  # The transform ranks every unstacked leaf's sample together (on GPU and
  # TPU, the "default" branch, one sort per sample length and the tie cut
  # once for all; on CPU each alone): each leaf's mask must be NumPy's
  # sampled rule on that leaf alone. Leaves above and below the sample size
  # (two of each length), a scalar, an empty leaf, leaves whose k is 0
  # (dense), ties at the threshold (a tie cut), zeros.
  import jax
  import jax.numpy as jnp

  from omerge_jax import trim

  _choose_branch(monkeypatch, branch)

  rng = np.random.default_rng(7)
  p = 0.013
  leaves = [
    rng.standard_normal((300, 400)),
    rng.integers(-3, 4, (512, 300)),  # levels: the threshold's ties are cut
    rng.standard_normal((7,)),  # k = 0
    np.float32(2.0),  # a scalar, k = 0
    np.zeros((0, 3)),
    rng.integers(-2, 3, (50, 30)),  # its own sample, ties cut
    rng.standard_normal((40, 30)),  # its own sample
    np.where(rng.random((257, 256)) < 0.995, 0.0, rng.standard_normal((257, 256))),
  ]
  leaves = [jnp.asarray(np.asarray(x, np.float32)) for x in leaves]

  @jax.jit
  def masks(leaves):
    samples = [trim.take_sample(x).reshape(1, -1) for x in leaves]
    found = trim.ties_select_sampled([x.shape for x in leaves], samples, p)
    return [
      trim.ties_keep_mask(x, jax.tree.map(lambda a: a[0], sel))
      for x, sel in zip(leaves, found, strict=True)
    ]

  for x, got in zip(leaves, masks(leaves), strict=True):
    n = x.size
    s = min(n, trim.SAMPLE_SIZE)
    positions = np.arange(n)  # a leaf of at most s entries is its own sample
    if n > s:
      positions = np.asarray(trim._sample_positions(n, s, jnp.arange(s, dtype=jnp.uint32)))
    want = _numpy_sampled(np.asarray(x), p, positions)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(x.shape))
