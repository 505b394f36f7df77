"""Semantics of the online merge: SPEC sections 3-8, against hand-computed values."""

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
from omerge_jax import consensus, sparsify


def _tree(seed=0, scale=1.0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {
    "dense": {
      "w": scale * jax.random.normal(k1, (32, 16)),
      "b": scale * jax.random.normal(k2, (16,)),
    },
    "head": scale * jax.random.normal(k3, (4, 5, 3)),
  }


def _grads(params, i):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + i) + 0.1 * p, params)


def _run(tx, params, steps, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for i in range(steps):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# --- SPEC §8 identities -------------------------------------------------------


def test_ondare_alpha0_p1_equals_adamw_with_schedule_and_weight_decay():
  params = _tree(1)
  tau = _tree(2, 0.1)
  lr = optax.cosine_decay_schedule(1e-2, 20)
  kw = dict(b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.1)
  got, _ = _run(om.ondare(lr, tau, alpha=0.0, reserve_p=1.0, **kw), params, 12)
  want, _ = _run(optax.adamw(lr, **kw), params, 12)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)


def test_onties_zero_reference_p1_equals_adam():
  params = _tree(3)
  tau = jax.tree.map(jnp.zeros_like, params)
  for election in ("reference", "weighted"):
    for alpha in (0.0, 0.3):
      # (1 - alpha) scales the step: Adam with learning rate (1 - alpha) * lr
      tx = om.onties(1e-2, tau, alpha=alpha, reserve_p=1.0, sign_election=election)
      got, _ = _run(tx, params, 8)
      want, _ = _run(optax.adam((1 - alpha) * 1e-2), params, 8)
      chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_merge_every_longer_than_run_is_plain_adam_until_the_merge(method):
  params = _tree(4)
  tau = _tree(5, 0.1)
  tx = optax.chain(
    optax.adam(1e-2), om.online_merge(tau, method=method, alpha=0.5, reserve_p=0.3, merge_every=10)
  )
  got, state = _run(tx, params, 9)
  want, _ = _run(optax.adam(1e-2), params, 9)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
  # The accumulator holds exactly what was applied since the start.
  applied = jax.tree.map(lambda a, b: a - b, want, params)
  chex.assert_trees_all_close(state[1].accumulator, applied, rtol=1e-5, atol=2e-6)
  # The 10th step does merge.
  got10, _ = _run(tx, params, 10)
  want10, _ = _run(optax.adam(1e-2), params, 10)
  assert not np.allclose(got10["dense"]["w"], want10["dense"]["w"])


def _fixed_update_mean(method_kwargs, delta, tau, steps):
  """Mean merged update over ``steps`` steps fed the same proposed update."""
  tx = om.online_merge(tau, **method_kwargs)
  state = tx.init(delta)

  def body(state, _):
    out, state = tx.update(delta, state)
    return state, out

  state, outs = jax.lax.scan(body, state, None, length=steps)
  return jax.tree.map(lambda o: o.mean(0), outs), jax.tree.map(lambda o: o.std(0), outs), state


def test_ondare_is_unbiased_conditional_expectation():
  delta = _tree(6)
  tau = _tree(7, 0.3)
  p, alpha, steps = 0.2, 0.25, 4000
  mean, _, state = _fixed_update_mean(dict(alpha=alpha, reserve_p=p, clip=None), delta, tau, steps)
  want = jax.tree.map(lambda d, r: (1 - alpha) * d + alpha * r, delta, state.reference)
  # Per entry the mean has std |(1-alpha) d| sqrt((1-p)/(p N)); test z-scores.
  for m, w, d in zip(
    jax.tree.leaves(mean), jax.tree.leaves(want), jax.tree.leaves(delta), strict=True
  ):
    sd = (1 - alpha) * np.abs(d) * math.sqrt((1 - p) / (p * steps))
    z = np.abs(np.asarray(m - w)) / np.maximum(sd, 1e-12)
    assert z.max() < 5.5, z.max()
    assert abs(z.mean() - math.sqrt(2 / math.pi)) < 0.15  # E|N(0,1)|


def test_childtuning_alpha0_is_unbiased_gradient_dropout():
  delta = _tree(8)
  tau = _tree(9)
  p, steps = 0.1, 4000
  mean, std, _ = _fixed_update_mean(dict(alpha=0.0, reserve_p=p), delta, tau, steps)
  for m, s, d in zip(
    jax.tree.leaves(mean), jax.tree.leaves(std), jax.tree.leaves(delta), strict=True
  ):
    sd = np.abs(d) * math.sqrt((1 - p) / (p * steps))
    assert (np.abs(np.asarray(m - d)) < 5.5 * sd + 1e-7).all()
    # and the spread is the dropout's: x sqrt((1-p)/p) per step
    np.testing.assert_allclose(s, np.abs(d) * math.sqrt((1 - p) / p), rtol=0.1)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 0.9])
def test_dare_keep_rate_is_binomial(p):
  shape = (512, 256)
  n = math.prod(shape)
  for step in range(3):
    keep = sparsify.dare_keep_mask(shape, p, 0, sparsify.UPDATE_STREAM, step, 0)
    kept = int(keep.sum())
    assert abs(kept - p * n) < 5 * math.sqrt(n * p * (1 - p)), (kept, p * n)


