"""The three stages: pre-training, SFT and preference optimisation.

Every stage runs the same loop: an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``
steps through ``lax.scan`` in compiled chunks of ``cfg.chunk`` steps, with
batches drawn on device from arrays that stay there, so one CPU spends its
time on maths rather than on dispatch. The base and SFT checkpoints are
cached per (stage config, seed) so methods and sweeps reuse them.
"""

from __future__ import annotations

import os
import zipfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.alignment_tax import grpo
from experiments.alignment_tax import losses
from experiments.alignment_tax import model as model_lib
from experiments.alignment_tax.config import Config


def schedule(lr: float, warmup: int, steps: int) -> optax.Schedule:
  """Linear warm-up then cosine decay to a tenth of ``lr``."""
  return optax.warmup_cosine_decay_schedule(
    0.0, lr, max(1, min(warmup, steps - 1)), max(steps, 2), lr * 0.1
  )


def params_of(model: nnx.Module):
  """The model's parameters as a pytree of plain arrays."""
  return nnx.as_pure(nnx.state(model, nnx.Param))


def with_params(cfg: Config, params, seed: int = 0) -> nnx.Module:
  """A fresh model of ``cfg`` holding ``params``."""
  model = model_lib.create(cfg, seed)
  nnx.update(model, params)
  return model


def train(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  loss_fn: Callable,
  data: dict,
  *,
  steps: int,
  batch: int,
  seed: int,
  chunk: int,
  ema: float = 0.0,
  on_chunk=None,
  rollout: Callable | None = None,
  reference: nnx.Module | None = None,
):
  """Run ``steps`` optimizer steps of ``loss_fn(model, batch_dict)`` on batches of ``data``.

  Args:
    ema: if > 0, also keep :math:`\\bar\\theta \\leftarrow \\bar\\theta + c(\\theta - \\bar\\theta)`
      from the starting weights, and return it instead of the final weights
      (the EMA baseline).
    rollout: if given, ``rollout(model, reference, batch_dict, key)`` turns
      each drawn batch into the one the loss sees, without gradient (the
      answers an RL step samples from the current policy: `grpo.rollout`).
    reference: the frozen model handed to ``rollout``.
    on_chunk: called after each compiled chunk with the number of steps done
      and the model at that step (for progress and checkpoints along the run).

  Returns:
    ``(model, losses)``: the trained model (updated in place) and the loss per step.
  """
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  ref_graphdef, ref_state = nnx.split(reference) if reference is not None else (None, None)
  arrays = {k: jnp.asarray(v) for k, v in data.items()}
  n = next(iter(arrays.values())).shape[0]
  averaged = params_of(model) if ema > 0 else None

  @jax.jit
  def run(state, averaged, ref_state, arrays, keys):
    def step(carry, key):
      state, averaged = carry
      model, optimizer = nnx.merge(graphdef, state)
      rows = jax.random.randint(key, (batch,), 0, n)
      drawn = {k: v[rows] for k, v in arrays.items()}
      if rollout is not None:
        drawn = rollout(
          model, nnx.merge(ref_graphdef, ref_state), drawn, jax.random.fold_in(key, 1)
        )
      loss, grads = nnx.value_and_grad(loss_fn)(model, drawn)
      optimizer.update(model, grads)
      if ema > 0:
        averaged = jax.tree.map(lambda a, p: a + ema * (p - a), averaged, params_of(model))
      return (nnx.state((model, optimizer)), averaged), loss

    (state, averaged), step_losses = jax.lax.scan(step, (state, averaged), keys)
    return state, averaged, step_losses

  keys = jax.random.split(jax.random.key(seed), steps)
  history = []
  for start in range(0, steps, chunk):
    state, averaged, step_losses = run(
      state, averaged, ref_state, arrays, keys[start : start + chunk]
    )
    history.append(np.asarray(step_losses))
    if on_chunk is not None:
      on_chunk(min(start + chunk, steps), nnx.merge(graphdef, state)[0])
  model, _ = nnx.merge(graphdef, state)
  if ema > 0:
    nnx.update(model, averaged)
  return model, np.concatenate(history) if history else np.zeros(0)


