"""What users compose around the transform: masks, injection, abstract and traced init, ties, dtypes.

Each test fails on the mechanism it guards (see issue 29's list); the mesh
cases (Explicit and Auto) run in `tests/test_sharding.py`'s child process.
"""

import fractions
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import omerge_jax as om
from omerge_jax import offline, sparsify, trim


def _kept_per_layer(updates):
  return [int(n) for n in jnp.sum(updates != 0, axis=tuple(range(1, updates.ndim)))]


# --- optax.masked over whole subtrees keeps each leaf's own settings -----------


def _stacked_model():
  # Leaf order: "a" (masked away below, a whole subtree), then "layers".
  return {
    "a": {"s": jnp.ones(()), "v": jnp.ones(7)},
    "layers": {"w": jnp.arange(1.0, 201.0).reshape(2, 100)},
  }


def test_masked_subtree_keeps_each_leafs_stacked_axes():
  params = _stacked_model()
  tau = jax.tree.map(lambda x: 0.0 * x, params)
  stacked = {"a": {"s": 0, "v": 0}, "layers": {"w": 1}}
  mask = {"a": False, "layers": True}  # one False for the whole subtree "a"
  for axes in (stacked, lambda path, leaf: 1 if leaf.ndim == 2 else 0):
    merge = om.online_merge(tau, method="ties", reserve_p=0.1, alpha=0.0, stacked_axes=axes)
    tx = optax.masked(merge, mask)
    updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
    # k = floor(0.1 * 100) = 10 in each layer; the largest magnitudes are layer 1's.
    assert _kept_per_layer(updates["layers"]["w"]) == [10, 10]
    np.testing.assert_array_equal(updates["a"]["v"], params["a"]["v"])  # masked: untouched


def test_masked_subtree_draws_the_unmasked_dare_masks():
  params = _stacked_model()
  tau = jax.tree.map(lambda x: 0.0 * x, params)
  merge = om.online_merge(tau, reserve_p=0.5, alpha=0.0, seed=3)
  whole, _ = merge.update(params, merge.init(params), params)
  tx = optax.masked(merge, {"a": False, "layers": True})
  masked, _ = tx.update(params, tx.init(params), params)
  # A leaf's DARE key is its index in the reference delta, masked or not.
  np.testing.assert_array_equal(masked["layers"]["w"], whole["layers"]["w"])


# --- inject_hyperparams, k and seeds --------------------------------------------


# floor of the float64 product p * n, as int(p * n) in the authors' code: literal values.
_K_TABLE = [
  (0.29, 100, 28),  # 0.29 * 100 = 28.999999999999996
  (0.3, 1000, 300),  # exact rational arithmetic of the double 0.3 would give 299
  (1 / 3, 3, 1),
  (0.57, 100, 56),
  (0.07, 100, 7),
  (0.05, 4096, 204),
  (1.0, 2**24 + 1, 2**24 + 1),  # a float32 product rounds to 2**24
]


@pytest.mark.parametrize("p,n,k", _K_TABLE)
def test_ties_k_is_the_floor_of_the_float64_product(p, n, k):
  assert int(trim.topk_count(n, p)) == k
  if n <= 4096:
    x = jnp.arange(1.0, n + 1.0)
    assert int(jnp.sum(sparsify.ties(x, p) != 0)) == k


def test_ties_k_on_2_to_24_plus_1_entries_keeps_them_all():
  x = jnp.ones(2**24 + 1)
  assert int(jnp.sum(jax.jit(lambda x: trim.keep_mask(x, 1.0))(x))) == 2**24 + 1


@settings(max_examples=40, deadline=None)
@given(p=st.floats(1e-3, 1.0), n=st.integers(1, 5000))
def test_ties_k_matches_exact_arithmetic_away_from_rounding(p, n):
  exact = fractions.Fraction(p) * n
  # Within an ulp of an integer the float64 rounding decides (the table above).
  assume(abs(exact - round(exact)) > 1e-9 or exact == round(exact))
  assert int(trim.topk_count(n, p)) == math.floor(exact)


