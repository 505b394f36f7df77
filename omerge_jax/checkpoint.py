"""Abstract optimizer states, the restore targets Orbax needs to reshard a checkpoint.

Every field of `omerge_jax.OnlineMergeState` is a plain array (the DARE masks
are a hash of ``(seed, step, leaf, coordinates)``, so there is no PRNG key to
serialise), and Orbax's standard handlers save and restore it as it is. To
restore onto a different mesh, Orbax needs a target: a pytree of
``jax.ShapeDtypeStruct`` with the new shardings. `abstract_state` builds it
for any Optax transformation from the (abstract) params.
"""

from __future__ import annotations

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec


def abstract_state(
  tx: optax.GradientTransformation,
  params: optax.Params,
  *,
  replicated: jax.sharding.Sharding | None = None,
) -> optax.OptState:
  """The shape, dtype and sharding of ``tx.init(params)``, without computing it.

  A leaf of the state whose key path ends with the key path of a param and
  that has the param's shape (Adam's moments, the reference delta, the
  step-K accumulator: ``mu['dense']['w']`` for ``params['dense']['w']``)
  takes that param's sharding; the longest such path wins. Every other leaf
  (step counters, statistics) is replicated. Matching by path rather than
  with ``optax.tree.map_params`` works for any ``init``, including those that
  look at the params' values. Nothing is allocated: ``tx.init`` runs under
  ``jax.eval_shape``.

  Example:
    The optimizer may be built from an abstract reference delta too: the
    restore reads the state's values, reference included, from the checkpoint.

    >>> import jax, jax.numpy as jnp, omerge_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> from omerge_jax.checkpoint import abstract_state
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> target_params = {"w": jax.ShapeDtypeStruct(
    ...     (1024, 512), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))}
    >>> tx = omerge_jax.ondare(1e-6, target_params, merge_every=4)
    >>> target = {"params": target_params, "opt_state": abstract_state(tx, target_params)}
    >>> merge_state = target["opt_state"][2]
    >>> merge_state.reference["w"].sharding.spec == P("fsdp")  # as the param
    True
    >>> merge_state.accumulator["w"].sharding.spec == P("fsdp")
    True
    >>> merge_state.count.sharding.spec == P()  # replicated
    True
    >>> import orbax.checkpoint as ocp  # doctest: +SKIP
    >>> restored = ocp.StandardCheckpointer().restore(path, target)  # doctest: +SKIP

  Args:
    tx: the optimizer, built exactly as for the run that saved the state.
    params: the params or a pytree of ``jax.ShapeDtypeStruct`` whose
      ``sharding`` (required) is the target sharding of each leaf.
    replicated: the sharding of the leaves that are not shaped like a param;
      by default, replicated over the mesh of the first param.

  Returns:
    A pytree of ``jax.ShapeDtypeStruct`` with the structure of
    ``tx.init(params)``, to pass as Orbax's restore target.

  Raises:
    ValueError: a leaf of ``params`` has no sharding (the path is named).
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if getattr(leaf, "sharding", None) is None:
      raise ValueError(
        f"params{jax.tree_util.keystr(path)} has no sharding: pass arrays or "
        "jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
      )
    by_path[tuple(path)] = leaf
  if replicated is None:
    first = next(iter(by_path.values())).sharding
    # A single-device (or other non-mesh) sharding is already "replicated".
    replicated = (
      NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    )

  def target(path, leaf):
    for start in range(len(path) + 1):
      param = by_path.get(tuple(path[start:]))
      if param is not None and tuple(param.shape) == tuple(leaf.shape):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=param.sharding)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)

  return jax.tree_util.tree_map_with_path(target, jax.eval_shape(tx.init, params))
