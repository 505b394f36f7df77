"""`ondare` and `onties`: Adam, learning rate, online merge, decoupled weight decay."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from omerge_jax import _validation as checks
from omerge_jax import trim
from omerge_jax.transform import online_merge


def decoupled_weight_decay(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: optax.ScalarOrSchedule,
  mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Add :math:`-\eta_t \lambda_t \theta` to the update, after the merge.

  Kept apart from the merged update so that weight decay is never sparsified
  or merged, and follows the learning-rate schedule :math:`\eta_t` as in
  ``optax.adamw``.

  Example:

    >>> import jax.numpy as jnp, omerge_jax
    >>> tx = omerge_jax.decoupled_weight_decay(0.1, 0.5, mask={"w": True, "b": False})
    >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> updates["w"], updates["b"]
    (Array([0.95, 0.95], dtype=float32), Array([1., 1.], dtype=float32))

  Args:
    learning_rate: :math:`\eta`, a scalar or a schedule of the step.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule of the step.
    mask: as in ``optax.adamw``: a pytree of booleans shaped like the params
      (or a prefix of it), or a callable of the params returning one; weight
      decay applies where it is True. ``None`` decays every leaf.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``.
  """
  checks.check_nonnegative("weight_decay", weight_decay)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("decoupled_weight_decay needs params: call update(updates, state, params)")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    decay = weight_decay(state.count) if callable(weight_decay) else weight_decay
    updates = jax.tree.map(lambda u, p: u - (lr * decay * p).astype(u.dtype), updates, params)
    return updates, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def _adam_merge(learning_rate, b1, b2, eps, weight_decay, mask, merge, sampled_trim=False):
  checks.check_positive("learning_rate", learning_rate)
  # Adam divides by 1 - b**t: b = 1 makes every update non-finite.
  checks.check_range("b1", b1, 0.0, 1.0, high_open=True)
  checks.check_range("b2", b2, 0.0, 1.0, high_open=True)
  checks.check_nonnegative("eps", eps)
  checks.check_nonnegative("weight_decay", weight_decay)
  parts = [
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.scale_by_learning_rate(learning_rate),
    merge,
  ]
  # A Python zero skips the pass over the params. An injected (array) weight
  # decay keeps it, so that init and update build the same chain.
  if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
    parts.append(decoupled_weight_decay(learning_rate, weight_decay, mask))
  if sampled_trim:
    return _sampling_adam(parts, b1, b2, eps)
  return optax.chain(*parts)


def _sampling_adam(parts, b1, b2, eps):
  """``optax.chain(*parts)``, with the sampled trim's sample taken from Adam's moments.

  ``parts`` are `optax.scale_by_adam` (``b1, b2, eps``), its learning rate, the
  TIES merge and optionally weight decay. The sampled threshold reads a fixed
  sample of Adam's update; taken from the update, it gives the update a
  second consumer, and XLA writes the whole update to memory (a
  parameter-sized buffer per leaf, every step). Here the new moments, which
  are written out anyway, are sampled (`trim.take_sample`) and Adam's last
  formula, ``mu_hat / (sqrt(nu_hat) + eps)``, runs on the samples, while the
  update is computed once, inside the final loop. The state is the chain's.
  That is the route for CPU and GPU; on TPU the chain itself runs.

  The sample is the same formula on the same values, but XLA evaluates it
  twice (on the sample and in the final loop) and its algebraic simplifier
  may rewrite the divisions differently in the two places, so the two can
  differ in the last bit: an entry within one ulp of the threshold may then
  be kept where the chain drops it, or the reverse. Away from Adam's first
  step (where every magnitude is the learning rate up to rounding) that is
  almost never an entry at all.
  """
  adam, lr, merge, *rest = parts
  chain = optax.chain(*parts)
  sample = lambda tree: jax.tree.map(trim.take_sample, tree)

  def sampling_update(updates, state, params, **extra_args):
    adam_state, lr_state, merge_state, *rest_states = state
    updates, adam_state = adam.update(updates, adam_state, params)
    # As optax.scale_by_adam computes it from the moments (eps_root 0, no Nesterov).
    mu_hat = optax.tree.bias_correction(sample(adam_state.mu), b1, adam_state.count)
    nu_hat = optax.tree.bias_correction(sample(adam_state.nu), b2, adam_state.count)
    update_sample = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
    update_sample, _ = lr.update(update_sample, lr_state)
    updates, lr_state = lr.update(updates, lr_state, params)
    updates, merge_state = merge.update(
      updates, merge_state, params, update_sample=update_sample, **extra_args
    )
    new_rest = []
    for part, part_state in zip(rest, rest_states, strict=True):
      updates, part_state = part.update(updates, part_state, params, **extra_args)
      new_rest.append(part_state)
    return updates, (adam_state, lr_state, merge_state, *new_rest)

  def update_fn(updates, state, params=None, **extra_args):
    # On TPU the chain, which samples the update itself: the TPU compiler
    # charges a gather about one (8, 128) tile per gathered entry, so one
    # gather (of the update) beats two (of the moments), and it stages the
    # update on chip between its two uses (benchmarks/RESULTS.md, the TPU plan).
    return lax.platform_dependent(
      updates,
      state,
      params,
      tpu=functools.partial(chain.update, **extra_args),
      default=functools.partial(sampling_update, **extra_args),
    )

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)