def test_dare_masks_fresh_each_step_and_leaf_and_independent_of_stream():
  a = sparsify.dare_keep_mask((64, 64), 0.5, 0, 0, 0, 0)
  others = [
    sparsify.dare_keep_mask((64, 64), 0.5, 0, 0, 1, 0),
    sparsify.dare_keep_mask((64, 64), 0.5, 0, 0, 0, 1),
    sparsify.dare_keep_mask((64, 64), 0.5, 0, 1, 0, 0),
    sparsify.dare_keep_mask((64, 64), 0.5, 1, 0, 0, 0),
  ]
  for b in others:
    agreement = float((a == b).mean())
    assert abs(agreement - 0.5) < 0.03, agreement


def test_dare_survivors_scaled_by_inverse_p():
  x = jnp.linspace(-2.0, 2.0, 4096).reshape(64, 64)
  y = sparsify.dare(x, 0.25, seed=3, stream=0, step=0, leaf_index=0)
  kept = np.asarray(y != 0)
  np.testing.assert_allclose(np.asarray(y)[kept], 4.0 * np.asarray(x)[kept], rtol=1e-6)


def test_reference_mask_is_fixed_unless_resampled():
  delta = {"w": jnp.ones((64, 64))}
  tau = {"w": jnp.full((64, 64), 0.5)}
  tx = om.online_merge(tau, alpha=1.0, reserve_p=0.5, clip=None)
  state = tx.init(delta)
  u1, state = tx.update(delta, state)
  u2, state = tx.update(delta, state)
  chex.assert_trees_all_equal(u1, u2)  # alpha=1: the update is F(tau), fixed
  chex.assert_trees_all_equal(u1, state.reference)
  tx = om.online_merge(tau, alpha=1.0, reserve_p=0.5, clip=None, resample_reference=True)
  state = tx.init(delta)
  chex.assert_trees_all_equal(state.reference, tau)  # stored dense
  u1, state = tx.update(delta, state)
  u2, state = tx.update(delta, state)
  assert abs(float(jnp.mean(u1["w"] == u2["w"])) - 0.5) < 0.05
  np.testing.assert_allclose(float(u1["w"].mean()), 0.5, atol=0.05)


def test_reference_clip():
  tau = {"w": jnp.full((32, 32), 0.9)}
  state = om.online_merge(tau, reserve_p=0.5, clip=1.0).init(tau)
  assert set(np.unique(np.asarray(state.reference["w"]))) == {0.0, 1.0}  # 1.8 clipped
  state = om.online_merge(tau, reserve_p=0.5, clip=None).init(tau)
  np.testing.assert_allclose(np.unique(np.asarray(state.reference["w"])), [0.0, 1.8], rtol=1e-6)


# --- TIES trim ---------------------------------------------------------------


def test_ties_keeps_floor_pn_largest_per_leaf():
  x = jax.random.normal(jax.random.PRNGKey(0), (100, 37))
  # k = floor(p * 3700), written out (an oracle apart from the implementation).
  for p, k in ((0.001, 3), (0.01, 37), (0.1, 370), (0.333, 1232), (0.9, 3330), (1.0, 3700)):
    y = np.asarray(sparsify.ties(x, p))
    assert (y != 0).sum() == k
    if k:
      kept = np.abs(np.asarray(x))[y != 0]
      dropped = np.abs(np.asarray(x))[y == 0]
      assert dropped.size == 0 or kept.min() >= dropped.max()
      np.testing.assert_array_equal(y[y != 0], np.asarray(x)[y != 0])


def test_ties_ties_broken_by_row_major_position():
  x = jnp.ones((4, 5))
  y = np.asarray(sparsify.ties(x, 0.35))  # k = 7 of 20 equal entries
  want = np.zeros(20)
  want[:7] = 1
  np.testing.assert_array_equal(y.reshape(-1), want)
  # a mixture: 2 strictly larger, then ties at the threshold
  x = jnp.asarray([[1.0, 3.0, 1.0], [-1.0, 5.0, 1.0]])
  y = np.asarray(sparsify.ties(x, 0.5))  # k = 3: 5, 3, then the first 1
  np.testing.assert_array_equal(y, [[1.0, 3.0, 0.0], [0.0, 5.0, 0.0]])


def test_ties_tiny_leaf_left_dense():
  x = jnp.asarray([0.5, -2.0, 1.0])
  np.testing.assert_array_equal(sparsify.ties(x, 0.3), x)  # floor(0.9) = 0
  np.testing.assert_array_equal(sparsify.ties(jnp.asarray(2.0), 0.5), 2.0)


def test_ties_sampled_is_close_to_p():
  x = jax.random.normal(jax.random.PRNGKey(1), (1024, 512))
  for p in (0.01, 0.1, 0.5):
    kept = float((sparsify.ties(x, p, "sampled") != 0).mean())
    assert abs(kept - p) <= 0.05 * p, (kept, p)


