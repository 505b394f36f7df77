"""Input checks, run at construction and at ``init`` so that bad input fails early.

Every message names the argument or the leaf path and what was expected.
Traced values (a hyper-parameter injected by ``optax.inject_hyperparams``
inside ``jit``) and schedules cannot be checked eagerly and are let through.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from omerge_jax import trim


def concrete_float(name, value):
  """``float(value)`` for a concrete scalar, ``None`` for a schedule or a tracer."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be a real number or a schedule, got {value!r}") from e


def check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")


def check_range(name, value, low, high, *, low_open=False, high_open=False, allow_none=False):
  """Check ``low <(=) value <(=) high`` for a concrete value (NaN fails)."""
  if value is None and allow_none:
    return
  v = concrete_float(name, value)
  if v is None:
    return
  low_ok = v > low if low_open else v >= low
  high_ok = v < high if high_open else v <= high
  if not (low_ok and high_ok):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    raise ValueError(f"{name} must be in {interval}, got {value!r}")


def check_static_number(name, value):
  """A hyper-parameter fixed when the transform is built: a Python or NumPy number.

  Not a schedule, and not an array: ``optax.inject_hyperparams`` turns every
  numeric argument it is not told is static into an array (rounded to the
  params' dtype), which could change between ``init`` and ``update``.
  """
  if callable(value):
    raise TypeError(f"{name} must be a number, not a schedule, got {value!r}")
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
      f"{name} must be a Python number, got {type(value).__name__} ({value!r}): it is fixed "
      "when the transform is built; under optax.inject_hyperparams list it in static_args, "
      "e.g. static_args=('reserve_p', 'merge_every')"
    )


def check_seed(seed):
  """A seed fits int32: the type ``optax.inject_hyperparams`` gives an integer argument."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, jax.Array)):
    raise TypeError(f"seed must be an integer, got {seed!r}")
  if isinstance(seed, jax.core.Tracer):
    return
  if not 0 <= int(seed) <= 2**31 - 1:
    raise ValueError(f"seed must be in [0, 2**31 - 1], got {seed!r}")


def check_positive(name, value, *, allow_none=False):
  if value is None and allow_none:
    return
  v = concrete_float(name, value)
  if v is not None and not v > 0:
    raise ValueError(f"{name} must be a positive number, got {value!r}")


def check_nonnegative(name, value):
  v = concrete_float(name, value)
  if v is not None and not v >= 0:
    raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_merge_every(value):
  """K fixes the state's structure (an accumulator or none): a static integer >= 1."""
  if isinstance(value, (jax.Array, np.ndarray)):
    check_static_number("merge_every", value)
  if (
    isinstance(value, bool)
    or not isinstance(value, numbers.Real)
    or not (float(value).is_integer() and float(value) >= 1)
  ):
    raise ValueError(f"merge_every must be an integer >= 1, got {value!r}")


def check_dtype(name, value):
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise TypeError(f"{name} must be a floating dtype or None, got {value!r}") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating dtype or None, got {dtype}")
  return dtype


def _is_array(x):
  # NumPy scalars (np.float32(0.5)) are arrays of shape (); Python floats are not.
  return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def check_reference_tree(reference_delta, name="reference_delta"):
  """Every leaf is a floating array (a Python scalar or a string is not)."""
  leaves = jax.tree_util.tree_leaves_with_path(reference_delta)
  if not leaves:
    raise ValueError(f"{name} has no array leaves")
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path) or "<root>"
    if not _is_array(leaf):
      raise TypeError(
        f"{name}{where} must be an array (jax.Array or numpy.ndarray), got {type(leaf).__name__}"
      )
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"{name}{where} must have a floating dtype, got {leaf.dtype}")


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def align_with_params(params, reference_delta, fn, names=("params", "reference_delta")):
  """``fn(param, reference_leaf, index, path)`` over matching leaves.

  ``index`` is the leaf's position among the leaves of ``reference_delta``
  (`reference_indices`), whatever ``optax.masked`` replaced in ``params``.

  Positions masked out by ``optax.masked`` (``MaskedNode`` in ``params``) stay
  masked. A different tree structure or leaf shape raises a ValueError that
  names the first leaf path that differs and both shapes.
  """
  param_leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
  try:
    reference_leaves = treedef.flatten_up_to(reference_delta)
  except (ValueError, TypeError) as e:
    ref_paths = {
      jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(reference_delta)
    }
    par_paths = {jax.tree_util.keystr(p) for p, x in param_leaves if not _is_masked(x)}
    only_params = sorted(par_paths - ref_paths)[:3]
    only_ref = sorted(ref_paths - par_paths)[:3]
    raise ValueError(
      f"{names[1]} must have the same tree structure as {names[0]}; "
      f"leaves only in {names[0]}: {only_params}, only in {names[1]}: {only_ref}"
    ) from e
  out = []
  indices = reference_indices(reference_leaves)
  for (path, param), ref, index in zip(param_leaves, reference_leaves, indices, strict=True):
    if _is_masked(param):
      out.append(param)
      continue
    if not _is_array(ref):
      raise TypeError(
        f"{names[1]}{jax.tree_util.keystr(path)} must be an array, got {type(ref).__name__}"
      )
    if tuple(param.shape) != tuple(ref.shape):
      raise ValueError(
        f"{names[1]}{jax.tree_util.keystr(path)} has shape {tuple(ref.shape)} "
        f"but {names[0]}{jax.tree_util.keystr(path)} has shape {tuple(param.shape)}"
      )
    out.append(fn(param, ref, index, path))
  return jax.tree_util.tree_unflatten(treedef, out)


