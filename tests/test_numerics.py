"""Numerics at the edges: zeros, tiny and huge leaves, low and high precision, NaN steps."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omerge_jax
from omerge_jax import sparsify

# ---------------------------------------------------------------------------
# Zeros: no 0/0 anywhere, with or without the L1 rescale.


@pytest.mark.parametrize("method,rescale", [("dare", False), ("dare", True), ("ties", True)])
def test_zero_updates_and_zero_reference_give_zero_update(method, rescale):
  zeros = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5), "s": jnp.zeros([])}
  tx = omerge_jax.online_merge(
    zeros,
    method=method,
    alpha=0.3,
    reserve_p=0.5,
    rescale=rescale,
    merge_every=2,
    track_stats=True,
  )
  state = jax.jit(tx.init)(zeros)
  update = jax.jit(tx.update)
  for _ in range(2):  # a plain step-K step, then a merge step
    updates, state = update(zeros, state)
    chex.assert_trees_all_equal(updates, zeros)
  chex.assert_tree_all_finite(state)
  stats = omerge_jax.merge_stats(state)
  # F still keeps (zero) entries, the ones its mask keeps at step 1; no sign can agree.
  if method == "ties":  # floor(p n) of b (5), w (20); the scalar s stays dense
    want = (2 + 10 + 1) / 26
  else:  # leaves in order b, s, w
    masks = [
      sparsify.dare_keep_mask(x.shape, 0.5, 0, sparsify.UPDATE_STREAM, 1, i)
      for i, x in enumerate(jax.tree.leaves(zeros))
    ]
    want = sum(float(jnp.sum(m)) for m in masks) / 26
  assert float(stats.kept_fraction) == pytest.approx(want, abs=1e-7)
  assert float(stats.sign_agreement) == 0.0


@pytest.mark.parametrize("alias", [omerge_jax.ondare, omerge_jax.onties])
def test_zero_gradients_on_an_all_zero_leaf_stay_finite(alias):
  params = {"w": jnp.zeros((3, 4)), "v": jnp.linspace(-1.0, 1.0, 6)}
  tau = {"w": jnp.zeros((3, 4)), "v": jnp.full(6, 0.02)}
  tx = alias(1e-2, tau, alpha=0.1, reserve_p=0.5, rescale=True, track_stats=True)
  state = jax.jit(tx.init)(params)
  grads = {"w": jnp.zeros((3, 4)), "v": jnp.zeros(6)}
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  chex.assert_tree_all_finite((params, state))
  # Adam's step of a zero gradient is 0/(0 + eps) = 0 and the reference of
  # "w" is zero: nothing may move it.
  np.testing.assert_array_equal(params["w"], np.zeros((3, 4)))


# ---------------------------------------------------------------------------
# Tiny leaves: scalars, one element, zero elements.


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_tiny_leaves(method):
  tau = {
    "scalar": jnp.float32(0.5),
    "one": jnp.array([-0.25]),
    "empty": jnp.zeros((3, 0)),
  }
  updates = {"scalar": jnp.float32(0.1), "one": jnp.array([0.2]), "empty": jnp.zeros((3, 0))}
  tx = omerge_jax.online_merge(tau, method=method, alpha=0.5, reserve_p=0.5, track_stats=True)
  state = jax.jit(tx.init)(tau)
  out, state = jax.jit(tx.update)(updates, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(out, updates)
  chex.assert_tree_all_finite((out, state))
  if method == "ties":
    # floor(0.5 * 1) = 0 < 1: a one-element leaf is not trimmed (SPEC 3);
    # the reference election keeps what agrees with sign(tau + update).
    np.testing.assert_allclose(out["scalar"], 0.5 * 0.5 + 0.5 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(out["one"], [0.5 * -0.25], rtol=1e-6)


def test_one_element_leaf_dare_mask_is_bernoulli():
  # A scalar leaf still gets a fresh mask per step, kept with probability p.
  mask = lambda t: sparsify.dare_keep_mask((), 0.3, seed=0, stream=0, step=t, leaf_index=0)
  kept = np.asarray(jax.vmap(mask)(jnp.arange(2000)))
  assert abs(np.mean(kept) - 0.3) < 5 * np.sqrt(0.3 * 0.7 / 2000)


# ---------------------------------------------------------------------------
# Huge leaves (> 2**32 entries): no 32-bit index or count may overflow.
# Checked on the traced program with abstract shapes; nothing is allocated.

HUGE = (2**16 + 1, 2**16)  # 2**32 + 2**16 entries


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "eqns"):
        yield v
      elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
        yield v.jaxpr


def _int_max(aval):
  dtype = np.dtype(aval.dtype)
  return np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else None


def index_overflows(jaxpr):
  """Equations that count or index more entries than their integer type holds.

  An iota along an axis longer than its type's max, an integer sum, cumsum or
  scatter-add over more terms than that max, an argmax over such an axis.
  """
  found = []
  for eqn in jaxpr.eqns:
    for sub in _subjaxprs(eqn):
      found += index_overflows(sub)
    name = eqn.primitive.name
    out = eqn.outvars[0].aval
    limit = _int_max(out)
    if name == "iota":
      terms = eqn.params["shape"][eqn.params["dimension"]]
    elif name == "reduce_sum":
      terms = np.prod(eqn.invars[0].aval.shape) // max(np.prod(out.shape), 1)
    elif name == "cumsum":
      terms = eqn.invars[0].aval.shape[eqn.params["axis"]]
    elif name == "scatter-add":
      terms = np.prod(eqn.invars[2].aval.shape)
    elif name in ("argmax", "argmin"):
      terms = eqn.invars[0].aval.shape[eqn.params["axes"][0]]
    else:
      continue
    if limit is not None and terms > limit:
      found.append(f"{name} over {terms} terms into {out.dtype}")
  return found


def test_overflow_check_catches_a_32_bit_count():
  x = jax.ShapeDtypeStruct(HUGE, jnp.float32)
  count = jax.make_jaxpr(lambda x: jnp.sum(x != 0, dtype=jnp.uint32))(x)
  flat_index = jax.make_jaxpr(lambda x: jnp.argmax(x.reshape(-1)))(x)
  assert index_overflows(count.jaxpr) and index_overflows(flat_index.jaxpr)
  fine = jax.make_jaxpr(lambda x: jnp.sum(x != 0, dtype=jnp.float32))(x)
  assert not index_overflows(fine.jaxpr)


def _update_jaxpr(alias, shape=HUGE, **kwargs):
  """The traced ``alias(...).update`` on a leaf of ``shape`` entries, and its state."""
  huge = {
    "huge": jax.ShapeDtypeStruct(shape, jnp.bfloat16),
    "b": jax.ShapeDtypeStruct((3,), jnp.float32),
  }
  # The optimizer is built inside the traced functions: its reference delta
  # is then abstract too.
  init = lambda tau, params: alias(1e-3, tau, reserve_p=0.01, **kwargs).init(params)
  state = jax.eval_shape(init, huge, huge)

  def update(tau, updates, state, params):
    return alias(1e-3, tau, reserve_p=0.01, **kwargs).update(updates, state, params)

  return jax.make_jaxpr(update)(huge, huge, state, huge), update, huge, state


@pytest.mark.parametrize(
  "resample_reference,track_stats",
  [
    (False, False),
    (True, False),
    (False, True),
  ],
)
def test_dare_on_a_leaf_of_more_than_2_to_32_entries(resample_reference, track_stats):
  jaxpr, update, huge, state = _update_jaxpr(
    omerge_jax.ondare,
    merge_every=2,
    resample_reference=resample_reference,
    track_stats=track_stats,
  )
  assert not index_overflows(jaxpr.jaxpr)
  out, new_state = jax.eval_shape(update, huge, huge, state, huge)
  assert out["huge"].shape == HUGE and out["huge"].dtype == jnp.bfloat16
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  jax.jit(update).lower(huge, huge, state, huge)  # lowers without allocating


@pytest.mark.parametrize("topk", ["exact", "sampled"])
def test_ties_on_a_leaf_of_more_than_2_to_31_entries(topk):
  # Between int32's and uint32's range: counts must not pass through int32.
  jaxpr, update, huge, state = _update_jaxpr(
    omerge_jax.onties, shape=(2**16, 2**15 + 1), topk=topk, merge_every=2, track_stats=True
  )
  assert not index_overflows(jaxpr.jaxpr)
  jax.jit(update).lower(huge, huge, state, huge)  # lowers without allocating


def test_ties_refuses_a_leaf_of_2_to_32_entries_or_more():
  # TIES counts entries in uint32: a clear error at construction, not a wrong top-k.
  huge = {"b": jnp.ones(3), "huge": jax.ShapeDtypeStruct(HUGE, jnp.bfloat16)}
  for build in (
    lambda: omerge_jax.onties(1e-3, huge),
    lambda: omerge_jax.online_merge(huge, method="ties", topk="sampled"),
    lambda: omerge_jax.offline.ties(huge, [huge], density=0.5),
  ):
    with pytest.raises(ValueError, match=r"\['huge'\] has \d+ entries: TIES counts"):
      build()
  omerge_jax.ondare(1e-3, huge)  # DARE has no such limit (see above)


_element_hash = jax.jit(sparsify.element_hash, static_argnums=0)


def test_element_hash_depends_on_coordinates_only():
  # The value at (i, j) does not depend on the leaf's shape, so no flat
  # index i * ncols + j is formed: a 2**32-entry leaf hashes like a small one.
  key = (3, 0, 11, 2)  # seed, stream, step, leaf index
  small = _element_hash((3, 5), *key)
  np.testing.assert_array_equal(_element_hash((300, 5), *key)[:3], small)
  np.testing.assert_array_equal(_element_hash((3, 500), *key)[:, :5], small)
  np.testing.assert_array_equal(
    _element_hash((3, 5, 7), *key)[:2, :4, :6], _element_hash((2, 4, 6), *key)
  )


def test_element_hash_has_no_row_shift_correlation():
  rows, cols = 256, 512
  h = np.asarray(_element_hash((rows, cols), 0, 0, 0, 0))
  # A hash of i * c + j or of i + j would repeat values along shifted rows;
  # a uniform 32-bit hash has ~ n**2 / 2**33 ~ 2 collisions in n = 2**17.
  assert np.unique(h).size >= h.size - 8
  for shift in (1, -1, 7, cols - 1):
    assert np.mean(h[1:] == np.roll(h[:-1], shift, axis=1)) < 1e-3
  mask = jax.jit(sparsify.dare_keep_mask, static_argnums=0)((rows, cols), 0.5, 0, 0, 0, 0)
  mask = np.asarray(mask, np.float64)
  bound = 5 * 0.25 / np.sqrt(mask[1:].size)
  for shift in (0, 1, -1):
    corr = np.mean(mask[1:] * np.roll(mask[:-1], shift, axis=1)) - mask.mean() ** 2
    assert abs(corr) < bound, (shift, corr)
  per_row = mask.mean(axis=1)
  assert np.all(np.abs(per_row - 0.5) < 5 * 0.5 / np.sqrt(cols))


# ---------------------------------------------------------------------------
# Precision: updates come back in the params' dtype; the merge runs in float32.


LOW_PRECISION = (jnp.float16, jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_low_precision_params(method):
  tau = {
    jnp.dtype(d).name: jnp.linspace(-0.5, 0.5, 24).reshape(4, 6).astype(d) for d in LOW_PRECISION
  }
  updates = {
    jnp.dtype(d).name: jnp.linspace(0.3, -0.2, 24).reshape(4, 6).astype(d) for d in LOW_PRECISION
  }
  tx = omerge_jax.online_merge(
    tau, method=method, alpha=0.25, reserve_p=1.0, merge_every=2, clip=None, track_stats=True
  )
  state = jax.jit(tx.init)(tau)
  # reserve_p = 1 keeps every entry of both terms.
  chex.assert_trees_all_equal(state.reference, tau)
  update = jax.jit(tx.update)
  for _ in range(2):
    out, state = update(updates, state)
  assert float(omerge_jax.merge_stats(state).kept_fraction) == 1.0
  for name, u in updates.items():
    assert state.reference[name].dtype == u.dtype
    assert state.accumulator[name].dtype == jnp.float32
    assert out[name].dtype == u.dtype
    u32, t32 = u.astype(jnp.float32), tau[name].astype(jnp.float32)
    # merge(u + acc) - acc with acc = u, computed in float32, cast once.
    combine = (
      omerge_jax.consensus.linear if method == "dare" else (omerge_jax.consensus.ties_reference)
    )
    want = (combine(2 * u32, t32, 0.25) - u32).astype(u.dtype)
    # Up to XLA contracting a * b + c into one fused multiply-add (one
    # float32 rounding), then one rounding to the params' dtype.
    np.testing.assert_allclose(
      np.asarray(out[name], np.float32),
      np.asarray(want, np.float32),
      rtol=float(jnp.finfo(u.dtype).eps),
      atol=1e-7,
      err_msg=name,
    )


@pytest.mark.parametrize("alias", [omerge_jax.ondare, omerge_jax.onties])
def test_low_precision_training_stays_finite(alias):
  params = {
    jnp.dtype(d).name: jnp.linspace(-1.0, 1.0, 64).reshape(8, 8).astype(d)
    for d in (jnp.float16, jnp.bfloat16)
  }
  tau = jax.tree.map(lambda x: (0.05 * x).astype(x.dtype), params)
  # Adam keeps its moments in the params' dtype: its default eps = 1e-8 is 0
  # in float16 and a small gradient's nu underflows to 0 (0/0). That is
  # Adam's limit, not the merge's: give it an eps float16 can hold.
  tx = alias(1e-2, tau, alpha=0.05, reserve_p=0.3, eps=1e-3, track_stats=True)
  state = jax.jit(tx.init)(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(lambda x: x - 0.3, p), s, p))
  for _ in range(20):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  for name, p in params.items():
    assert p.dtype == jnp.dtype(name)
  chex.assert_tree_all_finite((params, state))


_FLOAT64_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, omerge_jax
    assert jax.config.jax_enable_x64
    tau = {"w": jnp.full((4, 4), 0.25, jnp.float64)}
    # 1 + 2**-40 is 1 in float32: only a float64 merge keeps the 2**-41.
    u = {"w": jnp.full((4, 4), 1 + 2.0**-40, jnp.float64)}
    tx = omerge_jax.online_merge(
        tau, method="dare", alpha=0.25, reserve_p=1.0, clip=None, merge_every=2)
    state = jax.jit(tx.init)(tau)
    assert state.reference["w"].dtype == jnp.float64
    assert state.accumulator["w"].dtype == jnp.float64
    out, state = jax.jit(tx.update)(u, state)
    out, state = jax.jit(tx.update)(u, state)
    assert out["w"].dtype == jnp.float64
    # merge(2u) - u = (1 - 2 alpha) u + alpha tau, exact in float64.
    want = 0.5625 + 2.0**-41
    np.testing.assert_array_equal(np.asarray(out["w"]), np.full((4, 4), want))
    params = {"w": jnp.linspace(-1, 1, 16, dtype=jnp.float64).reshape(4, 4)}
    tx = omerge_jax.ondare(1e-3, tau, reserve_p=0.5, alpha=0.1)
    state = jax.jit(tx.init)(params)
    upd, state = jax.jit(tx.update)(params, state, params)
    assert upd["w"].dtype == jnp.float64
    assert all(x.dtype in (jnp.float64, jnp.int32) for x in jax.tree.leaves(state)), state
    assert np.all(np.isfinite(np.asarray(upd["w"])))
    # TIES ranks float32 bits ([1, 1 + 2**-40] would tie): float64 is refused.
    w64 = {"w": jnp.asarray([1.0, 1.0 + 2.0**-40], jnp.float64)}
    w32 = {"w": jnp.asarray([1.0, 2.0], jnp.float32)}
    for params, tau, name in ((w64, w32, "params"), (w32, w64, "reference_delta")):
        tx = omerge_jax.online_merge(tau, method="ties", reserve_p=0.5)
        try:
            tx.init(params)
            raise AssertionError("float64 accepted")
        except TypeError as e:
            assert f"{name}['w'] is float64: TIES ranks" in str(e), e
    try:
        omerge_jax.offline.ties(w64, [w64], density=0.5)
        raise AssertionError("float64 accepted")
    except TypeError as e:
        assert "base['w'] is float64" in str(e), e
    # Both top-k routes count in uint32 under x64 too (a uint64 count broke the
    # sampled one); "big" takes the sample and the bracket, "w" is its own sample.
    w32["big"] = jnp.linspace(-1, 1, 300 * 512, dtype=jnp.float32).reshape(300, 512)
    for topk in ("exact", "sampled"):
        tx = omerge_jax.onties(1e-3, w32, reserve_p=0.5, topk=topk)
        upd, _ = jax.jit(tx.update)(w32, tx.init(w32), w32)
        assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(upd)), upd
    print("ok")
""")