def _structured_leaves():
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  layers = normal(8, 256, 256) * (2.0 ** np.arange(8, dtype=np.float32))[:, None, None]
  small_rows = normal(4096, 1024)
  small_rows[::16] *= 1e-3
  large_rows = normal(4096, 1024)
  large_rows[::16] *= 1e3
  small_cols = normal(1024, 4096)
  small_cols[:, ::16] *= 1e-3
  # Embeddings: a few frequent tokens' rows move far more than the rare ones'.
  embedding = normal(32000, 256)
  embedding[:500] *= 30.0
  embedding[500:4000] *= 3.0
  return {
    "layer_scales": layers,
    "small_rows": small_rows,
    "large_rows": large_rows,
    "small_cols": small_cols,
    "embedding": embedding,
  }


@pytest.mark.parametrize("name", sorted(_structured_leaves()))
def test_ties_sampled_bound_holds_on_structured_leaves(name):
  x = jnp.asarray(_structured_leaves()[name])
  n = x.size
  s = sparsify.trim.SAMPLE_SIZE
  for p in (0.01, 0.1):
    kept = int(jnp.sum(_ties_mask_jit(x, p, "sampled"))) / n
    # Three standard deviations of the documented bound.
    bound = 3 * math.sqrt((1 - p) / (p * s))
    assert abs(kept / p - 1) <= bound, (name, p, kept)


_ties_jit = jax.jit(sparsify.ties, static_argnums=(1, 2))
_ties_mask_jit = jax.jit(sparsify.ties_mask, static_argnums=(1, 2))


@settings(max_examples=12, deadline=None)
@given(
  shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
  p=st.floats(0.01, 1.0),
  levels=st.integers(1, 5),
  seed=st.integers(0, 2**16),
)
def test_ties_exact_count_property(shape, p, levels, seed):
  # few distinct magnitudes: ties at the threshold are the common case
  x = jax.random.randint(jax.random.PRNGKey(seed), shape, -levels, levels + 1).astype(jnp.float32)
  n = math.prod(shape)
  # Exact arithmetic, away from the ulp where the float64 product's rounding decides.
  exact = fractions.Fraction(p) * n
  assume(abs(exact - round(exact)) > 1e-9 or exact == round(exact))
  k = math.floor(exact)
  y = np.asarray(_ties_jit(x, p, "exact"))
  if k < 1:
    np.testing.assert_array_equal(y, x)
    return
  nonzero_x = int((np.asarray(x) != 0).sum())
  assert (y != 0).sum() == min(k, nonzero_x) or (y != 0).sum() == k
  # ranking by (|x| desc, position asc): the kept set is exactly the first k
  flat = np.asarray(x).reshape(-1)
  order = np.lexsort((np.arange(n), -np.abs(flat)))
  want = np.zeros(n, bool)
  want[order[:k]] = True
  np.testing.assert_array_equal(y.reshape(-1), np.where(want, flat, 0))


@settings(max_examples=10, deadline=None)
@given(
  shape=st.lists(st.integers(1, 12), min_size=0, max_size=3),
  p=st.floats(0.05, 1.0),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  method=st.sampled_from(["dare", "ties"]),
  merge_every=st.integers(1, 3),
)
def test_merge_keeps_dtype_shape_and_finiteness(shape, p, dtype, method, merge_every):
  params = {"x": jnp.ones(shape, dtype)}
  tau = {"x": jnp.full(shape, 0.5, dtype)}
  tx = om.online_merge(tau, method=method, reserve_p=p, alpha=0.1, merge_every=merge_every)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    out, state = update({"x": jnp.full(shape, -0.01, dtype)}, state, params)
    assert out["x"].dtype == dtype and out["x"].shape == tuple(shape)
    chex.assert_tree_all_finite(out)


# --- consensus ---------------------------------------------------------------


def test_elections_differ_on_hand_made_case():
  # entry 0: agree; 1: update opposes and is larger in weighted terms but the
  # unweighted sum follows the (large) reference; 2: reference zero; 3: update zero.
  update = jnp.asarray([0.1, -0.5, 0.2, 0.0])
  reference = jnp.asarray([1.0, 1.0, 0.0, -2.0])
  alpha = 0.2
  ref_rule = consensus.ties_reference(update, reference, alpha)
  # elected: sign(1.1)=+, sign(0.5)=+, sign(0.2)=+, sign(-2)=-
  np.testing.assert_allclose(
    ref_rule, [0.2 * 1 + 0.8 * 0.1, 0.2 * 1.0, 0.8 * 0.2, 0.2 * -2.0], rtol=1e-6
  )
  weighted = consensus.ties_weighted(update, reference, alpha)
  # a=(0.08,-0.4,0.16,0), b=(0.2,0.2,0,-0.4): entry 1 keeps a (|-0.4| > 0.2)
  np.testing.assert_allclose(weighted, [0.28, -0.4, 0.16, -0.4], rtol=1e-6)
  # equal magnitudes with opposite signs cancel
  np.testing.assert_allclose(
    consensus.ties_weighted(jnp.asarray([1.0]), jnp.asarray([-1.0]), 0.5), [0.0]
  )


