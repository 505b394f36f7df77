"""Consensus operators, the paper's merge of a sparsified update with the reference delta.

All three take the sparsified update :math:`F(\\Delta)`, the sparsified reference
delta :math:`F(\\tau)` and the merging weight :math:`\\alpha`, elementwise:

* `linear` (OnDARE, the paper's Eq. 5):
  :math:`(1-\\alpha) F(\\Delta) + \\alpha F(\\tau)`.
* `ties_reference` (OnTIES, the authors' public code, our default): elect
  :math:`s = \\mathrm{sign}(F(\\tau) + F(\\Delta))` (zero counts as +), keep each
  term only where its own sign equals :math:`s`, then combine linearly.
* `ties_weighted` (OnTIES, the paper's Eq. 7): with
  :math:`a = (1-\\alpha)F(\\Delta)`, :math:`b = \\alpha F(\\tau)`: :math:`a + b`
  where the signs agree, otherwise the term of larger magnitude (both, so that
  they cancel, when equal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def linear(update: jax.Array, reference: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """OnDARE: ``(1 - alpha) * update + alpha * reference``."""
  return (1 - alpha) * update + alpha * reference


def ties_reference(update: jax.Array, reference: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """OnTIES with the unweighted sign election of the public implementation.

  Because ``|tau|`` is usually far larger than one step, this keeps a step's
  coordinate only where it agrees in sign with the SFT direction.
  """
  elected = jnp.where(reference + update >= 0, 1, -1)
  # sign(0) == 0 never equals +-1: a zero term is never kept.
  reference_kept = jnp.where(jnp.sign(reference) == elected, reference, 0)
  update_kept = jnp.where(jnp.sign(update) == elected, update, 0)
  return alpha * reference_kept + (1 - alpha) * update_kept


def ties_weighted(update: jax.Array, reference: jax.Array, alpha: jax.Array | float) -> jax.Array:
  """OnTIES with the paper's magnitude-weighted election (Eq. 7)."""
  a = (1 - alpha) * update
  b = alpha * reference
  larger = jnp.where(jnp.abs(a) > jnp.abs(b), a, b)
  agree = (jnp.sign(a) == jnp.sign(b)) | (jnp.abs(a) == jnp.abs(b))
  return jnp.where(agree, a + b, larger)
