"""Resume from the newest intact Orbax checkpoint of a run, naming the damaged ones.

Tunix's trainer restores the latest step of its checkpoint folder when it is
built. A step that a crash, a full disk or a bad copy left damaged (a
truncated, missing or corrupted file), or that another command wrote (another
``--optimizer``, another model), would fail deep inside Orbax or TensorStore,
or restore a state this run does not train. `resume` runs before the trainer
is built and checks the steps, newest first, as Tunix restores them:

1. Orbax's metadata of each item Tunix saves (``model_params``,
   ``optimizer_state``) is readable;
2. the item's tree (keys, shapes, dtypes) is the one this run saves
   (`abstract_state`: the model's state and the ``nnx.Optimizer`` state of
   this optimizer);
3. restoring the item into that tree, on the run's shardings, reads every
   value the tree refers to (a missing or truncated data file fails here).
   This reads the step once more than Tunix's own restore does; the arrays
   are freed before the trainer is built.

OCDBT checksums its manifest and b-tree nodes, not the values: bytes altered
inside an array's data may restore as other numbers, undetected.

A bad step newer than the first intact one is moved aside to
``<step>.bad-<reason>``, a name Orbax does not list, so that Tunix restores
the intact step; nothing is deleted and the intact steps are not touched.
When no step is intact, nothing is moved and `NoIntactCheckpoint` names
every step: the likeliest cause is then a command that differs from the run's
(another ``--optimizer``, ``--sft`` or ``--out``), whose checkpoints must not
be moved away, and starting afresh is the user's call (another ``--out``, or
moving ``OUT/checkpoints`` aside).
"""

from __future__ import annotations

import pathlib
import re
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

# The items of a step, as Tunix's `tunix.sft.checkpoint_manager` names them.
ITEMS = ("model_params", "optimizer_state")
# The file of an item's tree (Orbax's PyTree handler).
TREE_FILE = "_METADATA"


class BadCheckpoint(ValueError):
  """A checkpoint step this run cannot resume from.

  Attributes:
    step: the step.
    file: the first bad file (or folder) found, relative to the checkpoint folder.
    reason: a one-word label of the damage, used in the name the step is moved to:
      ``metadata`` (unreadable), ``tree`` (another optimizer or model) or
      ``arrays`` (a missing, truncated or corrupted array file).
  """

  def __init__(self, step: int, file: str, reason: str, detail: str):
    super().__init__(f"checkpoint step {step}: {file}: {detail}")
    self.step, self.file, self.reason = step, file, reason


class NoIntactCheckpoint(ValueError):
  """Every step of a checkpoint folder is bad; ``bad``: a `BadCheckpoint` per step, newest first."""

  def __init__(self, root, bad: list[BadCheckpoint]):
    super().__init__(
      f"no intact checkpoint in {root} to resume from:\n  "
      + "\n  ".join(map(str, bad))
      + f"\nNothing was moved. To start afresh, use another --out or move {root} aside."
    )
    self.bad = bad


def abstract_state(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  gradient_accumulation_steps: int | None = None,
) -> dict:
  """What Tunix's trainer saves of ``model`` trained with ``tx``, as abstract arrays.

  Args:
    model: the model the trainer is given (its arrays are not copied).
    tx: the optimizer the trainer is given.
    gradient_accumulation_steps: the trainer config's; Tunix then wraps ``tx``
      in ``optax.MultiSteps``, whose state is the one saved.

  Returns:
    ``{item: nnx.State of jax.ShapeDtypeStruct}`` for each of `ITEMS`, each
    leaf with the sharding Tunix restores it on: the model's own, and for the
    optimizer state its parameters' partitioning on the model's mesh
    (replicated scalars).
  """
  if gradient_accumulation_steps is not None:
    tx = optax.MultiSteps(tx, gradient_accumulation_steps)  # as Tunix's PeftTrainer does
  params = nnx.state(model)
  opt_state = nnx.eval_shape(
    lambda m: nnx.state(nnx.Optimizer(m, tx, wrt=nnx.Param), nnx.optimizer.OptState), model
  )
  mesh = next(
    x.sharding.mesh
    for x in jax.tree.leaves(params)
    if isinstance(x.sharding, jax.sharding.NamedSharding)
  )
  opt_shardings = nnx.get_named_sharding(opt_state, mesh)
  with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return {
    "model_params": jax.tree.map(lambda x: with_sharding(x, x.sharding), params),
    "optimizer_state": jax.tree.map(with_sharding, opt_state, opt_shardings),
  }


