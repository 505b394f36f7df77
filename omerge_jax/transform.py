"""`online_merge`: the paper's online merging as an Optax gradient transformation."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from omerge_jax import _sharding
from omerge_jax import _validation as checks
from omerge_jax import consensus
from omerge_jax import sparsify
from omerge_jax import trim

METHODS = ("dare", "ties")
SIGN_ELECTIONS = ("reference", "weighted")
TOPK = ("exact", "sampled")


class MergeStats(NamedTuple):
  """Statistics of the last step, for logging (``track_stats=True``).

  Attributes:
    merged: whether the step merged (False on the plain steps of step-K).
    kept_fraction: fraction of the update's entries that the sparsifier F
      kept (its mask, so a kept entry whose value is zero counts); 1 on a plain
      step-K step, where nothing is sparsified.
    sign_agreement: among entries where both the kept update and the
      (sparsified) reference delta are non-zero, the fraction of equal signs.
    update_norm: global L2 norm of the incoming update.
    merged_norm: global L2 norm of the update this transform returned.
  """

  merged: jax.Array
  kept_fraction: jax.Array
  sign_agreement: jax.Array
  update_norm: jax.Array
  merged_norm: jax.Array


class OnlineMergeState(NamedTuple):
  """State of `online_merge`.

  Attributes:
    count: number of updates taken (int32); it indexes the random masks and
      the step-K cycle.
    reference: the sparsified reference delta :math:`F(\\tau)`, fixed at init;
      with ``resample_reference=True``, the dense :math:`\\tau` (re-masked every
      step). Stored in ``reference_dtype``.
    accumulator: step-K's :math:`\\Delta_c`, the plain updates applied since the
      last merge (float32 or wider); ``None`` when ``merge_every == 1``.
    stats: `MergeStats` of the last step, or ``None`` unless ``track_stats``
      (typed ``Any``: Optax's state type, chex's ``ArrayTree``, has no ``None``).
  """

  count: jax.Array
  reference: optax.Updates
  accumulator: Any
  stats: Any


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def _float32_or_wider(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def online_merge(
  reference_delta: optax.Updates,
  *,
  method: str = "dare",
  alpha: optax.ScalarOrSchedule = 1e-7,
  reserve_p: float = 0.01,
  rescale: bool = False,
  clip: float | None = 1.0,
  sign_election: str = "reference",
  merge_every: int = 1,
  resample_reference: bool = False,
  reference_dtype: Any = None,
  topk: str = "exact",
  stacked_axes: Any = None,
  seed: int = 0,
  track_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Merge each proposed update with the reference delta (online merging).

  Placed after any optimizer and its learning-rate scaling, it turns the
  proposed update :math:`\Delta_t` into

  .. math::

    \theta_{t+1} = \theta_t + F(\Delta_t) \oplus F(\tau_r),
    \qquad \tau_r = \theta_{\mathrm{SFT}} - \theta_{\mathrm{base}},

  with, per leaf, OnDARE (``method="dare"``): :math:`F` keeps each entry with
  probability :math:`p` and scales it by :math:`1/p`, a fresh mask every step,
  and :math:`a \oplus b = (1-\alpha)a + \alpha b`; OnTIES (``method="ties"``):
  :math:`F` keeps the :math:`\lfloor p n\rfloor` largest magnitudes and
  :math:`\oplus` is a sign consensus (see `omerge_jax.consensus`).
  :math:`F(\tau_r)` is computed once, at ``init``.

  With ``merge_every=K`` (the paper's Algorithm 2), steps :math:`t` with
  :math:`t \bmod K \ne 0` (1-based) apply :math:`\Delta_t` as it is and add it
  to :math:`\Delta_c`; every K-th step applies
  :math:`\mathrm{merge}(\Delta_t + \Delta_c) - \Delta_c` and resets
  :math:`\Delta_c = 0`.

  Example:
    OnTIES after SGD (learning rate 1, so :math:`\Delta_t = -g`), keeping
    the 2 largest of 4 entries, :math:`\alpha = 0.5`:

    >>> import jax.numpy as jnp, optax, omerge_jax
    >>> base = {"w": jnp.zeros(4)}
    >>> sft = {"w": jnp.array([0.1, -0.2, 0.3, 0.0])}
    >>> tau = omerge_jax.reference_delta(sft, base)
    >>> merge = omerge_jax.online_merge(tau, method="ties", reserve_p=0.5, alpha=0.5)
    >>> tx = optax.chain(optax.sgd(1.0), merge)
    >>> state = tx.init(sft)
    >>> grads = {"w": jnp.array([-0.4, 0.1, -0.2, 0.3])}
    >>> updates, state = tx.update(grads, state, sft)
    >>> updates["w"]  # 0.5 * [0, -0.2, 0.3, 0] + 0.5 * [0.4, 0, 0, -0.3]
    Array([ 0.2 , -0.1 ,  0.15, -0.15], dtype=float32)

  Args:
    reference_delta: the task vector :math:`\tau_r` (SFT minus base params), a
      pytree shaped like the params (see `omerge_jax.reference_delta`).
    method: ``"dare"`` (OnDARE) or ``"ties"`` (OnTIES).
    alpha: merging weight :math:`\alpha` in [0, 1], or a schedule of the step.
      It must be small against the step: the paper starts at 1e-7 for a
      learning rate of 1e-6.
    reserve_p: reserve rate (density) :math:`p` in (0, 1], a Python number:
      it fixes :math:`F(\tau_r)` at init and TIES's
      :math:`k = \lfloor p n \rfloor` (the floor of the float64 product, as
      ``int(p * n)``), so it is neither a schedule nor injected (under
      ``optax.inject_hyperparams`` list it in ``static_args``).
    rescale: multiply the sparsified update by
      :math:`\|x\|_1/(\|F(x)\|_1 + 10^{-8})` (off by default: the paper
      reports it harms stability; see `omerge_jax.sparsify.l1_rescale`).
    clip: DARE only: clip the sparsified reference delta (and, with
      ``rescale``, the rescaled update) to ``[-clip, clip]``; ``None`` disables.
      TIES does not clip: with ``method="ties"`` any other value is refused.
    sign_election: TIES only: ``"reference"`` (unweighted, as the public code;
      default) or ``"weighted"`` (the paper's Eq. 7).
    merge_every: K of step-K merging, an integer >= 1; static like
      ``reserve_p`` (K = 1 keeps no accumulator in the state).
    resample_reference: DARE only: draw a fresh mask for :math:`\tau_r` every
      step (the paper's Algorithm 1 read literally) instead of once at init.
    reference_dtype: dtype in which the reference delta is stored (e.g.
      ``jnp.bfloat16`` halves its memory); ``None`` keeps its own dtype. Under
      ``optax.inject_hyperparams`` pass it as a ``jnp.dtype(...)`` instance.
    topk: TIES only: ``"exact"`` per-leaf top-k (ties broken by row-major
      position) or ``"sampled"`` (threshold and tie cutoff from a fixed sample
      spread over every axis; see `omerge_jax.trim.ties_select_sampled` for
      its bound, which holds with ties).
    stacked_axes: TIES only: how many leading axes of a leaf index separate
      tensors (the layer axis of ``nnx.scan``-stacked layers): each slice is
      trimmed on its own, with :math:`k = \lfloor p\,m \rfloor` for slices of
      :math:`m` entries. An integer for every leaf, a pytree of integers
      shaped like the params, or a callable ``(path, leaf) -> int``; ``None``
      (every leaf is one tensor) by default. DARE is per entry: it changes
      nothing there. Under ``optax.inject_hyperparams`` list it in
      ``static_args``.
    seed: integer seed of the DARE masks, in [0, 2**31 - 1] (an int32, as
      ``optax.inject_hyperparams`` makes it); a mask depends only on
      ``(seed, step, leaf, element coordinates)``, the leaf being its index
      in ``reference_delta`` (also under ``optax.masked``).
    track_stats: keep `MergeStats` of the last step in the state (read them
      with `omerge_jax.merge_stats`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``. Updates come back in their
    incoming dtype; the merge is computed in float32 (or wider). ``init``
    builds each param-shaped buffer with its param's sharding; call it eagerly
    on sharded params (under ``jax.jit`` it would capture :math:`\tau_r` as a
    constant). Under ``jax.eval_shape`` it reads no value of :math:`\tau_r`,
    which may then be a pytree of ``jax.ShapeDtypeStruct`` (a restore target).

  References:
    Lu et al., `Online Merging Optimizers for Boosting Rewards and Mitigating
    Tax in Alignment <https://arxiv.org/abs/2405.17931>`_, 2024.
  """
  stacked = _check_arguments(
    reference_delta,
    method,
    alpha,
    reserve_p,
    clip,
    sign_election,
    merge_every,
    resample_reference,
    topk,
    stacked_axes,
    seed,
  )
  reference_dtype = checks.check_dtype("reference_dtype", reference_dtype)
  step_k = merge_every != 1
  combine = consensus.linear
  if method == "ties":
    combine = consensus.ties_weighted if sign_election == "weighted" else consensus.ties_reference
  # Whether the merge may lose a non-finite entry that _merge_step must put back.
  restore = method == "ties" or rescale
  sparsify_update, sparsify_reference = _sparsifiers(method, reserve_p, rescale, clip, topk, seed)

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    stats = None
    if track_stats:
      zero = jnp.zeros([], jnp.float32)
      stats = MergeStats(jnp.zeros([], bool), zero, zero, zero, zero)
    if not jax.tree.leaves(params):
      # `optax.tree.map_params` passes a placeholder: mirror it where params go.
      return OnlineMergeState(count, params, params if step_k else None, stats)
    # Under jit or eval_shape (traced params) only types are known: values are
    # read by an eager init alone. Once per run, at init rather than at
    # construction: `inject_hyperparams` constructs the transform at every update.
    traced = any(isinstance(p, jax.core.Tracer) for p in jax.tree.leaves(params))
    if not traced:
      checks.check_finite_tree(reference_delta, "reference_delta")
    if method == "ties":
      checks.check_ties_dtypes(params, "params")
      checks.check_ties_dtypes(reference_delta, "reference_delta")

    def prepare_leaf(param, tau, index, path):
      dtype = reference_dtype or jax.dtypes.canonicalize_dtype(tau.dtype)
      if isinstance(tau, jax.ShapeDtypeStruct):
        return _abstract_leaf(tau.shape, dtype, jax.tree_util.keystr(path), traced)
      # Each leaf is prepared where its param lives: an eager init on a mesh
      # moves tau shard by shard and gathers nothing onto one device.
      tau = _sharding.place_like(tau, param)
      if resample_reference:
        return tau.astype(dtype)
      return _sparsified_reference(
        tau,
        jnp.uint32(index),
        jnp.uint32(seed),
        clip,
        method=method,
        reserve_p=reserve_p,
        stacked_axes=stacked[index],
        dtype=dtype,
      )

    reference = checks.align_with_params(params, reference_delta, prepare_leaf)
    accumulator = None
    if step_k:
      # zeros_like keeps each param's sharding (an eager zeros would sit on one device).
      accumulator = jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=_float32_or_wider(p.dtype)), params
      )
    return OnlineMergeState(count, reference, accumulator, stats)

  def merge_leaf(total, ref, count, index, alpha_t, selection):
    """``merge(total)`` of one leaf, with what the statistics need."""
    if resample_reference:
      ref, _ = sparsify_reference(ref, count, index, stacked[index])
    ref = ref.astype(_float32_or_wider(ref.dtype))
    sparse, kept = sparsify_update(total, count, index, stacked[index], selection)
    return combine(sparse, ref, jnp.asarray(alpha_t, sparse.dtype)), sparse, kept, ref

  def update_fn(updates, state, params=None, **extra_args):
    # update_sample: `trim.take_sample` of each leaf of ``updates``, from an
    # alias that computes it from Adam's inputs (`alias.onties`), so that the
    # sampled threshold does not make XLA write the update out.
    del params
    update_sample = extra_args.get("update_sample")
    count = state.count
    alpha_t = alpha(count) if callable(alpha) else alpha
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(updates, is_leaf=_is_masked)
    leaves = [u for _, u in path_leaves]
    live = [None if _is_masked(u) else u for u in leaves]
    references = treedef.flatten_up_to(state.reference)
    _check_shapes([p for p, _ in path_leaves], live, references)
    # Each leaf's index in reference_delta (its stacked axes, its DARE key),
    # also where optax.masked replaced a whole subtree by one MaskedNode.
    indices = checks.reference_indices(treedef.flatten_up_to(reference_delta))
    deltas = [None if u is None else u.astype(_float32_or_wider(u.dtype)) for u in live]

    samples = [None] * len(leaves)
    if update_sample is not None and state.accumulator is None:
      samples = treedef.flatten_up_to(update_sample)

    def select(totals):
      # The TIES selections of all unstacked leaves, their samples ranked together.
      if method != "ties":
        return [None] * len(totals)
      chosen = [i for i, t in enumerate(totals) if t is not None and stacked[indices[i]] == 0]
      found = trim.ties_select_many(
        [totals[i] for i in chosen], reserve_p, topk, [samples[i] for i in chosen]
      )
      by_leaf = dict(zip(chosen, found, strict=True))
      return [by_leaf.get(i) for i in range(len(totals))]

    merge = lambda total, i, selection: merge_leaf(
      total, references[i], count, indices[i], alpha_t, selection
    )
    merge_step = lambda acc: _merge_step(deltas, acc, select, merge, track_stats, restore)
    if state.accumulator is None:
      applied, _, stats = merge_step([None] * len(deltas))
      new_accumulator = None
    else:
      accumulated = [
        None if u is None else c
        for u, c in zip(live, treedef.flatten_up_to(state.accumulator), strict=True)
      ]
      is_merge_step = (count + 1) % merge_every == 0
      applied, new_acc, stats = lax.cond(
        is_merge_step,
        merge_step,
        lambda acc: _plain_step(deltas, acc, references, track_stats),
        accumulated,
      )
      new_accumulator = treedef.unflatten(
        [l if a is None else a for l, a in zip(leaves, new_acc, strict=True)]
      )

    out = treedef.unflatten(
      [leaf if a is None else a.astype(leaf.dtype) for leaf, a in zip(leaves, applied, strict=True)]
    )
    new_state = OnlineMergeState(
      count=jnp.asarray(optax.safe_increment(count)),
      reference=state.reference,
      accumulator=new_accumulator,
      stats=stats,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_arguments(
  reference_delta,
  method,
  alpha,
  reserve_p,
  clip,
  sign_election,
  merge_every,
  resample_reference,
  topk,
  stacked_axes,
  seed,
):
  """Refuse bad arguments at construction, naming them; the stacked axes of each leaf."""
  checks.check_choice("method", method, METHODS)
  checks.check_choice("sign_election", sign_election, SIGN_ELECTIONS)
  checks.check_choice("topk", topk, TOPK)
  checks.check_range("alpha", alpha, 0.0, 1.0)
  checks.check_static_number("reserve_p", reserve_p)
  checks.check_range("reserve_p", reserve_p, 0.0, 1.0, low_open=True)
  checks.check_positive("clip", clip, allow_none=True)
  if (
    method == "ties" and clip is not None and checks.concrete_float("clip", clip) not in (None, 1.0)
  ):
    raise ValueError(
      f"clip is DARE's (SPEC 3): TIES keeps entries unscaled and does not clip; got "
      f"clip={clip!r} with method='ties' (leave clip at its default or pass None)"
    )
  checks.check_merge_every(merge_every)
  checks.check_reference_tree(reference_delta)
  stacked = checks.stacked_axes_per_leaf(stacked_axes, reference_delta, "reference_delta")
  if method == "ties":
    checks.check_ties_leaf_sizes(reference_delta, "reference_delta")
  if resample_reference and method != "dare":
    raise ValueError("resample_reference=True needs method='dare': TIES trims deterministically")
  checks.check_seed(seed)
  return stacked


# One program per leaf type and setting, shared by every transform, with tau
# an argument: never a constant of it.
@functools.partial(jax.jit, static_argnames=("method", "reserve_p", "stacked_axes", "dtype"))
def _sparsified_reference(tau, index, seed, clip, *, method, reserve_p, stacked_axes, dtype):
  """:math:`F(\tau)` of one leaf, as ``init`` stores it."""
  _, sparsify_reference = _sparsifiers(method, reserve_p, False, clip, "exact", seed)
  return sparsify_reference(tau, jnp.zeros([], jnp.int32), index, stacked_axes)[0].astype(dtype)


def _merge_step(deltas, accumulated, select, merge_leaf, track_stats, restore_non_finite):
  """Apply ``merge(Δ_t + Δ_c) - Δ_c`` leaf by leaf and reset ``Δ_c`` (Algorithm 2).

  With K = 1 there is no accumulator (``accumulated`` holds ``None``s).
  ``select`` gives the leaves' TIES selections where they are made together.
  """
  applied = list(deltas)
  totals = [
    d if d is None or c is None else d + c for d, c in zip(deltas, accumulated, strict=True)
  ]
  selections = select(totals)
  sparse, kept, refs = {}, {}, {}
  for i, total in enumerate(totals):
    if total is None:
      continue
    c = accumulated[i]
    merged, sparse[i], kept[i], refs[i] = merge_leaf(total, i, selections[i])
    applied[i] = merged if c is None else merged - c
    if restore_non_finite or c is not None:
      # Plain DARE keeps a non-finite entry and its linear merge carries it
      # (see `_sparsifiers`). TIES ranks it as zero and its consensus may drop
      # it, the rescale's clip bounds it, and merged - c turns inf into NaN.
      applied[i] = _keep_non_finite(total, applied[i])
  stats = _statistics(True, deltas, kept, sparse, refs, applied) if track_stats else None
  return applied, [None if c is None else jnp.zeros_like(c) for c in accumulated], stats


def _plain_step(deltas, accumulated, references, track_stats):
  """A step-K step that does not merge: apply ``Δ_t`` as it is and add it to ``Δ_c``."""
  new_acc = [None if c is None else c + d for c, d in zip(accumulated, deltas, strict=True)]
  stats = None
  if track_stats:
    live = {i: d for i, d in enumerate(deltas) if d is not None}
    refs = {i: references[i].astype(jnp.float32) for i in live}
    # Nothing is sparsified: every entry of the update is applied.
    stats = _statistics(False, deltas, None, live, refs, deltas)
  return list(deltas), new_acc, stats


def _sparsifiers(method, reserve_p, rescale, clip, topk, seed):
  """F of the update and of the reference delta, each ``(x, step, leaf, stacked) -> (F(x), kept)``.

  F of the update also takes the leaf's `trim.TiesSelection` where it was made
  with the other leaves' (TIES, unstacked leaves).
  ``leaf`` is the leaf's index in the reference delta (it keys DARE's masks,
  and may be traced); ``stacked`` is the number of stacked leading axes TIES
  trims along. ``kept`` is F's boolean mask: the entries F kept, zero-valued
  ones included.
  """

  def dare(x, stream, step, index):
    kept = sparsify.dare_mask(x, reserve_p, seed=seed, stream=stream, step=step, leaf_index=index)
    # A dropped NaN or infinity is kept as it is (SPEC 12) here rather than
    # by a select after the merge: that second read of the update made XLA
    # write Adam's update out instead of fusing it into the final loop (and
    # dividing inside the select does the same; tested by the temporaries).
    return jnp.where(kept | ~jnp.isfinite(x), x, 0) / jnp.asarray(reserve_p, x.dtype), kept

  def ties(x, topk, stacked, selection=None):
    if selection is None:
      kept = sparsify.ties_mask(x, reserve_p, topk, stacked)
    else:
      kept = trim.ties_keep_mask(x, selection)
    return jnp.where(kept, x, 0), kept

  def update(x, step, index, stacked, selection=None):
    if method == "ties":
      sparse, kept = ties(x, topk, stacked, selection)
      return (sparsify.l1_rescale(x, sparse) if rescale else sparse), kept
    sparse, kept = dare(x, sparsify.UPDATE_STREAM, step, index)
    return (sparsify.clip(sparsify.l1_rescale(x, sparse), clip) if rescale else sparse), kept

  def reference(tau, step, index, stacked):
    tau = tau.astype(_float32_or_wider(tau.dtype))
    if method == "ties":
      return ties(tau, "exact", stacked)
    sparse, kept = dare(tau, sparsify.REFERENCE_STREAM, step, index)
    return sparsify.clip(sparse, clip), kept

  return update, reference


def _statistics(merged, incoming, kept, sparse, references, applied) -> MergeStats:
  """`MergeStats` of a step over the live leaves (the keys of ``sparse``).

  ``kept`` maps a leaf to F's mask; ``None`` on a plain step, where every entry
  is applied as it is.
  """
  live = sorted(sparse)
  n = sum(math.prod(incoming[i].shape) for i in live)
  if kept is None:
    count = float(n)
  else:
    count = sum(jnp.sum(kept[i], dtype=jnp.float32) for i in live)
  both = agree = jnp.zeros([], jnp.float32)
  for i in live:
    ref = references[i]
    nonzero = (sparse[i] != 0) & (ref != 0)
    both += jnp.sum(nonzero, dtype=jnp.float32)
    agree += jnp.sum(nonzero & (jnp.sign(sparse[i]) == jnp.sign(ref)), dtype=jnp.float32)
  norm = lambda xs: jnp.sqrt(sum(jnp.sum(jnp.square(xs[i].astype(jnp.float32))) for i in live))
  return MergeStats(
    merged=jnp.asarray(merged),
    kept_fraction=jnp.asarray(count / float(max(n, 1)), jnp.float32),  # n may exceed int32
    sign_agreement=agree / jnp.maximum(both, 1.0),
    update_norm=norm(incoming),
    merged_norm=norm(applied),
  )


def _keep_non_finite(total, out):
  """``out``, but ``total`` wherever ``total`` is NaN or infinite (SPEC 12).

  F may drop such an entry and the consensus may outvote it; under AdamW it
  reaches the params, where users look for it, so it must here too. One
  elementwise select that fuses into the final update loop.
  """
  return jnp.where(jnp.isfinite(total), out, total)


def _abstract_leaf(shape, dtype, where, traced):
  """The reference of an abstract tau leaf: a type with no values, for ``jax.eval_shape``.

  A restore target (`omerge_jax.checkpoint.abstract_state`) needs the state's
  types only; the values come from the checkpoint. Run, the leaf raises.
  """
  message = (
    f"reference_delta{where} is abstract (jax.ShapeDtypeStruct): it gives the state's "
    "types under jax.eval_shape (a restore target), not values; build the transform "
    "with the reference delta's arrays to init a state"
  )
  if not traced:
    raise ValueError(message)

  def refuse():
    raise ValueError(message)

  return jax.pure_callback(refuse, jax.ShapeDtypeStruct(shape, dtype))


def _check_shapes(paths, live, references):
  """Shapes are static: a mismatch is caught while tracing, before it broadcasts."""
  for path, update, ref in zip(paths, live, references, strict=True):
    if update is not None and tuple(update.shape) != tuple(ref.shape):
      raise ValueError(
        f"updates{jax.tree_util.keystr(path)} has shape {tuple(update.shape)} but the "
        f"params given to init had shape {tuple(ref.shape)}"
      )


def merge_stats(opt_state: optax.OptState) -> MergeStats:
  """The `MergeStats` of the last step, found anywhere inside ``opt_state``.

  Works through ``optax.chain``, ``inject_hyperparams``, ``MultiSteps``,
  ``masked`` and ``apply_if_finite`` states, and on an ``nnx.Optimizer``'s
  ``opt_state`` (``nnx`` variables are unwrapped).

  Example:

    >>> import jax.numpy as jnp, omerge_jax
    >>> params = {"w": jnp.linspace(-1.0, 1.0, 8)}
    >>> tx = omerge_jax.onties(1e-3, params, reserve_p=0.25, track_stats=True)
    >>> _, opt_state = tx.update(params, tx.init(params), params)
    >>> float(omerge_jax.merge_stats(opt_state).kept_fraction)  # floor(0.25 * 8) of 8
    0.25

  Raises:
    ValueError: if there is no `online_merge` state with ``track_stats=True``,
      or more than one (then pass the sub-state you want).
  """
  is_merge_state = lambda x: isinstance(x, OnlineMergeState)
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=is_merge_state)
    if is_merge_state(s) and s.stats is not None
  ]
  if len(found) != 1:
    raise ValueError(
      f"expected one online_merge state with track_stats=True in opt_state, found {len(found)}"
    )
  return jax.tree.map(lambda x: getattr(x, "value", x), found[0].stats)