def reference_indices(subtrees):
  """Position in the reference tree of the first leaf of each of its ``subtrees``.

  ``subtrees`` is ``treedef.flatten_up_to(reference)`` for the treedef of a
  tree shaped like it, where ``optax.masked`` may have replaced whole
  subtrees by one ``MaskedNode``: each live leaf then keeps the index it has
  in the reference (its stacked axes, its DARE key), masked or not.
  """
  starts, start = [], 0
  for subtree in subtrees:
    starts.append(start)
    start += len(jax.tree.leaves(subtree))
  return starts


def check_ties_leaf_sizes(tree, name):
  """Name the first leaf too large for TIES, before anything is traced."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_masked):
    size = int(np.prod(getattr(leaf, "shape", ()), dtype=np.int64))
    if size > trim.TIES_MAX_ENTRIES:
      raise ValueError(
        f"{name}{jax.tree_util.keystr(path)} has {size} entries: TIES counts a leaf's "
        "entries in uint32, so a leaf must have fewer than 2**32; split it (or use DARE)"
      )


def stacked_axes_per_leaf(stacked_axes, tree, tree_name):
  """How many leading axes of each leaf of ``tree`` index separate tensors (SPEC 13).

  ``stacked_axes`` is ``None`` (none), one integer for every leaf, a pytree
  of integers shaped like ``tree``, or a callable ``(path, leaf) -> int`` (as ``optax.masked``
  takes a mask or a function of the params). Returns a list in the order of
  the leaves of ``tree``; each count is checked against its leaf's rank.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
  if stacked_axes is None:
    return [0] * len(leaves)
  if isinstance(stacked_axes, jax.core.Tracer):
    raise TypeError(
      "stacked_axes fixes shapes and cannot be traced: under optax.inject_hyperparams "
      "list it in static_args"
    )
  if isinstance(stacked_axes, jax.Array) and stacked_axes.ndim == 0:
    stacked_axes = int(stacked_axes)
  if callable(stacked_axes):
    counts = [0 if _is_masked(x) else stacked_axes(path, x) for path, x in leaves]
  elif isinstance(stacked_axes, (int, np.integer)):
    counts = [stacked_axes] * len(leaves)
  else:
    try:
      counts = treedef.flatten_up_to(stacked_axes)
    except (ValueError, TypeError) as e:
      raise ValueError(
        f"stacked_axes must be an integer, a callable (path, leaf) -> int or a pytree of "
        f"integers with the structure of {tree_name}: {e}"
      ) from e
  for (path, leaf), count in zip(leaves, counts, strict=True):
    if _is_masked(leaf):
      continue
    ndim = len(leaf.shape)
    if (
      isinstance(count, bool) or not isinstance(count, (int, np.integer)) or not 0 <= count <= ndim
    ):
      raise ValueError(
        f"stacked_axes{jax.tree_util.keystr(path)} must be an integer in [0, {ndim}] for a "
        f"leaf of shape {tuple(leaf.shape)}, got {count!r}"
      )
  return [int(c) for c in counts]


def check_ties_dtypes(tree, name):
  """Refuse float64 leaves: TIES ranks magnitudes by their float32 bits.

  Ranked so, ``[1, 1 + 2**-40]`` would tie and ``1e300`` would be infinite.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_masked):
    dtype = getattr(leaf, "dtype", None)
    # As JAX will hold it: without jax_enable_x64 a NumPy float64 leaf becomes float32.
    dtype = None if dtype is None else jax.dtypes.canonicalize_dtype(dtype)
    if dtype is not None and dtype.itemsize > 4:
      raise TypeError(
        f"{name}{jax.tree_util.keystr(path)} is {dtype}: TIES ranks magnitudes by "
        "their float32 bits, so it takes float32, bfloat16 or float16 leaves; cast the "
        "params and the reference delta to float32, or use DARE, which works in float64"
      )


def check_finite_tree(tree, name):
  """Raise naming the first leaf of ``tree`` with a NaN or an infinity.

  Abstract leaves (``jax.ShapeDtypeStruct``, tracers) have no values and pass.
  Concrete leaves are checked eagerly even while a caller is being traced
  (e.g. ``jax.jit(tx.init)`` over a reference delta it closes over).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, (jax.ShapeDtypeStruct, jax.core.Tracer)):
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
      continue
    with jax.ensure_compile_time_eval():
      finite = bool(jnp.all(jnp.isfinite(leaf)))
    if not finite:
      raise ValueError(f"{name}{jax.tree_util.keystr(path)} has non-finite values")
