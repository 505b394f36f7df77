"""Offline merging of whole models (the paper's baselines), Sec. 11 of the spec.

Each merge takes the base params and the fine-tuned models' params, forms the
task vectors :math:`\\tau_i = \\theta_i - \\theta_b` and returns merged params.
The sparsifiers are those of the online path (`omerge_jax.sparsify`). Task
vectors and sums are computed in float32 (or wider) and the result cast to
each base leaf's dtype, so that ``linear(base, [m], [1.0])`` gives ``m`` back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from omerge_jax import _validation as checks
from omerge_jax import sparsify


def _task_vectors(base, models, weights):
  if len(models) == 0:
    raise ValueError("models must hold at least one param pytree")
  if len(weights) != len(models):
    raise ValueError(f"weights has {len(weights)} entries but models has {len(models)}")
  for w in weights:
    checks.check_range("weights", w, -1e9, 1e9)
  return [
    checks.align_with_params(
      base, m, lambda b, t, *_: _wide(t) - _wide(b), names=("base", f"models[{j}]")
    )
    for j, m in enumerate(models)
  ]


def _wide(x):
  """``x`` in float32 or wider: a bfloat16 task vector or sum would lose the model's low bits."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _add(base, merged_delta):
  return jax.tree.map(lambda b, d: (_wide(b) + d).astype(b.dtype), base, merged_delta)


def linear(
  base: optax.Params, models: Sequence[optax.Params], weights: Sequence[float]
) -> optax.Params:
  r"""Task arithmetic: :math:`\theta_b + \sum_i w_i \tau_i`.

  ``linear(sft, [rlhf], [0.3])`` interpolates 30% of the way from the SFT
  model to the RLHF model (with ``base=sft``).

  Example:
    >>> import jax.numpy as jnp
    >>> from omerge_jax import offline
    >>> sft, rlhf = {"w": jnp.zeros(2)}, {"w": jnp.array([1.0, -2.0])}
    >>> offline.linear(sft, [rlhf], [0.3])["w"]
    Array([ 0.3, -0.6], dtype=float32)
  """
  taus = _task_vectors(base, models, weights)
  merged = jax.tree.map(lambda *t: sum(w * x for w, x in zip(weights, t, strict=True)), *taus)
  return _add(base, merged)


def dare(
  base: optax.Params,
  models: Sequence[optax.Params],
  weights: Sequence[float],
  *,
  density: float,
  seed: int = 0,
  leaf_offset: int = 0,
) -> optax.Params:
  r"""DARE: drop each task-vector entry with prob. :math:`1-p`, rescale by :math:`1/p`, then linear.

  The mask of an entry is a hash of ``(seed, model, leaf index, coordinates)``.
  ``leaf_offset`` is the index of the first leaf of ``base`` in a larger
  tree: merging a model piece by piece, each piece with the index of its
  first leaf, draws the masks of one call on the whole tree
  (``experiments.llm_merge`` merges checkpoints tensor by tensor so).

  Example:
    >>> import jax.numpy as jnp
    >>> from omerge_jax import offline
    >>> base, model = {"w": jnp.zeros(8)}, {"w": jnp.ones(8)}
    >>> offline.dare(base, [model], [0.5], density=0.5)["w"]  # kept: 0.5 * 1 / 0.5
    Array([0., 1., 0., 0., 1., 0., 0., 1.], dtype=float32)
  """
  checks.check_range("density", density, 0.0, 1.0, low_open=True)
  checks.check_seed(seed)
  taus = _task_vectors(base, models, weights)
  sparse = []
  for model_index, tau in enumerate(taus):
    leaves, treedef = jax.tree.flatten(tau)
    sparse.append(
      treedef.unflatten(
        [
          sparsify.dare(
            x, density, seed=seed, stream=2 + model_index, step=0, leaf_index=leaf_offset + i
          )
          for i, x in enumerate(leaves)
        ]
      )
    )
  merged = jax.tree.map(lambda *t: sum(w * x for w, x in zip(weights, t, strict=True)), *sparse)
  return _add(base, merged)


def ties(
  base: optax.Params,
  models: Sequence[optax.Params],
  weights: Sequence[float] | None = None,
  *,
  density: float,
  stacked_axes: Any = None,
) -> optax.Params:
  r"""TIES: trim, elect sign, disjoint (weighted) mean.

  Each :math:`\tau_i` is trimmed to its :math:`\lfloor p n\rfloor` largest
  magnitudes per leaf (:math:`T`), the sign :math:`s = \mathrm{sign}
  \sum_i w_i T(\tau_i)` is elected per entry, and the merged delta is the
  weighted mean of the entries that agree with it:
  :math:`\sum_{i: agree} w_i T(\tau_i) / \sum_{i: agree} w_i` (0 where none).
  With equal weights this is the disjoint mean of Yadav et al. (2023).

  ``stacked_axes`` (an int, a pytree of ints or a callable ``(path, leaf) ->
  int``, as in `omerge_jax.online_merge`) names the leading axes that index
  separate tensors; each slice is trimmed on its own.

  The weights are relative (a weighted mean): scaling them all changes
  nothing. With one model a weight would have no effect, unlike in `linear`,
  so a weight other than 1 is refused; scale the trimmed delta with
  ``linear(base, [ties(base, [m], density=p)], [w])`` instead.

  Example:
    Each task vector keeps its 2 largest of 4 entries; the elected signs are
    those of ``[4, -1, 0, 0]``:

    >>> import jax.numpy as jnp
    >>> from omerge_jax import offline
    >>> base = {"w": jnp.zeros(4)}
    >>> a, b = {"w": jnp.array([1.0, -2.0, 0.5, 0.0])}, {"w": jnp.array([3.0, 1.0, -0.5, 0.0])}
    >>> offline.ties(base, [a, b], density=0.5)["w"]  # [(1 + 3) / 2, -2, 0, 0]
    Array([ 2., -2.,  0.,  0.], dtype=float32)
  """
  weights = [1.0] * len(models) if weights is None else list(weights)
  if len(models) == 1 and len(weights) == 1 and weights[0] != 1:
    raise ValueError(
      f"weights of offline.ties are relative: with one model a weight of {weights[0]!r} "
      "would be ignored; pass [1.0] (or None) and scale with offline.linear"
    )
  checks.check_range("density", density, 0.0, 1.0, low_open=True)
  checks.check_ties_leaf_sizes(base, "base")
  checks.check_ties_dtypes(base, "base")
  for j, model in enumerate(models):
    checks.check_ties_dtypes(model, f"models[{j}]")
  stacked = checks.stacked_axes_per_leaf(stacked_axes, base, "base")
  taus = _task_vectors(base, models, weights)
  trimmed = []
  for tau in taus:
    leaves, treedef = jax.tree.flatten(tau)
    trimmed.append(
      treedef.unflatten(
        [sparsify.ties(x, density, "exact", s) for x, s in zip(leaves, stacked, strict=True)]
      )
    )

  def elect_and_mean(*xs):
    stacked = jnp.stack(xs)
    w = jnp.asarray(weights, stacked.dtype).reshape((-1,) + (1,) * (stacked.ndim - 1))
    sign = jnp.where(jnp.sum(w * stacked, axis=0) >= 0, 1.0, -1.0)
    agree = jnp.sign(stacked) == sign
    total = jnp.sum(jnp.where(agree, w * stacked, 0), axis=0)
    weight = jnp.sum(jnp.where(agree, w, 0), axis=0)
    return jnp.where(weight != 0, total / jnp.where(weight != 0, weight, 1), 0)

  merged = jax.tree.map(elect_and_mean, *trimmed)
  return _add(base, merged)