def test_float64_params_under_x64():
  env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
    [sys.executable, "-c", _FLOAT64_SCRIPT],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------------------------
# Non-finite gradients under optax.apply_if_finite: the step is skipped and
# every state buffer is left exactly as it was.


def _tx(name):
  tau = {"w": jnp.linspace(-0.2, 0.3, 12).reshape(3, 4), "b": jnp.full(4, 0.01)}
  if name == "ondare":
    return omerge_jax.ondare(
      1e-2,
      tau,
      alpha=0.1,
      reserve_p=0.5,
      merge_every=3,
      resample_reference=True,
      weight_decay=0.01,
      track_stats=True,
    )
  return omerge_jax.onties(
    1e-2, tau, alpha=0.1, reserve_p=0.5, merge_every=3, weight_decay=0.01, track_stats=True
  )


@pytest.mark.parametrize("name", ["ondare", "onties"])
def test_apply_if_finite_skips_a_non_finite_step(name):
  tx = optax.apply_if_finite(_tx(name), max_consecutive_errors=5)
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
  grad = lambda p, t: jax.tree.map(lambda x: jnp.sin(x + t), p)
  update = jax.jit(tx.update)
  # Steps 1 and 2 are inside a step-K cycle, step 5 is its merge step.
  bad = {1: np.nan, 2: np.inf, 5: -np.inf}
  p, s = params, jax.jit(tx.init)(params)
  for t in range(7):
    g = grad(p, t)
    if t not in bad:
      u, s = update(g, s, p)
      p = optax.apply_updates(p, u)
      continue
    g = {"w": g["w"].at[1, 2].set(bad[t]), "b": g["b"]}
    u, new_s = update(g, s, p)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, p))
    chex.assert_trees_all_equal(new_s.inner_state, s.inner_state)
    assert int(new_s.notfinite_count) == int(s.notfinite_count) + 1
    s = new_s
  chex.assert_tree_all_finite((p, s))
  assert int(s.total_notfinite) == len(bad)
  # The skipped steps left no trace: the run equals the one that never saw them.
  clean_p, clean_s = params, jax.jit(tx.init)(params)
  for t in (0, 3, 4, 6):
    u, clean_s = update(grad(clean_p, t), clean_s, clean_p)
    clean_p = optax.apply_updates(clean_p, u)
  chex.assert_trees_all_equal(p, clean_p)
  chex.assert_trees_all_equal(s.inner_state, clean_s.inner_state)


