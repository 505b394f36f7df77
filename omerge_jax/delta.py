"""The reference delta (task vector) :math:`\\tau_r = \\theta_{SFT} - \\theta_{base}`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax

from omerge_jax import _validation as checks


def reference_delta(
  sft_params: optax.Params, base_params: optax.Params, *, dtype: Any = None
) -> optax.Params:
  r"""Leaf-by-leaf :math:`\tau_r = \theta_{\mathrm{SFT}} - \theta_{\mathrm{base}}`.

  The subtraction is done in float32 (or wider) and the result cast to
  ``dtype`` (default: the SFT leaf's dtype). It runs leaf by leaf and keeps
  each leaf's sharding, so on a mesh no leaf is gathered onto one device.

  Example:

    >>> import jax.numpy as jnp, omerge_jax
    >>> tau = omerge_jax.reference_delta({"w": jnp.ones(3)}, {"w": jnp.zeros(3)})
    >>> tau["w"]
    Array([1., 1., 1.], dtype=float32)

  Args:
    sft_params: the SFT (reference) model's parameters.
    base_params: the pre-trained (base) model's parameters, same structure
      and shapes.
    dtype: dtype of the result, e.g. ``jnp.bfloat16`` to halve its memory.

  Returns:
    A pytree shaped like ``sft_params``.

  Raises:
    ValueError: the trees differ in structure or a leaf in shape (the message
      names the leaf path and both shapes), or a leaf of either model holds a
      NaN or an infinity (named).
    TypeError: a leaf is not a floating array.
  """
  dtype = checks.check_dtype("dtype", dtype)
  checks.check_reference_tree(sft_params, "sft_params")
  checks.check_reference_tree(base_params, "base_params")
  checks.check_finite_tree(sft_params, "sft_params")
  checks.check_finite_tree(base_params, "base_params")

  def subtract(sft, base, *_):
    wide = jnp.promote_types(sft.dtype, jnp.float32)
    return (jnp.asarray(sft, wide) - jnp.asarray(base, wide)).astype(dtype or sft.dtype)

  return checks.align_with_params(
    sft_params, base_params, subtract, names=("sft_params", "base_params")
  )