def test_onties_reference_election_drops_disagreeing_steps():
  tau = {"w": jnp.asarray([1.0, 1.0, -1.0, -1.0])}
  tx = om.online_merge(tau, method="ties", reserve_p=1.0, alpha=0.0)
  state = tx.init(tau)
  out, _ = tx.update({"w": jnp.asarray([0.01, -0.01, 0.01, -0.01])}, state)
  np.testing.assert_allclose(out["w"], [0.01, 0.0, 0.0, -0.01])


def test_linear_consensus():
  np.testing.assert_allclose(consensus.linear(jnp.asarray([2.0]), jnp.asarray([4.0]), 0.25), [2.5])


# --- step-K ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_step_k_matches_algorithm_2_over_cycles(method):
  """Replay Algorithm 2 by hand with the same (deterministic per step) sparsifier."""
  k, steps, alpha, p = 3, 10, 0.3, 0.4
  tau = {"w": jax.random.normal(jax.random.PRNGKey(1), (8, 8))}
  deltas = [
    {"w": jax.random.normal(jax.random.PRNGKey(10 + t), (8, 8)) * 0.1} for t in range(steps)
  ]
  tx = om.online_merge(tau, method=method, alpha=alpha, reserve_p=p, merge_every=k, clip=None)
  state = tx.init(tau)
  reference = state.reference["w"]
  update = jax.jit(tx.update)

  @jax.jit
  def by_hand(total, t):
    if method == "ties":
      return consensus.ties_reference(sparsify.ties(total, p), reference, alpha)
    sparse = sparsify.dare(total, p, seed=0, stream=0, step=t, leaf_index=0)
    return consensus.linear(sparse, reference, alpha)

  acc = jnp.zeros((8, 8))
  for t, d in enumerate(deltas):
    out, state = update(d, state)
    if (t + 1) % k:
      want = d["w"]
      acc = acc + d["w"]
    else:
      total = d["w"] + acc
      merged = by_hand(total, t)
      want = merged - acc
      acc = jnp.zeros((8, 8))
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-7, err_msg=f"step {t}")
    np.testing.assert_allclose(state.accumulator["w"], acc, rtol=1e-5, atol=1e-7)


def test_step_k_updates_every_parameter_on_plain_steps():
  # The public PyTorch code returns after the first parameter on plain steps.
  params = _tree(11)
  tau = _tree(12, 0.1)
  tx = om.online_merge(tau, merge_every=4)
  updates = jax.tree.map(jnp.ones_like, params)
  out, _ = tx.update(updates, tx.init(params), params)
  chex.assert_trees_all_equal(out, updates)


# --- composition with optax and flax ------------------------------------------


def test_no_recompilation_and_extra_args():
  params = _tree(13)
  tx = om.onties(1e-3, _tree(14, 0.1), reserve_p=0.1, merge_every=2, track_stats=True)
  traces = []

  @jax.jit
  def step(params, state, i):
    traces.append(1)
    updates, state = tx.update(_grads(params, i), state, params, loss=i, obj_fn=jnp.sum)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(4):
    params, state = step(params, state, i)
  assert len(traces) == 1
  assert isinstance(tx, optax.GradientTransformationExtraArgs)


def test_eval_shape_init_and_placeholder():
  params = _tree(15)
  tau = _tree(16)
  tx = om.ondare(1e-3, tau, merge_every=2, reference_dtype=jnp.bfloat16)
  abstract = jax.eval_shape(tx.init, params)
  concrete = tx.init(params)
  chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)
  merge_state = concrete[2]
  assert jax.tree.leaves(merge_state.reference)[0].dtype == jnp.bfloat16
  # optax.tree.map_params calls init with a placeholder instead of params
  mapped = optax.tree.map_params(tx, lambda x: jnp.zeros(x.shape, jnp.int8), concrete)
  assert jax.tree.leaves(mapped[2].reference)[0].dtype == jnp.int8
  assert mapped[2].count.dtype == jnp.int32


def test_placeholder_init_keeps_the_stats():
  # docs/pod.md shards the state with map_params; with track_stats the
  # placeholder's state must have the stats too, or the trees differ.
  params = _tree(15)
  tx = om.onties(1e-3, _tree(16), merge_every=2, track_stats=True)
  state = jax.eval_shape(tx.init, params)
  mapped = optax.tree.map_params(
    tx.init,
    lambda _, s: "params",
    state,
    jax.tree.map(lambda _: None, params),
    transform_non_params=lambda _: "other",
  )
  stats = mapped[2].stats
  assert isinstance(stats, om.MergeStats) and set(jax.tree.leaves(stats)) == {"other"}
  assert set(jax.tree.leaves(mapped[2].reference)) == {"params"}


def test_bfloat16_params_keep_dtype():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(17))
  tau = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _tree(18, 0.1))
  for tx in (
    om.ondare(1e-2, tau, reserve_p=0.5),
    om.onties(1e-2, tau, reserve_p=0.5, weight_decay=0.1),
  ):
    new, _ = _run(tx, params, 3)
    chex.assert_trees_all_equal_dtypes(new, params)
    chex.assert_tree_all_finite(new)