# ---------------------------------------------------------------------------
# Non-finite updates without apply_if_finite: they surface, as under AdamW.

_BAD = {(0, 1): np.nan, (2, 3): np.inf, (3, 0): -np.inf}


def _with_bad_entries(u):
  for where, value in _BAD.items():
    u = u.at[where].set(value)
  return u


def _assert_non_finite_exactly_at_bad_entries(out):
  want = np.zeros(out.shape, bool)
  for where in _BAD:
    want[where] = True
  np.testing.assert_array_equal(~np.isfinite(np.asarray(out)), want)


_MERGES = [
  dict(method="dare"),
  dict(method="dare", rescale=True),
  dict(method="dare", resample_reference=True),
  dict(method="ties"),
  dict(method="ties", rescale=True),
  dict(method="ties", sign_election="weighted"),
  dict(method="ties", topk="sampled"),
  dict(method="ties", sign_election="weighted", rescale=True, topk="sampled"),
]


@pytest.mark.parametrize("merge_every", [1, 3])
@pytest.mark.parametrize("config", _MERGES, ids=lambda c: "-".join(map(str, c.values())))
def test_a_non_finite_update_entry_stays_non_finite(config, merge_every):
  rng = np.random.default_rng(0)
  tau = {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)}
  tx = omerge_jax.online_merge(tau, alpha=0.3, reserve_p=0.3, merge_every=merge_every, **config)
  state = tx.init(tau)
  update = jax.jit(tx.update)
  # Steps 1, 2 (plain when K = 3) and 3 (the merge step).
  for _ in range(merge_every):
    u = {"w": _with_bad_entries(jnp.asarray(rng.standard_normal((4, 5)), jnp.float32))}
    out, state = update(u, state)
    _assert_non_finite_exactly_at_bad_entries(out["w"])
    # An infinity keeps its sign.
    assert float(out["w"][2, 3]) == np.inf and float(out["w"][3, 0]) == -np.inf


