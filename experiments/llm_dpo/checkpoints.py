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

4. the restored values equal the digests written when the step was saved
   (`omerge_jax.checkpoint.digests` of every shard of every array, in the
   step's Orbax metadata, ``custom_metadata[DIGESTS]``; `write_digests` makes
   the trainer's checkpoint manager write them). OCDBT checksums its manifest
   and b-tree nodes, not the values: without them, bytes altered inside an
   array's data restore as other numbers. A step saved without digests (by an
   older run) is used, and reported as unverified.

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

import json
import pathlib
import re
from typing import Callable

import jax
import numpy as np
import optax
from flax import nnx

from omerge_jax import checkpoint

# The items of a step, as Tunix's `tunix.sft.checkpoint_manager` names them.
ITEMS = ("model_params", "optimizer_state")
# The file of an item's tree (Orbax's PyTree handler).
TREE_FILE = "_METADATA"
# The step's metadata file (Orbax's), which holds the custom metadata.
STEP_FILE = "_CHECKPOINT_METADATA"
# The key of the digests in a step's custom metadata: ``{item: digests}``.
DIGESTS = "omerge_jax.digests"


class BadCheckpoint(ValueError):
  """A checkpoint step this run cannot resume from.

  Attributes:
    step: the step.
    file: the first bad file (or folder) found, relative to the checkpoint folder.
    detail: what is wrong with it.
    reason: a one-word label of the damage, used in the name the step is moved to:
      ``metadata`` (unreadable), ``tree`` (another optimizer or model),
      ``arrays`` (a missing, truncated or corrupted array file) or ``digest``
      (values that differ from their digest, or digests unreadable or missing).
  """

  def __init__(self, step: int, file: str, reason: str, detail: str):
    super().__init__(f"checkpoint step {step}: {file}: {detail}")
    self.step, self.file, self.reason, self.detail = step, file, reason, detail


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


def write_digests(manager) -> None:
  """Make Tunix's checkpoint ``manager`` save each step with its digests.

  Tunix's trainer builds its manager in its constructor and offers no hook
  around a save, so the instance's ``save`` is wrapped: when a step is saved,
  `omerge_jax.checkpoint.digests` of the two items (the arrays Tunix saves,
  every shard on the process holding it) go into the step's custom metadata,
  which Orbax commits with the step: a step is complete only with them.

  Args:
    manager: a trainer's ``checkpoint_manager`` (`tunix.sft.checkpoint_manager.CheckpointManager`).
  """
  save = manager.save

  def save_with_digests(
    step, model, optimizer=None, save_only_lora_params=False, force=False, custom_metadata=None
  ):
    orbax = manager._checkpoint_manager  # pylint: disable=protected-access
    if orbax is None or not (force or orbax.should_save(step)):
      return False  # as Tunix's save, without digesting a step it will not save
    items = {"model_params": nnx.state(model, nnx.LoRAParam if save_only_lora_params else ...)}
    if optimizer is not None:
      items["optimizer_state"] = nnx.state(optimizer, nnx.optimizer.OptState)
    custom_metadata = {
      **(custom_metadata or {}),
      DIGESTS: {item: checkpoint.digests(tree) for item, tree in items.items()},
    }
    return save(step, model, optimizer, save_only_lora_params, force, custom_metadata)

  manager.save = save_with_digests


def _saved_digests(step_dir: pathlib.Path, step: int) -> dict | None:
  """The digests saved with a step, ``None`` for a step saved without (an older run).

  Raises:
    BadCheckpoint: the step's metadata file is unreadable, or its digests are
      not a digest table per item (damaged).
  """
  file = f"{step_dir.name}/{STEP_FILE}"
  try:
    metadata = json.loads((step_dir / STEP_FILE).read_text())
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise BadCheckpoint(step, file, "digest", f"unreadable ({type(e).__name__}: {e})") from e
  saved = (
    (metadata.get("custom_metadata") or {}).get(DIGESTS) if isinstance(metadata, dict) else None
  )
  if saved is None:
    return None

  def is_table(digests):  # {path: {shard index: 16 hex digits}}, as `checkpoint.digests` writes
    return isinstance(digests, dict) and all(
      isinstance(shards, dict) and all(isinstance(h, str) and len(h) == 16 for h in shards.values())
      for shards in digests.values()
    )

  if not (isinstance(saved, dict) and all(is_table(saved.get(item)) for item in ITEMS)):
    raise BadCheckpoint(step, file, "digest", f"{DIGESTS} is not a digest table per item (damaged)")
  return saved


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


def check_step(step_dir, target: dict) -> bool:
  """Check that one step restores as ``target``, with its saved values; raise `BadCheckpoint` if not.

  Args:
    step_dir: the step's folder (``OUT/checkpoints/<step>``).
    target: `abstract_state` of this run.

  Returns:
    Whether the values were verified against digests (``False``: the step
    was saved without them).

  Raises:
    BadCheckpoint: naming the step, the first bad file (or array and shard)
      and what is wrong.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top

  step_dir = pathlib.Path(step_dir)
  step = ocp.utils.step_from_checkpoint_name(step_dir.name)
  checkpointer = ocp.PyTreeCheckpointer()
  saved_digests = _saved_digests(step_dir, step)
  mismatch = None
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
    try:
      if saved_digests is not None:
        checkpoint.verify(restored, saved_digests[item])
    except checkpoint.DigestMismatch as e:
      # Not raised yet: each process checks its own shards, and one that
      # stopped here would leave the others waiting in the next restore.
      mismatch = mismatch or BadCheckpoint(step, f"{step_dir.name}/{item}", "digest", str(e))
    for leaf in jax.tree.leaves(restored):
      if isinstance(leaf, jax.Array):
        leaf.delete()
  if mismatch:
    raise mismatch
  return saved_digests is not None


def _agreed(step: int, problem: BadCheckpoint | None) -> BadCheckpoint | None:
  """The problem of the first process that found the step bad; ``None`` if none did.

  A file may be bad for one process's shards only: every process must then
  set the step aside, under the same name, and process 0 (the one that
  logs) must be able to say what process found.
  """
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  text = b"" if problem is None else f"{problem.reason}\n{problem.file}\n{problem.detail}".encode()
  message = np.zeros(2048, np.uint8)
  message[: min(len(text), 2048)] = np.frombuffer(text[:2048], np.uint8)
  for process, found in enumerate(multihost_utils.process_allgather(message)):
    if found.any():
      reason, file, detail = bytes(found).rstrip(b"\0").decode(errors="replace").split("\n", 2)
      by = "" if process == jax.process_index() else f" (found by process {process})"
      return BadCheckpoint(step, file, reason, detail + by)
  return None


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
      verified = check_step(step_dir, target)
      problem = None
    except BadCheckpoint as e:
      problem = e
    problem = _agreed(step_of(step_dir), problem)
    if problem is None:
      if not verified:
        log(
          f"checkpoint step {step_of(step_dir)}: saved without digests (by an older run); "
          "its values are not verified"
        )
      break
    bad.append((step_dir, problem))
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