def _tree_spec(tree) -> dict[str, tuple]:
  """``{key path: (shape, dtype)}`` of a tree of arrays or Orbax array metadata."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): (tuple(x.shape), np.dtype(x.dtype))
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _tree_difference(saved: dict, expected: dict) -> str | None:
  """What differs between two `_tree_spec`s (a few keys of each kind), ``None`` if nothing."""
  missing = sorted(expected.keys() - saved.keys())
  extra = sorted(saved.keys() - expected.keys())
  changed = [
    f"{k} is {saved[k][0]} {saved[k][1]}, this run's {expected[k][0]} {expected[k][1]}"
    for k in sorted(saved.keys() & expected.keys())
    if saved[k] != expected[k]
  ]
  parts = []
  if missing:
    parts.append(
      f"no {', '.join(missing[:3])}"
      + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
    )
  if extra:
    parts.append(
      f"unknown {', '.join(extra[:3])}"
      + (f" (and {len(extra) - 3} more)" if len(extra) > 3 else "")
    )
  parts += changed[:3]
  return "; ".join(parts) or None


def _what_failed(error: Exception, step_dir: pathlib.Path, default: str) -> tuple[str, str]:
  """``(file, message)`` of the innermost error of ``error``'s chain (TensorStore's, under Orbax's).

  The file is the one under ``step_dir`` that the message names; where it
  names an OCDBT database (a folder), that folder and the value it could not
  read; else ``default``.
  """
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  text = str(error)
  under = re.escape(str(step_dir)) + "/"
  if match := re.search(under + r"([^\s\"']*[^\s\"'/])[\"']", text):
    file = f"{step_dir.name}/{match.group(1)}"
  elif match := re.search(
    r'reading "([^"]+)" in OCDBT database at local file "' + under + r'([^"]*?)/?"', text
  ):
    file = f"{step_dir.name}/{match.group(2)} (value {match.group(1)})"
  else:
    file = default
  message = text.splitlines()[0].replace(str(step_dir.parent) + "/", "")
  return file, f"{type(error).__name__}: {message[:300]}"


def check_step(step_dir, target: dict) -> None:
  """Check that one step can be restored as ``target``; raise `BadCheckpoint` if not.

  Args:
    step_dir: the step's folder (``OUT/checkpoints/<step>``).
    target: `abstract_state` of this run.

  Raises:
    BadCheckpoint: naming the step, the first bad file and what is wrong.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  step_dir = pathlib.Path(step_dir)
  step = ocp.utils.step_from_checkpoint_name(step_dir.name)
  checkpointer = ocp.PyTreeCheckpointer()
  for item in ITEMS:
    item_dir = step_dir / item
    tree_file = f"{step_dir.name}/{item}/{TREE_FILE}"
    if not (item_dir / TREE_FILE).is_file():
      raise BadCheckpoint(step, tree_file, "metadata", "missing (an unfinished or partial copy?)")
    try:
      # The handler's, not the checkpointer's: that one logs errors and returns no tree.
      saved = _tree_spec(ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir)).tree)
    except Exception as e:  # pylint: disable=broad-except
      file, message = _what_failed(e, step_dir, tree_file)
      raise BadCheckpoint(step, file, "metadata", f"unreadable ({message})") from e
    difference = _tree_difference(saved, _tree_spec(target[item]))
    if difference:
      what = "optimizer" if item == "optimizer_state" else "model"
      raise BadCheckpoint(
        step, tree_file, "tree", f"saved by another {what} than this run's ({difference})"
      )
    try:
      restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
          item=target[item], restore_args=ocp.checkpoint_utils.construct_restore_args(target[item])
        ),
      )
    except Exception as e:  # pylint: disable=broad-except
      file, message = _what_failed(e, step_dir, f"{step_dir.name}/{item}")
      raise BadCheckpoint(step, file, "arrays", f"cannot be read ({message})") from e
    for leaf in jax.tree.leaves(restored):
      if isinstance(leaf, jax.Array):
        leaf.delete()


def _agreed(ok: bool) -> bool:
  """Whether ``ok`` holds on every process (a file may be bad for one process's shards only)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _aside(step_dir: pathlib.Path, reason: str) -> pathlib.Path:
  """A free name ``<step>.bad-<reason>[.N]`` next to ``step_dir`` (Orbax lists neither)."""
  target = step_dir.with_name(f"{step_dir.name}.bad-{reason}")
  n = 2
  while target.exists():
    target = step_dir.with_name(f"{step_dir.name}.bad-{reason}.{n}")
    n += 1
  return target


def resume(root, target: dict, log: Callable[[str], None] = print) -> int:
  """Leave ``root``'s newest intact step as the one Tunix restores; return it (0: none).

  Args:
    root: the trainer's ``checkpoint_root_directory``.
    target: `abstract_state` of this run.
    log: prints one line per step moved aside.

  Returns:
    The step Tunix's trainer will restore, 0 when ``root`` holds none.

  Raises:
    NoIntactCheckpoint: every step of ``root`` is bad; the message names each,
      and nothing was moved.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  root = pathlib.Path(root)
  step_of = lambda path: ocp.utils.step_from_checkpoint_name(path.name)
  step_dirs = sorted(
    (pathlib.Path(p) for p in ocp.utils.checkpoint_steps_paths(root)), key=step_of, reverse=True
  )
  bad = []
  for step_dir in step_dirs:
    try:
      check_step(step_dir, target)
      problem = None
    except BadCheckpoint as e:
      problem = e
    if _agreed(problem is None):
      break
    bad.append(
      (
        step_dir,
        problem
        or BadCheckpoint(
          step_of(step_dir), step_dir.name, "arrays", "unreadable on another process"
        ),
      )
    )
  else:
    if bad:
      raise NoIntactCheckpoint(root, [problem for _, problem in bad])
    return 0
  for step_dir, problem in bad:
    aside = _aside(step_dir, problem.reason)
    if jax.process_index() == 0:
      step_dir.rename(aside)
    log(f"{problem}; moved it to {aside}, resuming from step {step_of(step_dirs[len(bad)])}")
  if bad and jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices("checkpoints.resume")  # renamed before any restore
  return step_of(step_dirs[len(bad)])