@pytest.mark.parametrize("alias", [omerge_jax.ondare, omerge_jax.onties])
def test_a_nan_gradient_reaches_the_params_as_under_adamw(alias):
  params = {"w": jnp.linspace(-1.0, 1.0, 20).reshape(4, 5)}
  grads = {"w": jnp.cos(params["w"]).at[1, 1].set(jnp.nan)}
  for tx in (alias(1e-2, params, alpha=0.1, reserve_p=0.2), optax.adamw(1e-2)):
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.isnan(np.asarray(updates["w"][1, 1]))
    assert np.isfinite(np.delete(np.asarray(updates["w"]).ravel(), 6)).all()


@pytest.mark.parametrize("topk", ["exact", "sampled"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_ties_ranks_a_non_finite_entry_as_zero(topk, bad):
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 48))
  x_bad = x.at[5, 7].set(bad).at[60, 0].set(bad)
  x_zero = x.at[5, 7].set(0.0).at[60, 0].set(0.0)
  for p in (0.01, 0.3):
    got = np.asarray(sparsify.ties(x_bad, p, topk))
    want = np.asarray(sparsify.ties(x_zero, p, topk))
    np.testing.assert_array_equal(got[np.isfinite(got)], want[np.isfinite(got)])
    # The finite entries' selection is the one without the non-finite ones.
    assert np.count_nonzero(want) == np.count_nonzero(np.nan_to_num(got, posinf=0, neginf=0))