def test_alpha_schedule_and_inject_hyperparams():
  params = _tree(19)
  tau = _tree(20, 0.1)
  alpha = optax.linear_schedule(0.0, 0.5, 10)
  got, _ = _run(om.ondare(1e-2, tau, alpha=alpha, reserve_p=0.5), params, 5)
  static = ("reserve_p", "merge_every")
  tx = optax.inject_hyperparams(om.ondare, static_args=static)(
    learning_rate=1e-2, reference_delta=tau, alpha=alpha, reserve_p=0.5
  )
  injected, state = _run(tx, params, 5)
  chex.assert_trees_all_close(got, injected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.hyperparams["alpha"], 0.5 * 4 / 10, rtol=1e-6)
  # TIES's k with reserve_p static under inject_hyperparams: the plain transform's.
  merge = optax.inject_hyperparams(om.online_merge, static_args=static)(
    reference_delta=tau, method="ties", reserve_p=0.25, alpha=0.1
  )
  got_inj, _ = _run(optax.chain(optax.adam(1e-2), merge), params, 3)
  plain = om.online_merge(tau, method="ties", reserve_p=0.25, alpha=0.1)
  want, _ = _run(optax.chain(optax.adam(1e-2), plain), params, 3)
  chex.assert_trees_all_equal(got_inj, want)
  # Injected (an array, rounded to the params' dtype), it is refused by name.
  for name in static:
    tx = optax.inject_hyperparams(om.ondare, static_args=tuple(set(static) - {name}))(1e-2, tau)
    with pytest.raises(
      TypeError, match=rf"{name} must be a Python number, got ArrayImpl.*static_args"
    ):
      tx.init(params)


def test_multisteps_chain_masked_apply_if_finite():
  params = _tree(21)
  tau = _tree(22, 0.1)
  base = lambda: om.ondare(1e-2, tau, reserve_p=0.5, alpha=0.01)
  # MultiSteps(every 2) on repeated grads == the plain optimizer on those grads
  ms = optax.MultiSteps(base(), every_k_schedule=2)
  state, plain_state = ms.init(params), base().init(params)
  p_ms, p_plain = params, params
  for i in range(3):
    g = _grads(p_plain, i)
    for _ in range(2):
      u, state = ms.update(g, state, p_ms)
      p_ms = optax.apply_updates(p_ms, u)
    u, plain_state = base().update(g, plain_state, p_plain)
    p_plain = optax.apply_updates(p_plain, u)
  chex.assert_trees_all_close(p_ms, p_plain, rtol=1e-5, atol=1e-6)
  # masked: only "dense" is merged, "head" gets plain sgd
  mask = {"dense": True, "head": False}
  tx = optax.chain(optax.masked(om.online_merge(tau, alpha=0.0, reserve_p=0.5), mask))
  state = tx.init(params)
  g = jax.tree.map(jnp.ones_like, params)
  out, state = tx.update(g, state, params)
  chex.assert_trees_all_equal(out["head"], g["head"])
  assert 0.3 < float(jnp.mean(out["dense"]["w"] != 0)) < 0.7
  # apply_if_finite: a NaN gradient skips the step and keeps the state
  tx = optax.apply_if_finite(base(), max_consecutive_errors=3)
  state = tx.init(params)
  bad = jax.tree.map(lambda x: x * jnp.nan, params)
  out, new_state = jax.jit(tx.update)(bad, state, params)
  chex.assert_trees_all_equal(out, jax.tree.map(jnp.zeros_like, params))
  chex.assert_trees_all_equal(new_state.inner_state, state.inner_state)


def test_flax_nnx_optimizer():
  from flax import nnx

  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
  sft = nnx.state(model, nnx.Param)
  base = jax.tree.map(lambda x: x * 0.9, sft)
  tau = om.reference_delta(sft, base)
  optimizer = nnx.Optimizer(
    model, om.onties(1e-2, tau, reserve_p=0.5, track_stats=True), wrt=nnx.Param
  )
  x = jnp.ones((3, 6))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  before = model.kernel[...].copy()
  step(model, optimizer)
  step(model, optimizer)
  assert not np.allclose(before, model.kernel[...])
  stats = om.merge_stats(optimizer.opt_state)
  assert 0.4 <= float(stats.kept_fraction) <= 0.6


def test_merge_stats_values():
  tau = {"w": jnp.asarray([1.0, -1.0, 1.0, -1.0])}
  tx = om.online_merge(tau, method="ties", reserve_p=1.0, alpha=0.5, track_stats=True)
  update = {"w": jnp.asarray([2.0, 2.0, -2.0, 0.0])}
  out, state = tx.update(update, tx.init(tau))
  stats = om.merge_stats(state)
  assert float(stats.kept_fraction) == 1.0  # F kept every entry at p = 1, the zero too
  assert float(stats.sign_agreement) == pytest.approx(1 / 3)
  assert float(stats.update_norm) == pytest.approx(math.sqrt(12))
  assert float(stats.merged_norm) == pytest.approx(float(jnp.linalg.norm(out["w"])))
  with pytest.raises(ValueError, match="track_stats"):
    om.merge_stats(om.online_merge(tau).init(tau))