def lm_objective(model, batch):
  return losses.lm_loss(model(batch["tokens"]), batch["tokens"], batch["mask"])


@nnx.jit
def _sequence_logprob(model, tokens, mask):
  return losses.sequence_logprob(model(tokens), tokens, mask)


def sequence_logprobs(model, tokens, mask) -> np.ndarray:
  """Log-probabilities of the masked tokens of each row."""
  return np.asarray(_sequence_logprob(model, jnp.asarray(tokens), jnp.asarray(mask)))


def with_reference(model, pairs: dict) -> dict:
  """``pairs`` plus the frozen reference's log-probabilities of both answers."""
  return dict(
    pairs,
    ref_chosen=sequence_logprobs(model, pairs["chosen"], pairs["chosen_mask"]),
    ref_rejected=sequence_logprobs(model, pairs["rejected"], pairs["rejected_mask"]),
  )


def log_ratios(model, batch):
  """:math:`h = \\log\\pi - \\log\\pi_r` of the chosen and rejected answers (one forward pass)."""
  tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  logp = losses.sequence_logprob(model(tokens), tokens, mask)
  b = batch["chosen"].shape[0]
  return logp[:b] - batch["ref_chosen"], logp[b:] - batch["ref_rejected"]


def preference_objective(algorithm: str, beta: float) -> Callable:
  loss = losses.PREFERENCE_LOSSES[algorithm]
  return lambda model, batch: loss(*log_ratios(model, batch), beta)


ALGORITHMS = (*losses.PREFERENCE_LOSSES, "grpo")


def preference_stage(cfg: Config, algorithm: str, beta: float, data: dict, reference) -> dict:
  """The keyword arguments of `train` for the preference stage with ``algorithm``.

  The preference losses train on ``data["pref"]``'s pairs with the reference
  log-probabilities stored in them; GRPO samples answers to ``data["rl"]``'s
  prompts and scores them against the model holding the ``reference``
  parameters inside the step (`grpo`).
  """
  if algorithm not in ALGORITHMS:
    raise ValueError(f"algorithm {algorithm!r}: expected one of {ALGORITHMS}")
  if algorithm != "grpo":
    return dict(
      loss_fn=preference_objective(algorithm, beta), data=data["pref"], batch=cfg.pref_batch
    )
  if (2 * cfg.pref_batch) % cfg.grpo_group:
    raise ValueError(
      f"grpo_group={cfg.grpo_group} must divide 2 * pref_batch = {2 * cfg.pref_batch}: "
      "a GRPO step scores as many answers as a DPO step"
    )
  return dict(
    loss_fn=grpo.objective(cfg.grpo_kl),
    data=data["rl"],
    batch=2 * cfg.pref_batch // cfg.grpo_group,
    rollout=grpo.rollout(cfg.grpo_group),
    reference=with_params(cfg, reference),
  )


def _save(path, trees: list) -> None:
  """Write the leaves of the param ``trees``, in order, to ``path``: whole or not at all.

  The file is written beside ``path`` and renamed onto it, so a process
  killed while saving leaves the previous file or none, never a torn one.
  Each array is a member of the zip with its CRC-32, the digest `_load`
  checks.
  """
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, *[np.asarray(x) for tree in trees for x in jax.tree.leaves(tree)])
  os.replace(tmp, path)