def test_l1_rescale_ignores_non_finite_entries_in_its_norms():
  dense = jnp.asarray([1.0, -2.0, jnp.nan, 4.0])
  sparse = jnp.asarray([0.0, -2.0, 0.0, 4.0])
  out = np.asarray(sparsify.l1_rescale(dense, sparse))
  np.testing.assert_allclose(out, np.asarray([0.0, -2.0, 0.0, 4.0]) * 7.0 / (6.0 + 1e-8))


# ---------------------------------------------------------------------------
# Degenerate hyper-parameters.


def _adam_run(tx, steps=6):
  params = {"w": jnp.linspace(-1.0, 1.0, 20).reshape(4, 5), "s": jnp.float32(0.3)}
  state = jax.jit(tx.init)(params)
  update = jax.jit(tx.update)
  history = []
  for t in range(steps):
    grads = jax.tree.map(lambda x, t=t: jnp.cos(3 * x + t), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history, state


def _adam(lr):
  return optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(lr))


def test_ondare_with_alpha_zero_and_reserve_one_is_adam_bit_for_bit():
  tau = {"w": jnp.full((4, 5), 0.3), "s": jnp.float32(-0.2)}
  got, _ = _adam_run(omerge_jax.ondare(1e-2, tau, alpha=0.0, reserve_p=1.0))
  want, _ = _adam_run(_adam(1e-2))
  chex.assert_trees_all_equal(got, want)