def test_merge_stats_kept_fraction_counts_what_f_kept():
  # Half the entries are zero: F's mask, not the non-zero count, is reported.
  x = jnp.asarray([[3.0, 0.0, -1.0, 0.0], [0.0, 2.0, 0.0, 0.5]])
  for method, p in (("ties", 0.75), ("dare", 0.5)):
    tx = om.online_merge({"w": x}, method=method, reserve_p=p, track_stats=True)
    _, state = tx.update({"w": x}, tx.init({"w": x}))
    if method == "ties":
      want = 6 / 8  # floor(0.75 * 8) entries, two of them zero
    else:
      want = float(jnp.mean(sparsify.dare_keep_mask(x.shape, p, 0, sparsify.UPDATE_STREAM, 0, 0)))
    assert float(om.merge_stats(state).kept_fraction) == want


def test_l1_rescale_values_by_hand():
  x = jnp.asarray([3.0, -1.0, 0.5, -2.0])
  zero = {"w": jnp.zeros(4)}
  # TIES at p = 0.5 keeps 3 and -2, then scales by |x|_1 / (|F(x)|_1 + 1e-8).
  tx = om.online_merge(zero, method="ties", reserve_p=0.5, alpha=0.0, rescale=True)
  out, _ = tx.update({"w": x}, tx.init(zero))
  factor = np.float32(6.5) / (np.float32(5.0) + np.float32(1e-8))
  np.testing.assert_array_equal(out["w"], np.float32([3.0 * factor, 0, 0, -2.0 * factor]))
  # DARE scales survivors by 1/p first, and clips after the rescale.
  tx = om.online_merge(zero, method="dare", reserve_p=0.5, alpha=0.0, rescale=True, clip=1.5)
  out, _ = tx.update({"w": x}, tx.init(zero))
  keep = np.asarray(sparsify.dare_keep_mask((4,), 0.5, 0, sparsify.UPDATE_STREAM, 0, 0))
  sparse = np.where(keep, np.asarray(x) / 0.5, 0)
  factor = np.float32(6.5) / (np.float32(np.abs(sparse).sum()) + np.float32(1e-8))
  np.testing.assert_allclose(out["w"], np.clip(sparse * factor, -1.5, 1.5), rtol=1e-6)
  # A leaf whose |x|_1 is below 1e-8 is not rescaled.
  tiny = jnp.asarray([1e-9, 0.0, 0.0, 0.0])
  tx = om.online_merge(zero, method="ties", reserve_p=0.25, alpha=0.0, rescale=True)
  out, _ = tx.update({"w": tiny}, tx.init(zero))
  np.testing.assert_array_equal(out["w"], tiny)


# --- reference delta and offline merges ---------------------------------------


def test_reference_delta_values_and_dtype():
  sft = {"a": jnp.asarray([1.5, 2.0], jnp.bfloat16)}
  base = {"a": jnp.asarray([1.0, 3.0], jnp.bfloat16)}
  tau = om.reference_delta(sft, base)
  np.testing.assert_allclose(np.asarray(tau["a"], np.float32), [0.5, -1.0])
  assert tau["a"].dtype == jnp.bfloat16
  assert om.reference_delta(sft, base, dtype=jnp.float32)["a"].dtype == jnp.float32


def test_offline_merges():
  base = {"w": jnp.zeros(4)}
  m1 = {"w": jnp.asarray([1.0, -2.0, 3.0, 0.5])}
  m2 = {"w": jnp.asarray([-1.0, -1.0, 1.0, 4.0])}
  np.testing.assert_allclose(
    om.offline.linear(base, [m1, m2], [0.5, 0.25])["w"], [0.25, -1.25, 1.75, 1.25]
  )
  # TIES density 1: sign of the weighted sum (a zero sum elects +), weighted
  # mean of the agreeing entries
  merged = om.offline.ties(base, [m1, m2], [0.5, 0.5], density=1.0)["w"]
  np.testing.assert_allclose(merged, [1.0, -1.5, 2.0, 2.25], atol=1e-6)
  # TIES density 0.5 trims each model to its two largest entries first:
  # m1 -> [0, -2, 3, 0], m2 -> [-1, 0, 0, 4] (the tie at |1| goes to position 0)
  merged = om.offline.ties(base, [m1, m2], density=0.5)["w"]
  np.testing.assert_allclose(merged, [-1.0, -2.0, 3.0, 4.0], atol=1e-6)
  # DARE density 1 is linear; density < 1 is unbiased
  np.testing.assert_allclose(om.offline.dare(base, [m1], [1.0], density=1.0)["w"], m1["w"])
  big = {"w": jnp.ones((256, 256))}
  d = om.offline.dare({"w": jnp.zeros((256, 256))}, [big], [1.0], density=0.3)["w"]
  assert abs(float(d.mean()) - 1.0) < 0.02 and abs(float((d != 0).mean()) - 0.3) < 0.01


# --- stacked leaves: TIES per slice (SPEC 13) ----------------------------------


def _per_slice(fn, x, stacked):
  if stacked == 0:
    return fn(x)
  return jnp.stack([_per_slice(fn, x[i], stacked - 1) for i in range(x.shape[0])])