def test_traced_reserve_p_is_refused_by_the_ties_trim():
  with pytest.raises(TypeError, match=r"reserve_p must be a number, not a traced value"):
    jax.jit(lambda p: sparsify.ties(jnp.ones(10), p))(0.5)


def test_masks_of_distinct_step_leaf_pairs_differ():
  # 2**16 steps x 64 leaves: a 32-bit key would give about 2,000 pairs one mask.
  steps = jnp.arange(2**16, dtype=jnp.uint32)
  leaves = jnp.arange(64, dtype=jnp.uint32)
  h = jax.jit(
    jax.vmap(jax.vmap(lambda s, l: sparsify.element_hash((2,), 7, 0, s, l), (None, 0)), (0, None))
  )(steps, leaves)
  words = np.asarray(h).reshape(-1, 2).astype(np.uint64)
  keys = (words[:, 0] << np.uint64(32)) | words[:, 1]
  assert np.unique(keys).size == keys.size


def test_leaves_whose_words_share_their_high_bits_draw_apart():
  # The leaf word (as element_hash derives it, replicated here) enters the
  # first axis's coordinate hash. Entered by XOR, entry (i, j) of leaf a
  # hashed as (i ^ d, j) or (i ^ d, j ^ d) of leaf b, d = word(a) ^ word(b):
  # two leaves whose words share their high bits (about 128 pairs among
  # 2**16 leaves) drew the same entries.
  u32 = lambda v: np.asarray(sparsify._mix32(jnp.asarray(v, jnp.uint32)))
  golden = np.uint32(0x9E3779B9)
  key = u32(u32(np.uint32(7) ^ np.uint32(0x6A09E667)) + np.uint32(0) * golden)
  index = np.arange(2**16, dtype=np.uint32)
  words = u32((key ^ np.uint32(0xBB67AE85)) + index * golden)
  order = np.argsort(words)
  d = words[order[1:]] ^ words[order[:-1]]
  i = int(np.argmin(d))
  assert d[i] < 256
  a, b = (int(index[order[j]]) for j in (i, i + 1))
  h = [np.asarray(sparsify.element_hash((512, 256), 7, 0, 3, leaf)) for leaf in (a, b)]
  # 2**17 draws each: a few equal values by chance (2**34 / 2**33), not thousands.
  assert np.intersect1d(h[0], h[1]).size < 64


# --- init: abstract tau, eval_shape, jit -----------------------------------------


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_eval_shape_init_with_an_abstract_reference_delta(method):
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3, jnp.bfloat16)}
  kw = dict(method=method, merge_every=2, reference_dtype=jnp.bfloat16)
  want = jax.eval_shape(om.online_merge(params, **kw).init, params)
  tx = om.online_merge(_abstract(params), **kw)
  got = jax.eval_shape(tx.init, _abstract(params))
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  # Values it cannot have: eager init names the leaf, a jitted one fails when run.
  with pytest.raises(ValueError, match=r"reference_delta\['b'\] is abstract"):
    tx.init(params)
  with pytest.raises(Exception, match=r"reference_delta\['b'\] is abstract"):
    jax.block_until_ready(jax.jit(tx.init)(params))


def test_eval_shape_init_reads_no_value_of_the_reference_delta():
  tau = {"w": jnp.array([1.0, jnp.nan])}  # eager init refuses it by reading it
  tx = om.onties(1e-3, tau)
  state = jax.eval_shape(tx.init, tau)
  assert jax.tree.leaves(state)[0].shape == ()
  with pytest.raises(ValueError, match=r"non-finite"):
    tx.init(tau)


# --- sampled top-k and ties --------------------------------------------------------


def test_sampled_ties_keep_the_bound_at_adams_first_step():
  x = jax.random.normal(jax.random.PRNGKey(0), (512, 2048))
  params, tau = {"w": x}, {"w": 0.0 * x}
  for topk in ("sampled", "exact"):
    tx = om.onties(1e-3, tau, reserve_p=0.01, alpha=0.0, topk=topk, track_stats=True)
    _, state = jax.jit(tx.update)(params, tx.init(params), params)
    # Adam's first step: |update| = lr on (almost) every entry.
    fraction = float(om.merge_stats(state).kept_fraction)
    assert abs(fraction / 0.01 - 1) < 3 * 0.039, (topk, fraction)