def test_ondare_with_alpha_zero_and_reserve_one_and_weight_decay_is_adamw_to_rounding():
  # The decay is added after the merge (-lr * adam - lr * wd * theta, so that it
  # is never sparsified) where optax.adamw rounds -lr * (adam + wd * theta):
  # equal to float32 rounding, not bit for bit.
  tau = {"w": jnp.full((4, 5), 0.3), "s": jnp.float32(-0.2)}
  lr = optax.cosine_decay_schedule(1e-2, 10)
  got, _ = _adam_run(omerge_jax.ondare(lr, tau, alpha=0.0, reserve_p=1.0, weight_decay=0.1))
  want, _ = _adam_run(optax.adamw(lr, weight_decay=0.1))
  chex.assert_trees_all_close(got, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("alias", [omerge_jax.ondare, omerge_jax.onties])
def test_weight_decay_is_never_sparsified(alias):
  # A zero gradient makes Adam's step zero: all that remains is weight decay,
  # which must reach every entry, unscaled, whatever reserve_p drops.
  params = {"w": jnp.linspace(0.5, 1.5, 20).reshape(4, 5), "s": jnp.float32(0.3)}
  tau = jax.tree.map(jnp.zeros_like, params)
  lr = optax.linear_schedule(1e-2, 2e-2, 4)
  tx = alias(lr, tau, alpha=0.0, reserve_p=0.1, weight_decay=0.5)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for t in range(3):
    updates, state = tx.update(zero, state, params)
    want = jax.tree.map(lambda p, t=t: -(lr(t) * 0.5 * p), params)
    chex.assert_trees_all_close(updates, want, rtol=1e-6)


def test_onties_with_zero_reference_and_reserve_one_is_adam_bit_for_bit():
  tau = {"w": jnp.zeros((4, 5)), "s": jnp.float32(0.0)}
  got, _ = _adam_run(omerge_jax.onties(1e-2, tau, alpha=0.0, reserve_p=1.0))
  want, _ = _adam_run(_adam(1e-2))
  chex.assert_trees_all_equal(got, want)


def test_merge_every_longer_than_the_run_is_adam_until_the_merge():
  steps = 6
  tau = {"w": jnp.full((4, 5), 0.3), "s": jnp.float32(-0.2)}
  got, state = _adam_run(
    omerge_jax.ondare(1e-2, tau, alpha=0.5, reserve_p=0.3, merge_every=steps + 1), steps
  )
  want, _ = _adam_run(_adam(1e-2), steps)
  chex.assert_trees_all_equal(got, want)
  # Nothing merged yet: the accumulator is the sum of the applied updates.
  merge_state = state[2]
  start = {"w": jnp.linspace(-1.0, 1.0, 20).reshape(4, 5), "s": jnp.float32(0.3)}
  drift = jax.tree.map(lambda a, b: a - b, got[-1], start)
  chex.assert_trees_all_close(merge_state.accumulator, drift, atol=1e-6)
