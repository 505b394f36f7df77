"""Arrays built to match a leaf's sharding, for the DARE hash and the TIES trim.

Under Explicit mesh axes a leaf's sharding is part of its type, and an array
combined with it (an iota of coordinates) must carry the same sharding.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def explicit_axes(x):
  """Mesh axes of each axis of ``x`` when they are in its type (Explicit mesh axes).

  ``None`` otherwise (no mesh, or Auto axes that the compiler partitions).
  Arrays built from iotas must then carry the same sharding as ``x``: under
  Explicit axes, combining a replicated array with a sharded one is an error.
  """
  sharding = jax.typeof(x).sharding
  if jax.sharding.AxisType.Explicit not in tuple(sharding.mesh.axis_types):
    return None
  return sharding.mesh, tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))


def axes_of(axes, dims):
  """The mesh axes of some of a leaf's axes (``None`` stays ``None``)."""
  return None if axes is None else (axes[0], tuple(axes[1][d] for d in dims))


def iota(shape, axis, axes):
  """``broadcasted_iota`` over ``shape``, sharded like a leaf with mesh ``axes``."""
  if axes is None:
    return lax.broadcasted_iota(jnp.uint32, shape, axis)
  mesh, spec = axes
  return lax.broadcasted_iota(
    jnp.uint32, shape, axis, out_sharding=jax.sharding.NamedSharding(mesh, P(*spec))
  )


def place_like(x, like):
  """``x`` laid out as ``like`` is, never gathered onto one device.

  A concrete ``like`` (an eager ``init``) gets ``x`` put shard by shard on its
  sharding; a traced one under Explicit mesh axes gets ``x`` resharded to its
  type, so that a state built under ``jit`` has the type of one built eagerly.
  Otherwise (Auto axes under ``jit``, abstract params) ``x`` is left to the
  compiler.
  """
  if isinstance(like, jax.Array) and not isinstance(like, jax.core.Tracer):
    return jax.device_put(x, like.sharding)
  if isinstance(like, jax.core.Tracer) and explicit_axes(like) is not None:
    return jax.sharding.reshard(jnp.asarray(x), jax.typeof(like).sharding)
  return jnp.asarray(x)