@pytest.mark.parametrize("topk", ["exact", "sampled"])
@pytest.mark.parametrize(
  "shape,stacked,levels",
  [
    ((3, 40, 30), 1, 0),  # layers of different scales
    ((2, 3, 7, 5), 2, 2),  # two stacked axes, many ties
    ((2, 640, 512), 1, 0),  # slices large enough for the bracketed top-k
  ],
)
def test_ties_trims_each_stacked_slice_on_its_own(topk, shape, stacked, levels):
  key = jax.random.PRNGKey(len(shape))
  if levels:
    x = jax.random.randint(key, shape, -levels, levels + 1).astype(jnp.float32)
  else:
    x = jax.random.normal(key, shape) * 10.0 ** jnp.arange(shape[0])[:, None, None]
  got = jax.jit(sparsify.ties, static_argnums=(1, 2, 3))(x, 0.05, topk, stacked)
  want = _per_slice(lambda s: sparsify.ties(s, 0.05, topk), x, stacked)
  np.testing.assert_array_equal(got, want)
  if topk == "exact":
    slices = math.prod(shape[:stacked])
    assert int(jnp.sum(got != 0)) <= slices * math.floor(0.05 * math.prod(shape[stacked:]))


@pytest.mark.parametrize("topk", ["exact", "sampled"])
def test_onties_with_stacked_axes_equals_separate_layers(topk):
  layers = 3
  rng = np.random.default_rng(0)
  scales = np.asarray([1.0, 10.0, 100.0], np.float32)[:, None, None]
  w = jnp.asarray(rng.standard_normal((layers, 16, 8)).astype(np.float32) * scales)
  emb = jnp.asarray(rng.standard_normal((10, 8)).astype(np.float32))
  stacked = {"layers": {"w": w}, "emb": emb}
  separate = {"layers": {f"w{i}": w[i] for i in range(layers)}, "emb": emb}
  unstack = lambda t: {
    "layers": {f"w{i}": t["layers"]["w"][i] for i in range(layers)},
    "emb": t["emb"],
  }
  tau_s, tau_u = jax.tree.map(lambda x: 0.1 * x, (stacked, separate))
  grads = jax.tree.map(lambda x: jnp.sin(x), stacked)
  kw = dict(alpha=0.2, reserve_p=0.1, topk=topk)
  tx = om.onties(1e-2, tau_u, **kw)
  # Jitted like the stacked run: Adam's first step ties every |update| at lr
  # up to rounding, and the tie-break must see the same rounding.
  want, _ = jax.jit(tx.update)(unstack(grads), tx.init(separate), separate)
  # The three ways of saying it: a callable, a pytree, an int for a tree of stacked leaves.
  for spec in (
    lambda path, leaf: 1 if "layers" in jax.tree_util.keystr(path) else 0,
    {"layers": {"w": 1}, "emb": 0},
  ):
    tx = om.onties(1e-2, tau_s, stacked_axes=spec, **kw)
    got, _ = jax.jit(tx.update)(grads, tx.init(stacked), stacked)
    if topk == "sampled":
      # The unstacked leaf's sample comes from Adam's moments (see
      # test_onties_sampled_alias_is_the_chain_bit_for_bit): its rounding may
      # differ by one ulp between two programs, which on this tied first step
      # moves entries; the stacked leaf's selection is the point here.
      chex.assert_trees_all_equal(unstack(got)["layers"], want["layers"])
    else:
      chex.assert_trees_all_equal(unstack(got), want)
  tx = om.online_merge({"w": w}, method="ties", stacked_axes=1, reserve_p=0.1, topk=topk)
  got, _ = tx.update({"w": grads["layers"]["w"]}, tx.init({"w": w}))
  tx = om.online_merge(separate["layers"], method="ties", reserve_p=0.1, topk=topk)
  want, _ = tx.update(unstack(grads)["layers"], tx.init(separate["layers"]))
  chex.assert_trees_all_equal({f"w{i}": got["w"][i] for i in range(layers)}, want)


def test_offline_ties_with_stacked_axes_equals_separate_layers():
  rng = np.random.default_rng(1)
  scales = np.asarray([1.0, 10.0, 100.0], np.float32)[:, None]
  base = {"w": jnp.zeros((3, 40))}
  models = [
    {"w": jnp.asarray(rng.standard_normal((3, 40)).astype(np.float32) * scales)} for _ in range(2)
  ]
  got = om.offline.ties(base, models, density=0.2, stacked_axes=1)["w"]
  for i in range(3):
    want = om.offline.ties({"w": base["w"][i]}, [{"w": m["w"][i]} for m in models], density=0.2)
    np.testing.assert_array_equal(got[i], want["w"])
  # Without the declaration the largest layer takes the other layers' slots.
  whole = om.offline.ties(base, models, density=0.2)["w"]
  assert int(jnp.sum(whole[0] != 0)) == 0 < int(jnp.sum(got[0] != 0))