def ondare(
  learning_rate: optax.ScalarOrSchedule,
  reference_delta: optax.Updates,
  *,
  alpha: optax.ScalarOrSchedule = 1e-7,
  reserve_p: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
  rescale: bool = False,
  clip: float | None = 1.0,
  merge_every: int = 1,
  resample_reference: bool = False,
  reference_dtype: Any = None,
  stacked_axes: Any = None,
  seed: int = 0,
  track_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""OnDARE: Adam whose every step is DARE-merged with the SFT task vector.

  With :math:`\Delta_t = -\eta_t\,\mathrm{Adam}(g_t)`, a Bernoulli(:math:`p`)
  mask :math:`M_t` drawn fresh every step and a mask :math:`M_\tau` drawn once:

  .. math::

    \theta_{t+1} = \theta_t
      + (1-\alpha)\,\frac{M_t \odot \Delta_t}{p}
      + \alpha\,\mathrm{clip}\Big(\frac{M_\tau \odot \tau_r}{p}\Big)
      - \eta_t \lambda \theta_t .

  With :math:`\alpha = 0, p = 1` it is AdamW (bit for bit without weight
  decay; with it, ``optax.adamw`` rounds :math:`-\eta(a + \lambda\theta)`
  where this adds :math:`-\eta a - \eta\lambda\theta`); with :math:`\alpha = 0, p < 1`
  it is unbiased gradient dropout (ChildTuning-F).

  Example:

    >>> import jax, jax.numpy as jnp, optax, omerge_jax
    >>> base = {"w": jnp.zeros(8)}
    >>> sft = {"w": jnp.linspace(-1.0, 1.0, 8)}
    >>> tx = omerge_jax.ondare(1e-3, omerge_jax.reference_delta(sft, base), reserve_p=0.5)
    >>> params, state = sft, tx.init(sft)
    >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

    With :math:`\alpha = 0, p = 1` it is AdamW:

    >>> tau = {"w": jnp.zeros(8)}
    >>> tx = omerge_jax.ondare(1e-3, tau, alpha=0.0, reserve_p=1.0, weight_decay=0.1)
    >>> adamw = optax.adamw(1e-3, weight_decay=0.1)
    >>> ours, _ = tx.update(grads, tx.init(sft), sft)
    >>> theirs, _ = adamw.update(grads, adamw.init(sft), sft)
    >>> bool(jnp.allclose(ours["w"], theirs["w"], rtol=1e-6))
    True

  Args:
    learning_rate: :math:`\eta`, a scalar or an Optax schedule.
    reference_delta: :math:`\tau_r` = SFT minus base params (see
      `omerge_jax.reference_delta`), shaped like the params.
    alpha: merging weight :math:`\alpha` in [0, 1], scalar or schedule.
    reserve_p: reserve rate :math:`p` in (0, 1].
    b1: Adam's decay rate of the first moment (``optax.scale_by_adam``).
    b2: Adam's decay rate of the second moment.
    eps: Adam's epsilon, added to the root of the second moment.
    weight_decay: decoupled weight decay :math:`\lambda`, never sparsified;
      a scalar or a schedule of the step.
    mask: which leaves weight decay applies to, as in ``optax.adamw`` (a
      pytree of booleans or a callable of the params); ``None``: all.
    rescale: L1-rescale the sparsified update (off: harms stability).
    clip: clip of the sparsified reference delta; ``None`` disables.
    merge_every: step-K merging period K.
    resample_reference: fresh mask for :math:`\tau_r` every step.
    reference_dtype: storage dtype of the reference delta (e.g. bfloat16).
    stacked_axes: checked and accepted so that one description of a model's
      stacked leaves serves both aliases; DARE is per entry, so it changes
      nothing (see `onties`).
    seed: seed of the masks.
    track_stats: record `omerge_jax.MergeStats` every step.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Lu et al., `Online Merging Optimizers for Boosting Rewards and Mitigating
    Tax in Alignment <https://arxiv.org/abs/2405.17931>`_, 2024 (Alg. 1, Eq. 5).
  """
  merge = online_merge(
    reference_delta,
    method="dare",
    alpha=alpha,
    reserve_p=reserve_p,
    rescale=rescale,
    clip=clip,
    merge_every=merge_every,
    resample_reference=resample_reference,
    reference_dtype=reference_dtype,
    stacked_axes=stacked_axes,
    seed=seed,
    track_stats=track_stats,
  )
  return _adam_merge(learning_rate, b1, b2, eps, weight_decay, mask, merge)


def onties(
  learning_rate: optax.ScalarOrSchedule,
  reference_delta: optax.Updates,
  *,
  alpha: optax.ScalarOrSchedule = 1e-7,
  reserve_p: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
  rescale: bool = False,
  sign_election: str = "reference",
  merge_every: int = 1,
  topk: str = "exact",
  stacked_axes: Any = None,
  reference_dtype: Any = None,
  track_stats: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""OnTIES: Adam whose every step is TIES-merged with the SFT task vector.

  With :math:`\Delta_t = -\eta_t\,\mathrm{Adam}(g_t)` and :math:`T_p` the
  per-leaf trim to the :math:`\lfloor p n \rfloor` largest magnitudes:

  .. math::

    s = \mathrm{sign}\big(T_p(\tau_r) + T_p(\Delta_t)\big), \quad
    \theta_{t+1} = \theta_t + \alpha\,[T_p(\tau_r)]_{s}
      + (1-\alpha)\,[T_p(\Delta_t)]_{s} - \eta_t\lambda\theta_t ,

  where :math:`[x]_s` keeps the entries of :math:`x` whose sign is :math:`s`
  (``sign_election="reference"``, the public code). ``"weighted"`` elects by
  the weighted terms instead (the paper's Eq. 7, `omerge_jax.consensus`).
  With :math:`\tau_r = 0, p = 1` it is AdamW.

  Example:
    Adam's first step is :math:`-\eta\,\mathrm{sign}(g)`; of the 4 entries
    kept (the magnitudes tie: the first 4), the second goes against the SFT
    direction :math:`\tau_r` and is dropped (:math:`\alpha = 0` shows the
    step alone):

    >>> import jax.numpy as jnp, omerge_jax
    >>> base = {"w": jnp.zeros(8)}
    >>> sft = {"w": jnp.linspace(-1.0, 1.0, 8)}
    >>> tau = omerge_jax.reference_delta(sft, base)
    >>> tx = omerge_jax.onties(1e-3, tau, reserve_p=0.5, alpha=0.0)
    >>> grads = {"w": jnp.array([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 7.0, -8.0])}
    >>> updates, state = tx.update(grads, tx.init(sft), sft)
    >>> updates["w"]
    Array([-0.00099999,  0.        , -0.00099999,  0.00099999,  0.        ,
            0.        ,  0.        ,  0.        ], dtype=float32)

  Args:
    learning_rate: :math:`\eta`, a scalar or an Optax schedule.
    reference_delta: :math:`\tau_r` = SFT minus base params.
    alpha: merging weight :math:`\alpha` in [0, 1], scalar or schedule.
    reserve_p: reserve rate :math:`p` in (0, 1].
    b1: Adam's decay rate of the first moment (``optax.scale_by_adam``).
    b2: Adam's decay rate of the second moment.
    eps: Adam's epsilon, added to the root of the second moment.
    weight_decay: decoupled weight decay :math:`\lambda`, never sparsified;
      a scalar or a schedule of the step.
    mask: which leaves weight decay applies to, as in ``optax.adamw`` (a
      pytree of booleans or a callable of the params); ``None``: all.
    rescale: L1-rescale the trimmed update (off: harms stability).
    sign_election: ``"reference"`` (default) or ``"weighted"``.
    merge_every: step-K merging period K.
    topk: ``"exact"`` (ties by row-major position) or ``"sampled"``.
    stacked_axes: leading axes of a leaf that index separate tensors (e.g. 1
      for ``nnx.scan``-stacked layers), trimmed one slice at a time: an int, a
      pytree of ints or a callable ``(path, leaf) -> int``
      (see `omerge_jax.online_merge`).
    reference_dtype: storage dtype of the reference delta (e.g. bfloat16).
    track_stats: record `omerge_jax.MergeStats` every step.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Lu et al., `Online Merging Optimizers for Boosting Rewards and Mitigating
    Tax in Alignment <https://arxiv.org/abs/2405.17931>`_, 2024 (Eqs. 6-7).
  """
  merge = online_merge(
    reference_delta,
    method="ties",
    alpha=alpha,
    reserve_p=reserve_p,
    rescale=rescale,
    sign_election=sign_election,
    merge_every=merge_every,
    topk=topk,
    stacked_axes=stacked_axes,
    reference_dtype=reference_dtype,
    track_stats=track_stats,
  )
  # The sample is of the update itself only when step-K does not add an accumulator to it.
  sampled_trim = topk == "sampled" and merge_every == 1
  return _adam_merge(learning_rate, b1, b2, eps, weight_decay, mask, merge, sampled_trim)