def _load(path, cfg, seed, count: int = 1) -> list:
  """The ``count`` param trees of a model of ``cfg`` saved at ``path`` by `_save`.

  Every array is read whole, so the zip checks it against the CRC-32 written
  at save: a flipped byte in its data is found, and named.

  Raises:
    ValueError: naming ``path``, when it cannot be read whole (truncated, or
      an array whose bytes differ from their CRC-32: named by its tree and
      key path) or holds arrays other than ``count`` copies of this model's
      (another config of the same key).
  """
  params = params_of(model_lib.create(cfg, seed))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  expected = jax.tree.leaves(params) * count

  def name(i):  # the i-th array of the file, as `_save` wrote it
    if i >= len(expected):
      return f"array {i}"
    return f"tree {i // len(paths)} {paths[i % len(paths)]}" if count > 1 else paths[i]

  leaves, reading = [], None
  try:
    with np.load(path) as f:
      for reading in range(len(f.files)):
        leaves.append(f[f"arr_{reading}"])
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    where = "" if reading is None else f" at {name(reading)}"
    raise ValueError(f"{path}: unreadable{where} ({type(e).__name__}: {e})") from e
  if [(x.shape, x.dtype) for x in leaves] != [(x.shape, x.dtype) for x in expected]:
    raise ValueError(
      f"{path}: holds {len(leaves)} arrays that are not the {len(expected)} "
      f"parameters (shapes, dtypes) of {count} of this config's models"
    )
  n = len(expected) // count
  structure = jax.tree.structure(params)
  return [
    jax.tree.unflatten(structure, map(jnp.asarray, leaves[i * n : (i + 1) * n]))
    for i in range(count)
  ]


def cached_params(path: str | None, cfg: Config, seed: int, count: int, build: Callable, what: str):
  """``count`` param trees loaded from ``path``, or ``build()`` (``what``, for messages) and saved there.

  A file that cannot be loaded is moved aside to ``<file>.bad`` (kept for a
  look, never read again) and the trees are built again.

  Returns:
    ``(trees, whether they came from the file)``.
  """
  if path and os.path.exists(path):
    try:
      return _load(path, cfg, seed, count), True
    except ValueError as e:
      os.replace(path, path + ".bad")
      print(f"cache {e}; moved it to {path}.bad, rebuilding {what}", flush=True)
  trees = build()
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _save(path, trees)
  return trees, False


def cached_stage(cfg: Config, stage: str, seed: int, cache_dir: str | None, build: Callable):
  """Load the ``stage`` checkpoint of ``seed`` from ``cache_dir`` or ``build()`` and save it.

  Returns:
    ``(model, whether it came from the cache)``; see `cached_params`.
  """
  path = os.path.join(cache_dir, cfg.stage_key(stage, seed) + ".npz") if cache_dir else None
  built = {}

  def build_params():
    built["model"] = build()
    return [params_of(built["model"])]

  (params,), hit = cached_params(path, cfg, seed, 1, build_params, f"the {stage} stage")
  return built.get("model") or with_params(cfg, params, seed), hit


def pretrain(cfg: Config, data: dict, seed: int, on_chunk=None) -> nnx.Module:
  """Stage 1: the base model learns the skills in the raw format."""
  model = model_lib.create(cfg, seed)
  tx = optax.adamw(schedule(cfg.base_lr, cfg.warmup * 5, cfg.base_steps), weight_decay=0.01)
  model, _ = train(
    model,
    tx,
    lm_objective,
    data["pretrain"],
    steps=cfg.base_steps,
    batch=cfg.base_batch,
    seed=seed,
    chunk=cfg.chunk,
    on_chunk=on_chunk,
  )
  return model


def sft(cfg: Config, base: nnx.Module, data: dict, seed: int, on_chunk=None) -> nnx.Module:
  """Stage 2: from the base model, learn the chat format (the reference model)."""
  model = with_params(cfg, params_of(base), seed)
  tx = optax.adamw(schedule(cfg.sft_lr, cfg.warmup, cfg.sft_steps), weight_decay=0.01)
  model, _ = train(
    model,
    tx,
    lm_objective,
    data["sft"],
    steps=cfg.sft_steps,
    batch=cfg.sft_batch,
    seed=seed + 1000,
    chunk=cfg.chunk,
    on_chunk=on_chunk,
  )
  return model