def test_stacked_axes_errors_name_the_leaf():
  tau = {"layers": {"w": jnp.ones((3, 4, 5))}, "b": jnp.ones(5)}
  with pytest.raises(
    ValueError,
    match=r"stacked_axes\['b'\] must be an integer in \[0, 1\] for a leaf of shape \(5,\), got 2",
  ):
    om.onties(1e-3, tau, stacked_axes=2)
  with pytest.raises(
    ValueError, match=r"stacked_axes\['layers'\]\['w'\] must be an integer in \[0, 3\].*got -1"
  ):
    om.online_merge(tau, method="ties", stacked_axes=lambda path, leaf: -1 if leaf.ndim == 3 else 0)
  with pytest.raises(
    ValueError, match=r"stacked_axes must be an integer, a callable .* structure of reference_delta"
  ):
    om.online_merge(tau, method="ties", stacked_axes={"layers": 1})
  with pytest.raises(ValueError, match=r"stacked_axes\['w'\] must be an integer in \[0, 1\]"):
    om.offline.ties({"w": jnp.zeros(4)}, [{"w": jnp.ones(4)}], density=0.5, stacked_axes=3)


def test_step_k_statistics_with_masked_leaves():
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}
  tau = jax.tree.map(lambda x: 0.1 * x, params)
  merge = om.online_merge(tau, reserve_p=0.5, merge_every=2, track_stats=True)
  tx = optax.masked(merge, {"w": True, "b": False})
  state = tx.init(params)
  _, state = jax.jit(tx.update)(params, state)  # a plain step: every entry applied
  assert float(om.merge_stats(state).kept_fraction) == 1.0
  _, state = jax.jit(tx.update)(params, state)  # a merge step (count 1) of "w" alone
  # "w" is leaf 1 of the reference delta ("b", "w"): its DARE mask at step 1.
  want = float(jnp.mean(sparsify.dare_keep_mask((3, 4), 0.5, 0, sparsify.UPDATE_STREAM, 1, 1)))
  assert float(om.merge_stats(state).kept_fraction) == pytest.approx(want, abs=1e-7)
  assert 0.0 < want < 1.0


# --- onties(topk="sampled") samples Adam's moments, not its update --------------


def _onties_as_chain(lr, tau, weight_decay, **kw):
  """The same optimizer as `om.onties`, as a plain chain (the update is sampled)."""
  parts = [
    optax.scale_by_adam(),
    optax.scale_by_learning_rate(lr),
    om.online_merge(tau, method="ties", **kw),
  ]
  if weight_decay:
    parts.append(om.decoupled_weight_decay(lr, weight_decay))
  return optax.chain(*parts)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_onties_sampled_alias_is_the_chain_bit_for_bit(weight_decay):
  # The alias evaluates Adam's formula on the moments' sample and again in the
  # final loop. XLA may round the two differently in the last bit (it does on
  # Adam's tied first step in another program, see the stacked test), which
  # could move an entry within an ulp of the threshold; here, after warm-up,
  # no entry moves. One leaf above the sample size (a real sample) and two
  # below (their own sample).
  rng = np.random.default_rng(0)
  shapes = {"big": (600, 512), "small": (24, 16), "scalar": ()}
  params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
  tau = jax.tree.map(lambda x: 0.01 * jnp.cos(x), params)
  lr = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6)
  kw = dict(alpha=0.1, reserve_p=0.02, topk="sampled", track_stats=True)
  fused = om.onties(lr, tau, weight_decay=weight_decay, **kw)
  chain = _onties_as_chain(lr, tau, weight_decay, **kw)
  assert jax.tree.structure(fused.init(params)) == jax.tree.structure(chain.init(params))

  def run(tx):
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    p, s = params, tx.init(params)
    for t in range(4):
      g = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)) * (1 + 99 * (x > 1.5)), p)
      u, s = step(p, s, g)
      p = optax.apply_updates(p, u)
    return p, s

  got, want = run(fused), run(chain)
  chex.assert_trees_all_equal(got, want)
  assert 0.015 < float(om.merge_stats(got[1]).kept_fraction) < 0.025


def _grown_temporaries(make_tx):
  """How much a donated, jitted step's temporary buffers grow when a leaf grows by 4 MB."""

  def temporaries(rows):
    params = {"w": jnp.ones((rows, 1024))}
    tx = make_tx({"w": jnp.full((rows, 1024), 0.01)})

    def step(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    compiled = step.lower(params, tx.init(params), params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  return temporaries(2048) - temporaries(1024)


def test_onties_sampled_alias_does_not_write_the_update_out():
  # The chain's sample reads Adam's update, so XLA writes it out: temporaries
  # that grow with the leaf. The alias samples the moments instead: its
  # temporaries (sample, histograms) do not grow with the leaf.
  kw = dict(reserve_p=0.01, topk="sampled")
  added_bytes = 4 * 1024 * 1024
  assert _grown_temporaries(lambda tau: _onties_as_chain(1e-3, tau, 0.0, **kw)) >= added_bytes
  assert _grown_temporaries(lambda tau: om.onties(1e-3, tau, **kw)) < added_bytes / 8


def test_ondare_step_writes_no_parameter_sized_temporary():
  # Adam's update, the mask, the merge and weight decay fuse into one loop:
  # a second read of the update in that loop (e.g. a where() to keep NaNs)
  # makes XLA write the update out, and OnDARE ran at 1.8x AdamW.
  grown = _grown_temporaries(lambda tau: om.ondare(1e-3, tau, weight_decay=1e-4))
  assert grown < 4 * 1024 * 1024 / 8, grown
