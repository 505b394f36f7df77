"""Bad input at every public entry point: each error names the argument or leaf path."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omerge_jax
from omerge_jax import checkpoint
from omerge_jax import offline

TAU = {"w": jnp.ones((2, 3)), "b": jnp.full(3, 0.5)}
NAN = float("nan")

# ---------------------------------------------------------------------------
# Tree structure and leaf shapes.


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_leaf_shape_differs_between_params_and_reference(method):
  tx = omerge_jax.online_merge(TAU, method=method)
  params = {"w": jnp.ones((2, 4)), "b": jnp.ones(3)}
  with pytest.raises(
    ValueError,
    match=r"reference_delta\['w'\] has shape \(2, 3\) but params\['w'\] has shape \(2, 4\)",
  ):
    tx.init(params)


@pytest.mark.parametrize(
  "params,only_params,only_reference",
  [
    ({"w": jnp.ones((2, 3))}, r"\[\]", r"\[\"\['b'\]\"\]"),
    (
      {"w": jnp.ones((2, 3)), "b": jnp.ones(3), "c": jnp.ones(1)},
      r"\[\"\['c'\]\"\]",
      r"\[\]",
    ),
  ],
)
def test_tree_structure_differs_between_params_and_reference(params, only_params, only_reference):
  tx = omerge_jax.ondare(1e-3, TAU)
  with pytest.raises(
    ValueError,
    match=r"reference_delta must have the same tree structure as params; "
    rf"leaves only in params: {only_params}, only in reference_delta: {only_reference}",
  ):
    tx.init(params)


def test_reference_delta_of_sft_and_base_with_different_shapes():
  with pytest.raises(
    ValueError, match=r"base_params\['w'\] has shape \(4,\) but sft_params\['w'\] has shape \(3,\)"
  ):
    omerge_jax.reference_delta({"w": jnp.ones(3)}, {"w": jnp.ones(4)})
  with pytest.raises(ValueError, match=r"same tree structure as sft_params.*\['b'\]"):
    omerge_jax.reference_delta({"w": jnp.ones(3), "b": jnp.ones(1)}, {"w": jnp.ones(3)})


def test_update_with_a_leaf_shape_other_than_at_init():
  tx = omerge_jax.online_merge(TAU)
  state = tx.init(TAU)
  for update in (tx.update, jax.jit(tx.update)):
    with pytest.raises(ValueError, match=r"updates\['w'\] has shape \(1, 3\).*\(2, 3\)"):
      update({"w": jnp.ones((1, 3)), "b": jnp.ones(3)}, state)


# ---------------------------------------------------------------------------
# Values.


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_model_given_to_reference_delta(bad):
  good = {"w": jnp.ones(2), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"sft_params\['b'\] has non-finite values"):
    omerge_jax.reference_delta({"w": jnp.ones(2), "b": jnp.array([1.0, bad, 0.0])}, good)
  with pytest.raises(ValueError, match=r"base_params\['w'\] has non-finite values"):
    omerge_jax.reference_delta(good, {"w": jnp.array([bad, 1.0]), "b": jnp.ones(3)})


def test_non_finite_reference_delta_is_refused_at_init():
  tau = {"w": jnp.array([1.0, NAN])}
  params = {"w": jnp.ones(2)}
  for tx in (omerge_jax.online_merge(tau), omerge_jax.onties(1e-3, tau)):
    with pytest.raises(ValueError, match=r"reference_delta\['w'\] has non-finite values"):
      tx.init(params)
    # Traced (jit, eval_shape), init sees types only: it reads no value of tau.
    assert jax.eval_shape(tx.init, params) is not None


@pytest.mark.parametrize(
  "leaf,error,message",
  [
    (1.0, TypeError, r"reference_delta\['w'\] must be an array .*got float"),
    ("abc", TypeError, r"reference_delta\['w'\] must be an array .*got str"),
    ([0.1, 0.2], TypeError, r"reference_delta\['w'\]\[0\] must be an array .*got float"),
    (
      jnp.ones(3, jnp.int32),
      TypeError,
      r"reference_delta\['w'\] must have a floating dtype, got int32",
    ),
    (None, ValueError, r"reference_delta has no array leaves"),
  ],
)
def test_reference_delta_leaves_that_are_not_float_arrays(leaf, error, message):
  for factory in (
    lambda tau: omerge_jax.online_merge(tau),
    lambda tau: omerge_jax.ondare(1e-3, tau),
    lambda tau: omerge_jax.onties(1e-3, tau),
  ):
    with pytest.raises(error, match=message):
      factory({"w": leaf})


def test_model_leaves_that_are_not_float_arrays():
  with pytest.raises(TypeError, match=r"sft_params\['w'\] must have a floating dtype, got int32"):
    omerge_jax.reference_delta({"w": jnp.ones(3, jnp.int32)}, {"w": jnp.ones(3)})
  with pytest.raises(TypeError, match=r"base_params\['w'\] must be an array .*got int"):
    omerge_jax.reference_delta({"w": jnp.ones(3)}, {"w": 1})


# ---------------------------------------------------------------------------
# Hyper-parameters: range, NaN, choices, types.

_RANGE_CASES = [
  ("reserve_p", 0.0, r"reserve_p must be in \(0.0, 1.0\], got 0.0"),
  ("reserve_p", -0.1, r"reserve_p must be in \(0.0, 1.0\], got -0.1"),
  ("reserve_p", 1.5, r"reserve_p must be in \(0.0, 1.0\], got 1.5"),
  ("reserve_p", NAN, r"reserve_p must be in \(0.0, 1.0\], got nan"),
  ("alpha", -0.1, r"alpha must be in \[0.0, 1.0\], got -0.1"),
  ("alpha", 1.1, r"alpha must be in \[0.0, 1.0\], got 1.1"),
  ("alpha", NAN, r"alpha must be in \[0.0, 1.0\], got nan"),
  ("merge_every", 0, r"merge_every must be an integer >= 1, got 0"),
  ("merge_every", -3, r"merge_every must be an integer >= 1, got -3"),
  ("merge_every", 2.5, r"merge_every must be an integer >= 1, got 2.5"),
  ("merge_every", NAN, r"merge_every must be an integer >= 1, got nan"),
  ("merge_every", True, r"merge_every must be an integer >= 1, got True"),
  ("clip", 0.0, r"clip must be a positive number, got 0.0"),
  ("clip", NAN, r"clip must be a positive number, got nan"),
  ("method", "slerp", r"method must be one of \['dare', 'ties'\], got 'slerp'"),
  (
    "sign_election",
    "mean",
    r"sign_election must be one of \['reference', 'weighted'\], got 'mean'",
  ),
  ("topk", "approx", r"topk must be one of \['exact', 'sampled'\], got 'approx'"),
]


@pytest.mark.parametrize("name,value,message", _RANGE_CASES)
def test_online_merge_hyper_parameters(name, value, message):
  with pytest.raises(ValueError, match=message):
    omerge_jax.online_merge(TAU, **{name: value})


_ALIAS_ARGS = {
  omerge_jax.ondare: {"reserve_p", "alpha", "merge_every", "clip"},
  omerge_jax.onties: {"reserve_p", "alpha", "merge_every", "sign_election", "topk"},
}


@pytest.mark.parametrize("alias", list(_ALIAS_ARGS), ids=["ondare", "onties"])
def test_alias_hyper_parameters(alias):
  cases = [c for c in _RANGE_CASES if c[0] in _ALIAS_ARGS[alias]]
  cases += [
    ("b1", NAN, r"b1 must be in \[0.0, 1.0\), got nan"),
    ("b1", 1.0, r"b1 must be in \[0.0, 1.0\), got 1.0"),
    ("b2", 1.0, r"b2 must be in \[0.0, 1.0\), got 1.0"),
    ("b2", 1.5, r"b2 must be in \[0.0, 1.0\), got 1.5"),
    ("eps", NAN, r"eps must be a non-negative number, got nan"),
    ("eps", -1e-8, r"eps must be a non-negative number, got -1e-08"),
    ("weight_decay", NAN, r"weight_decay must be a non-negative number, got nan"),
    ("weight_decay", -0.1, r"weight_decay must be a non-negative number, got -0.1"),
  ]
  for name, value, message in cases:
    with pytest.raises(ValueError, match=message):
      alias(1e-3, TAU, **{name: value})
  for lr in (0.0, -1e-3, NAN):
    with pytest.raises(ValueError, match=rf"learning_rate must be a positive number, got {lr}"):
      alias(lr, TAU)


def test_online_merge_types_and_combinations():
  with pytest.raises(TypeError, match=r"seed must be an integer, got 1.5"):
    omerge_jax.online_merge(TAU, seed=1.5)
  with pytest.raises(TypeError, match=r"seed must be an integer, got True"):
    omerge_jax.online_merge(TAU, seed=True)
  with pytest.raises(
    TypeError, match=r"reference_dtype must be a floating dtype or None, got int32"
  ):
    omerge_jax.online_merge(TAU, reference_dtype=jnp.int32)
  with pytest.raises(
    TypeError, match=r"reference_dtype must be a floating dtype or None, got 'half-ish'"
  ):
    omerge_jax.ondare(1e-3, TAU, reference_dtype="half-ish")
  with pytest.raises(ValueError, match=r"resample_reference=True needs method='dare'"):
    omerge_jax.online_merge(TAU, method="ties", resample_reference=True)


def test_seed_must_fit_int32_as_injection_makes_it():
  for seed in (0, 2**31 - 1, np.uint32(2**31 - 1)):
    tx = omerge_jax.ondare(1e-3, TAU, seed=seed, reserve_p=0.5)
    jax.jit(tx.update)(TAU, tx.init(TAU), TAU)
  # Every valid seed survives optax.inject_hyperparams's int32 array.
  tx = optax.inject_hyperparams(omerge_jax.ondare, static_args=("reserve_p", "merge_every"))(
    1e-3, TAU, seed=2**31 - 1
  )
  jax.jit(tx.update)(TAU, tx.init(TAU), TAU)
  for seed in (-1, 2**31, 2**32 - 1, np.int64(2**40)):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*31 - 1\], got"):
      omerge_jax.online_merge(TAU, seed=seed)
  with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*31 - 1\], got -1"):
    offline.dare(TAU, [TAU], [1.0], density=0.5, seed=-1)


def test_reserve_p_schedule_is_refused_at_construction():
  with pytest.raises(TypeError, match=r"reserve_p must be a number, not a schedule"):
    omerge_jax.online_merge(TAU, reserve_p=lambda step: 0.1)
  with pytest.raises(TypeError, match=r"reserve_p must be a number, not a schedule"):
    omerge_jax.onties(1e-3, TAU, reserve_p=optax.constant_schedule(0.1))


def test_clip_with_ties_is_refused_unless_default_or_none():
  for clip in (1.0, None):
    omerge_jax.online_merge(TAU, method="ties", clip=clip)
  with pytest.raises(ValueError, match=r"clip is DARE's .* got clip=0.5 with method='ties'"):
    omerge_jax.online_merge(TAU, method="ties", clip=0.5)


@pytest.mark.parametrize("k", [1, np.int64(1), np.int32(1), 1.0])
def test_merge_every_one_of_any_integer_type_has_no_accumulator(k):
  assert omerge_jax.online_merge(TAU, merge_every=k).init(TAU).accumulator is None
  assert omerge_jax.online_merge(TAU, merge_every=np.int64(2)).init(TAU).accumulator is not None


def test_offline_ties_with_one_model_refuses_a_weight_it_would_ignore():
  other = {"w": jnp.full((2, 3), 0.5), "b": jnp.ones(3)}
  for weights in (None, [1.0]):
    chex.assert_trees_all_close(offline.ties(TAU, [other], weights, density=1.0), other)
  with pytest.raises(ValueError, match=r"weights of offline.ties are relative.* 0.5"):
    offline.ties(TAU, [other], [0.5], density=1.0)


def test_non_numeric_hyper_parameter_names_the_argument():
  with pytest.raises(TypeError, match=r"alpha must be a real number or a schedule, got 'big'"):
    omerge_jax.online_merge(TAU, alpha="big")
  with pytest.raises(TypeError, match=r"b2 must be a real number or a schedule, got \[0.9\]"):
    omerge_jax.onties(1e-3, TAU, b2=[0.9])
  with pytest.raises(ValueError, match=r"merge_every must be an integer >= 1, got 'two'"):
    omerge_jax.online_merge(TAU, merge_every="two")


def test_nan_hyper_parameter_injected_at_init():
  # inject_hyperparams hands concrete arrays to the factory at init: checked.
  tx = optax.inject_hyperparams(omerge_jax.online_merge, static_args=("method",))(
    reference_delta=TAU, alpha=jnp.float32(NAN)
  )
  with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\], got .*nan"):
    tx.init(TAU)


# ---------------------------------------------------------------------------
# Schedules are not checked (they may be traced). A NaN alpha makes that
# step's whole update NaN and leaves the optimizer state finite; the guard is
# an optax.apply_if_finite placed *after* the merge (documented in
# docs/guarantees.md, "Non-finite values").


_NAN_AT_ONE = lambda count: jnp.where(count == 1, jnp.nan, 0.1)
_UPDATES = {"w": jnp.full((2, 3), 0.01), "b": jnp.full(3, -0.01)}


@pytest.mark.parametrize("method", ["dare", "ties"])
def test_schedule_returning_nan_alpha(method):
  tx = omerge_jax.online_merge(TAU, method=method, alpha=_NAN_AT_ONE, reserve_p=0.5)
  state = jax.jit(tx.init)(TAU)
  update = jax.jit(tx.update)
  out, state = update(_UPDATES, state)
  chex.assert_tree_all_finite(out)
  out, state = update(_UPDATES, state)  # count == 1: alpha is NaN
  for leaf in jax.tree.leaves(out):
    assert np.all(np.isnan(leaf))
  chex.assert_tree_all_finite(state)
  out, state = update(_UPDATES, state)  # count == 2: back to normal
  chex.assert_tree_all_finite(out)


def test_nan_alpha_is_guarded_by_apply_if_finite_after_the_merge():
  merge = lambda: omerge_jax.online_merge(TAU, alpha=_NAN_AT_ONE, reserve_p=0.5)
  # apply_if_finite checks the gradients it is given: wrapping the merge
  # does not see a NaN the merge makes ...
  wrapped = optax.apply_if_finite(merge(), max_consecutive_errors=3)
  state = wrapped.init(TAU)
  update = jax.jit(wrapped.update)
  _, state = update(_UPDATES, state)
  out, state = update(_UPDATES, state)
  assert np.all(np.isnan(out["w"]))
  # ... placed after it, it skips that step, and the next one is normal.
  guarded = optax.chain(merge(), optax.apply_if_finite(optax.identity(), max_consecutive_errors=3))
  state = guarded.init(TAU)
  update = jax.jit(guarded.update)
  outs = []
  for _ in range(3):
    out, state = update(_UPDATES, state)
    outs.append(out)
  chex.assert_trees_all_equal(outs[1], jax.tree.map(jnp.zeros_like, _UPDATES))
  chex.assert_tree_all_finite(outs)
  assert np.any(outs[2]["w"] != 0)
  assert int(state[1].total_notfinite) == 1


# ---------------------------------------------------------------------------
# dtypes: params and reference delta may differ; the merge runs in float32.


@pytest.mark.parametrize(
  "param_dtype,tau_dtype", [(jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)]
)
def test_params_and_reference_delta_of_different_dtypes(param_dtype, tau_dtype):
  tau = {"w": jnp.linspace(-0.4, 0.4, 12).reshape(3, 4).astype(tau_dtype)}
  params = {"w": jnp.ones((3, 4), param_dtype)}
  tx = omerge_jax.online_merge(tau, alpha=0.5, reserve_p=1.0, clip=None)
  state = tx.init(params)
  assert state.reference["w"].dtype == tau_dtype  # stored as given
  updates = {"w": jnp.linspace(0.1, -0.1, 12).reshape(3, 4).astype(param_dtype)}
  out, _ = jax.jit(tx.update)(updates, state)
  assert out["w"].dtype == param_dtype  # returned in the update's dtype
  want = 0.5 * updates["w"].astype(jnp.float32) + 0.5 * tau["w"].astype(jnp.float32)
  np.testing.assert_allclose(
    np.asarray(out["w"], np.float32),
    np.asarray(want.astype(param_dtype), np.float32),
    rtol=float(jnp.finfo(param_dtype).eps),
    atol=1e-7,
  )


def test_reference_delta_of_models_with_different_dtypes():
  sft = {"w": jnp.array([1.0 + 2.0**-20, 2.0], jnp.float32)}
  base = {"w": jnp.array([1.0, 1.0], jnp.bfloat16)}
  tau = omerge_jax.reference_delta(sft, base)
  assert tau["w"].dtype == jnp.float32  # the SFT model's dtype
  np.testing.assert_array_equal(tau["w"], np.array([2.0**-20, 1.0], np.float32))
  tau = omerge_jax.reference_delta(sft, base, dtype=jnp.bfloat16)
  assert tau["w"].dtype == jnp.bfloat16
  with pytest.raises(TypeError, match=r"dtype must be a floating dtype or None, got int32"):
    omerge_jax.reference_delta(sft, base, dtype=jnp.int32)


# ---------------------------------------------------------------------------
# The other entry points.


def test_merge_stats_without_tracked_stats():
  state = omerge_jax.ondare(1e-3, TAU).init(TAU)
  with pytest.raises(ValueError, match=r"one online_merge state with track_stats=True.*found 0"):
    omerge_jax.merge_stats(state)
  two = (omerge_jax.online_merge(TAU, track_stats=True).init(TAU),) * 2
  with pytest.raises(ValueError, match=r"found 2"):
    omerge_jax.merge_stats(two)


def test_decoupled_weight_decay():
  with pytest.raises(ValueError, match=r"weight_decay must be a non-negative number, got nan"):
    omerge_jax.decoupled_weight_decay(1e-3, NAN)
  tx = omerge_jax.decoupled_weight_decay(1e-3, 0.1)
  with pytest.raises(ValueError, match=r"decoupled_weight_decay needs params"):
    tx.update(TAU, tx.init(TAU))
  with pytest.raises(ValueError, match=r"decoupled_weight_decay needs params"):
    omerge_jax.ondare(1e-3, TAU, weight_decay=0.1).update(
      TAU, omerge_jax.ondare(1e-3, TAU, weight_decay=0.1).init(TAU)
    )


def test_offline_merges():
  other = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"models must hold at least one param pytree"):
    offline.linear(TAU, [], [])
  with pytest.raises(ValueError, match=r"weights has 2 entries but models has 1"):
    offline.linear(TAU, [other], [0.5, 0.5])
  with pytest.raises(ValueError, match=r"weights must be in .*got nan"):
    offline.linear(TAU, [other], [NAN])
  with pytest.raises(
    ValueError, match=r"models\[1\]\['w'\] has shape \(2, 4\) but base\['w'\] has shape \(2, 3\)"
  ):
    offline.linear(TAU, [other, {"w": jnp.ones((2, 4)), "b": jnp.ones(3)}], [0.5, 0.5])
  for density in (0.0, 1.5, NAN):
    with pytest.raises(ValueError, match=rf"density must be in \(0.0, 1.0\], got {density}"):
      offline.dare(TAU, [other], [1.0], density=density)
    with pytest.raises(ValueError, match=rf"density must be in \(0.0, 1.0\], got {density}"):
      offline.ties(TAU, [other], density=density)


def test_abstract_state_needs_a_sharding_per_param():
  tx = omerge_jax.ondare(1e-3, TAU)
  params = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "b": jnp.ones(3)}
  with pytest.raises(ValueError, match=r"params\['w'\] has no sharding"):
    checkpoint.abstract_state(tx, params)


@pytest.mark.parametrize("topk", ["exact", "sampled"])
def test_trim_refuses_a_tensor_too_large_to_rank(topk):
  # trim counts a tensor's entries in uint32; called directly (the transform
  # checks its leaves at init), keep_mask names the shape, on both routes, and
  # checks a stacked leaf's slices, which may together exceed 2**32.
  from omerge_jax import trim

  huge = (2**16 + 1, 2**16)
  mask = lambda stacked: lambda x: trim.keep_mask(x, 0.5, topk, stacked_axes=stacked)
  for shape, stacked in ((huge, 0), ((2, *huge), 1)):
    with pytest.raises(ValueError, match=r"fewer than 2\*\*32 entries, got shape \(65537, 65536\)"):
      jax.eval_shape(mask(stacked), jax.ShapeDtypeStruct(shape, jnp.float32))
  # Slices of 2**16 entries are fine, however many.
  out = jax.eval_shape(mask(1), jax.ShapeDtypeStruct(huge, jnp.float32))
  assert out.shape == huge and out.dtype == jnp.bool_