@pytest.mark.parametrize("n", [1000, 300_000])
def test_sampled_tie_rule_is_row_major_and_exact_on_its_own_sample(n):
  x = np.full(n, 2.0, np.float32)
  x[::10] = 1.0  # 90 % of the entries tie at the top
  keep = np.asarray(jax.jit(lambda x: trim.keep_mask(x, 0.3, "sampled"))(jnp.asarray(x)))
  kept = int(keep.sum())
  # The kept ties are the first ones in row-major order.
  assert keep[: np.flatnonzero(keep)[-1] + 1][x[: np.flatnonzero(keep)[-1] + 1] == 2.0].all()
  if n <= trim.SAMPLE_SIZE:
    assert kept == math.floor(0.3 * n)
  else:
    assert abs(kept / (0.3 * n) - 1) < 3 * math.sqrt(0.7 / (0.3 * trim.SAMPLE_SIZE))


# --- extra arguments, weight decay ------------------------------------------------


def test_every_alias_accepts_extra_arguments():
  params = {"w": jnp.linspace(-1.0, 1.0, 6)}
  tau = {"w": 0.01 * params["w"]}
  for tx in (
    om.onties(1e-3, tau, topk="sampled", weight_decay=0.1),
    om.onties(1e-3, tau, weight_decay=0.1),
    om.ondare(1e-3, tau, weight_decay=0.1),
    om.decoupled_weight_decay(1e-3, 0.1),
  ):
    plain, _ = tx.update(params, tx.init(params), params)
    extra, _ = jax.jit(lambda p, s, tx=tx: tx.update(p, s, p, value=jnp.ones(()), other=1))(
      params, tx.init(params)
    )
    chex.assert_trees_all_close(extra, plain)


def test_weight_decay_schedule_and_mask_match_adamw():
  params = {"w": jnp.linspace(-1.0, 1.0, 6), "b": jnp.ones(2)}
  tau = jax.tree.map(jnp.zeros_like, params)
  decay = optax.linear_schedule(0.5, 0.0, 4)
  mask = {"w": True, "b": False}
  tx = om.ondare(1e-2, tau, alpha=0.0, reserve_p=1.0, weight_decay=decay, mask=mask)
  want_tx = optax.adamw(1e-2, weight_decay=decay, mask=mask)
  got, want = params, params
  state, want_state = tx.init(params), want_tx.init(params)
  for i in range(4):
    grads = jax.tree.map(lambda p, i=i: jnp.sin(p + i), params)
    u, state = jax.jit(tx.update)(grads, state, got)
    v, want_state = jax.jit(want_tx.update)(grads, want_state, want)
    got, want = optax.apply_updates(got, u), optax.apply_updates(want, v)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  assert not np.allclose(got["w"], optax.apply_updates(params, v)["w"])


# --- dtypes ----------------------------------------------------------------------


def test_offline_linear_of_weight_one_gives_the_model_back_in_bfloat16():
  # In bfloat16 the task vector -100.30078125 would round to -100.5, and 100 + -100.5 = -0.5.
  base = {"w": jnp.asarray([100.0, 2.0, -0.5], jnp.bfloat16)}
  model = {"w": jnp.asarray([-0.30078125, 0.75, 3.0e-3], jnp.bfloat16)}
  chex.assert_trees_all_equal(offline.linear(base, [model], [1.0]), model)
  chex.assert_trees_all_equal(offline.dare(base, [model], [1.0], density=1.0), model)


def test_numpy_float64_reference_delta_with_float32_params_in_both_methods():
  params = {"w": jnp.linspace(-1.0, 1.0, 8)}
  tau = {"w": np.linspace(-0.1, 0.1, 8)}  # float64: JAX holds it as float32
  for method in ("dare", "ties"):
    tx = om.online_merge(tau, method=method, reserve_p=0.5)
    state = tx.init(params)
    assert state.reference["w"].dtype == jnp.float32
    updates, _ = tx.update(params, state, params)
    assert updates["w"].dtype == jnp.float32
