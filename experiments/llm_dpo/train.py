"""DPO of a Hugging Face Qwen/Llama checkpoint with Tunix and AdamW, OnDARE or OnTIES.

    python -m experiments.llm_dpo --base BASE_DIR --sft SFT_DIR --data prefs.jsonl \\
        --optimizer ondare --mesh fsdp=8,tp=1 --steps 1000 --out runs/ondare

1. Build the ``fsdp`` x ``tp`` mesh (over every process with ``--distributed``).
2. Load the SFT model (the policy) and the base model into Tunix's model
   classes, each device's block read from the files on its own
   (`experiments.llm_dpo.models.load`).
3. :math:`\\tau_r` = SFT - base, leaf by leaf, each leaf sharded like its
   parameter (`omerge_jax.reference_delta`); the base model is deleted.
4. Load the frozen DPO reference (the SFT model again, in ``--ref-dtype``).
5. Build the optimizer: ``optax.adamw``, `omerge_jax.ondare` or
   `omerge_jax.onties` on a warm-up + cosine schedule. Its ``init`` stores
   :math:`F(\\tau_r)`, after which the dense :math:`\\tau_r` is deleted.
6. Train with Tunix's ``DPOTrainer``; it saves Orbax checkpoints under
   ``OUT/checkpoints`` and, when some exist, resumes from the newest intact
   one (`experiments.llm_dpo.checkpoints` moves damaged ones aside first).
7. Evaluate DPO loss, reward accuracy and margin on the held-out pairs at the
   start and the end; write ``OUT/metrics.jsonl`` and ``OUT/summary.json``.
8. With ``--export DIR``, write the trained policy as a Hugging Face folder
   (`experiments.llm_dpo.export`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import omerge_jax
from experiments.llm_dpo import checkpoints
from experiments.llm_dpo import data
from experiments.llm_dpo import distributed
from experiments.llm_dpo import export
from experiments.llm_dpo import extra
from experiments.llm_dpo import hf_folder
from experiments.llm_dpo import models

OPTIMIZERS = ("adamw", "ondare", "onties")
PREFIX = "dpo"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="preference JSONL (prompt, chosen, rejected)")
  p.add_argument("--eval-data", help="held-out JSONL; default: --eval-fraction of --data")
  p.add_argument("--eval-fraction", type=float, default=0.05)
  p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
  p.add_argument("--eval-every", type=int, default=None, help="default: only at start and end")
  add_common_args(p)
  return p.parse_args(argv)


def add_common_args(p: argparse.ArgumentParser) -> None:
  """The flags DPO and GRPO share: models, optimizer, schedule, mesh, checkpoints, export."""
  p.add_argument("--base", required=True, help="base (pre-trained) model folder")
  p.add_argument(
    "--sft",
    required=True,
    help="SFT model folder: the policy's start, the frozen reference and the tokenizer",
  )
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="ondare")
  p.add_argument("--out", required=True, help="run folder: checkpoints, metrics, summary")
  # The paper's starting point (SPEC section 9).
  p.add_argument("--lr", type=float, default=5e-7)
  p.add_argument("--warmup", type=int, default=100)
  p.add_argument("--alpha", type=float, default=1e-7, help="merging weight")
  p.add_argument("--reserve-p", type=float, default=0.01, help="reserve rate p")
  p.add_argument("--merge-every", type=int, default=1, help="step-K merging period")
  p.add_argument("--sign-election", choices=("reference", "weighted"), default="reference")
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--steps", type=int, required=True, help="optimizer steps of the whole run")
  p.add_argument(
    "--stop-at",
    type=int,
    default=None,
    help="stop this invocation at this step (run again to resume)",
  )
  p.add_argument(
    "--batch-size",
    type=int,
    default=128,
    help="examples per optimizer step (DPO: pairs, GRPO: prompts)",
  )
  p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
  p.add_argument("--max-prompt-length", type=int, default=512)
  p.add_argument("--max-response-length", type=int, default=512)
  p.add_argument("--mesh", default=None, help="e.g. fsdp=8,tp=4; default: fsdp over all devices")
  p.add_argument("--param-dtype", default="float32", help="policy weights and optimizer state")
  p.add_argument("--compute-dtype", default="bfloat16", help="activations (Qwen models)")
  p.add_argument("--ref-dtype", default="bfloat16", help="frozen reference model")
  p.add_argument(
    "--reference-dtype",
    default=None,
    help="storage of the sparsified task vector F(tau) (default: --param-dtype)",
  )
  p.add_argument("--remat", action="store_true", help="rematerialise decoder layers")
  p.add_argument("--save-every", type=int, default=500, help="checkpoint period in steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--export", help="at the end, write the policy as a Hugging Face folder here")
  p.add_argument(
    "--export-dtype",
    choices=sorted(hf_folder.DTYPES),
    default=None,
    help="dtype of the exported weights (default: the SFT checkpoint's)",
  )
  distributed.add_args(p)


def learning_rate(args) -> optax.Schedule:
  """Linear warm-up to ``--lr``, then cosine decay to 0 at ``--steps`` (the paper's)."""
  warmup = min(args.warmup, args.steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, max(args.steps, warmup + 1))


def _optimizer(args, tau) -> optax.GradientTransformation:
  schedule = learning_rate(args)
  if args.optimizer == "adamw":
    return optax.adamw(schedule, weight_decay=args.weight_decay)
  common = dict(
    alpha=args.alpha,
    reserve_p=args.reserve_p,
    weight_decay=args.weight_decay,
    merge_every=args.merge_every,
    reference_dtype=args.reference_dtype or args.param_dtype,
    track_stats=True,
  )
  if args.optimizer == "ondare":
    return omerge_jax.ondare(schedule, tau, seed=args.seed, **common)
  return omerge_jax.onties(schedule, tau, sign_election=args.sign_election, **common)


def build_optimizer(args, tau, mesh) -> optax.GradientTransformation:
  """The ``--optimizer``, whose ``init`` runs as one program compiled for ``mesh``.

  Run eagerly, ``init`` would dispatch (and compile) one small program per
  operation and leaf. Compiled, it takes :math:`\\tau_r` as an argument, not
  as a constant baked into the program, and puts every state leaf on the
  sharding of its parameter (``out_shardings``), so no leaf is ever gathered.
  """

  def init_with(params, tau):
    return _optimizer(args, tau).init(params)

  def init(params):
    shardings = nnx.get_named_sharding(jax.eval_shape(init_with, params, tau), mesh)
    return jax.jit(init_with, out_shardings=shardings)(params, tau)

  return optax.GradientTransformation(init, _optimizer(args, tau).update)


def delete(tree) -> None:
  """Free the device buffers of ``tree`` now, not when Python drops the last reference."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array):
      leaf.delete()


def load_policy(args, mesh):
  """The SFT model (the policy) and, unless AdamW, :math:`\\tau_r` = SFT - base.

  The base model lives only while :math:`\\tau_r` is computed: its buffers
  are deleted before this returns.
  """
  dtypes = dict(param_dtype=jnp.dtype(args.param_dtype), dtype=jnp.dtype(args.compute_dtype))
  policy = models.load(args.sft, mesh, remat=args.remat, **dtypes)
  if args.optimizer == "adamw":
    return policy, None
  base = models.load(args.base, mesh, expect=models.read_hf_config(args.sft), **dtypes)
  tau = omerge_jax.reference_delta(models.param_state(policy), models.param_state(base))
  delete(models.param_state(base))
  return policy, tau


def load_reference(args, mesh) -> nnx.Module:
  """The frozen reference: the SFT model again, in ``--ref-dtype``."""
  return models.load(
    args.sft, mesh, param_dtype=jnp.dtype(args.ref_dtype), dtype=jnp.dtype(args.compute_dtype)
  )


class JsonlBackend:
  """A Tunix metrics backend writing one JSON line per scalar of this run.

  Args:
    path: the JSONL file, appended to (a resumed run continues it).
    prefixes: the metric prefixes of this run (Tunix logs ``PREFIX/MODE/NAME``).
  """

  def __init__(self, path, prefixes=(PREFIX,)):
    self.file = open(path, "a")
    self.prefixes = tuple(prefix + "/" for prefix in prefixes)

  def log_scalar(self, event, value, **kwargs):
    if not event.startswith(self.prefixes):
      return  # jax.monitoring also reports JAX's own events to every listener
    record = {"name": event, "value": float(np.asarray(value)), "step": kwargs.get("step")}
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()

  def close(self):
    # Tunix registers the backend as a jax.monitoring listener and leaves it
    # there; a later run in the same process must not write to this file.
    jax.monitoring.unregister_scalar_listener(self.log_scalar)
    self.file.close()


def trainer_options(args, out: pathlib.Path, prefixes=(PREFIX,)) -> dict:
  """The fields of Tunix's ``TrainingConfig`` that DPO and GRPO set alike.

  The step budget of this invocation (``--stop-at``), Orbax checkpoints every
  ``--save-every`` steps under ``OUT/checkpoints`` (restored when present),
  the metrics of ``prefixes`` in ``OUT/metrics.jsonl``, and the batch split
  over the mesh's ``fsdp`` axis.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from tunix.sft import metrics_logger  # pylint: disable=g-import-not-at-top

  return dict(
    max_steps=min(args.stop_at or args.steps, args.steps),
    checkpoint_root_directory=str((out / "checkpoints").absolute()),
    checkpointing_options=ocp.CheckpointManagerOptions(
      save_interval_steps=args.save_every, max_to_keep=2
    ),
    metrics_logging_options=metrics_logger.MetricsLoggerOptions(
      log_dir=str(out),
      backend_kwargs={"custom_backend": [lambda: JsonlBackend(out / "metrics.jsonl", prefixes)]},
    ),
    data_sharding_axis=("fsdp",),
    pbar_description=None,
  )


def step_log(prefix: str, track_merge: bool, describe):
  """Tunix training hooks: print each step and log the merge statistics.

  Args:
    prefix: the trainer's metrics prefix; the statistics of
      `omerge_jax.merge_stats` are logged as ``PREFIX/train/merge/NAME``.
    track_merge: whether the optimizer is OnDARE/OnTIES (AdamW has none).
    describe: ``describe(trainer) -> str``, what the step's line says after
      its loss.

  Returns:
    A ``tunix.sft.hooks.TrainingHooks`` for ``trainer.with_training_hooks``.
  """
  from tunix.sft import hooks  # pylint: disable=g-import-not-at-top

  class StepLog(hooks.TrainingHooks):
    """Prints each step and logs the merge statistics of `omerge_jax.merge_stats`."""

    def __init__(self):
      self.logged = set()

    def log_merge(self, trainer):
      step = trainer.train_steps
      if not track_merge or step == 0 or step in self.logged:
        return
      self.logged.add(step)
      stats = omerge_jax.merge_stats(trainer.optimizer.opt_state)
      for name, value in stats._asdict().items():
        trainer.metrics_logger.log(prefix, f"merge/{name}", float(value), "train", step)

    def on_train_start(self, train_ctx):
      # A resumed run's restored statistics were logged by the run that made them.
      self.logged.add(train_ctx.train_steps)

    def on_eval_step_start(self, train_ctx):
      del train_ctx

    def on_eval_step_end(self, train_ctx, eval_loss):
      del train_ctx, eval_loss

    def on_train_step_start(self, train_ctx):
      # The state now holds the statistics of the step just finished.
      self.log_merge(train_ctx)

    def on_train_end(self, train_ctx):
      self.log_merge(train_ctx)

    def on_train_step_end(self, train_ctx, train_step, train_loss, *args, **kwargs):
      del args, kwargs
      if jax.process_index() == 0:
        print(
          f"step {train_step:5d}  loss {float(train_loss):.4f}  {describe(train_ctx)}", flush=True
        )

  return StepLog()


def log_since(start: float):
  """``log(message)``: print on process 0, after the seconds since ``start``."""

  def log(message):
    if jax.process_index() == 0:
      print(f"[{time.time() - start:7.1f} s] {message}", flush=True)

  return log


def history(logger, prefix: str, name: str, mode: str) -> list[float]:
  """The values of one metric, ``[]`` if never logged (a run resumed at its last step)."""
  if not logger.metric_exists(prefix, name, mode):
    return []
  return [float(x) for x in logger.get_metric_history(prefix, name, mode)]


def main(argv=None):
  args = parse_args(argv)
  extra.require("experiments.llm_dpo")
  distributed.start(args)
  import transformers  # pylint: disable=g-import-not-at-top
  from tunix.sft.dpo import dpo_trainer  # pylint: disable=g-import-not-at-top

  start = time.time()
  log = log_since(start)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  mesh = distributed.make_mesh(args.mesh)

  tokenizer = transformers.AutoTokenizer.from_pretrained(args.sft)
  encoder = data.Encoder(tokenizer, args.max_prompt_length, args.max_response_length)
  pairs = data.read_pairs(args.data)
  if args.eval_data:
    train_pairs, held_out = pairs, data.read_pairs(args.eval_data)
  else:
    train_pairs, held_out = data.split(pairs, args.eval_fraction, args.seed)
  fsdp = mesh.shape["fsdp"]
  micro = args.batch_size // args.grad_accum
  if args.batch_size % args.grad_accum or micro % fsdp:
    raise ValueError(
      f"--batch-size {args.batch_size} / --grad-accum {args.grad_accum} "
      f"must be a multiple of fsdp={fsdp}"
    )
  eval_batch = min(micro, len(held_out) // fsdp * fsdp)
  if eval_batch == 0:
    raise ValueError(f"{len(held_out)} held-out pairs cannot fill a batch over fsdp={fsdp}")

  # The legacy `with mesh:`, not `jax.set_mesh`: Tunix's trainer reads the
  # mesh from `pxla.thread_resources`, which only the former sets.
  with mesh:
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    policy, tau = load_policy(args, mesh)
    log("policy loaded" + ("" if tau is None else ", reference delta computed, base freed"))
    reference_model = load_reference(args, mesh)

    config = dpo_trainer.DPOTrainingConfig(
      beta=args.beta,
      eval_every_n_steps=args.eval_every or args.steps,  # and once at the start
      gradient_accumulation_steps=args.grad_accum if args.grad_accum > 1 else None,
      metrics_prefix=PREFIX,
      **trainer_options(args, out),
    )
    tx = build_optimizer(args, tau, mesh)
    checkpoints.resume(
      config.checkpoint_root_directory,
      checkpoints.abstract_state(policy, tx, config.gradient_accumulation_steps),
      log,
    )
    # Builds the nnx.Optimizer (its init stores F(tau)) and restores the
    # latest step of OUT/checkpoints, the intact one `resume` left there.
    trainer = dpo_trainer.DPOTrainer(policy, reference_model, tx, config)
    checkpoints.write_digests(trainer.checkpoint_manager)
    resumed_from = trainer.train_steps
    log(
      f"optimizer ready ({args.optimizer})"
      + (f", resumed from step {resumed_from}" if resumed_from else "")
    )
    if tau is not None:
      # The transform keeps tau for `init`, which is never called again.
      delete(tau)

    def describe(trainer):
      last = lambda name: trainer.metrics_logger.get_metric_history(PREFIX, name, "train")[-1]
      return f"reward acc {last('rewards/accuracy'):.3f}  margin {last('rewards/margin'):+.4f}"

    trainer.with_training_hooks(step_log(PREFIX, tau is not None, describe))

    encode = lambda rows: data.to_global(encoder.batch(rows), batch_sharding)
    train = data.Batches(train_pairs, micro, encode, seed=args.seed)
    held = data.Batches(
      held_out[: len(held_out) // eval_batch * eval_batch], eval_batch, encode, seed=None, epochs=1
    )
    trainer.train(train, held)

  metric = lambda name, mode: history(trainer.metrics_logger, PREFIX, name, mode)
  eval_every = args.eval_every or args.steps
  summary = {
    "optimizer": args.optimizer,
    "steps": trainer.train_steps,
    "resumed_from": resumed_from,
    "train_loss": metric("loss", "train"),
    "held_out_pairs": len(held_out) // eval_batch * eval_batch,
    # Tunix evaluates when training starts and every `eval_every` steps.
    "eval_steps": [resumed_from]
    + [s for s in range(resumed_from + 1, trainer.train_steps + 1) if s % eval_every == 0],
    "eval_loss": metric("loss", "eval"),
    "eval_reward_accuracy": metric("rewards/accuracy", "eval"),
    "eval_reward_margin": metric("rewards/margin", "eval"),
    "seconds": round(time.time() - start, 1),
  }
  if tau is not None:
    summary["merge"] = {
      name: metric(f"merge/{name}", "train") for name in omerge_jax.MergeStats._fields
    }
  if args.export:
    export.export_policy(args, trainer.model)
    log(f"exported the policy to {args.export}")
  if jax.process_index() == 0:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
      f"held-out reward accuracy {summary['eval_reward_accuracy'][-1]:.3f}, margin "
      f"{summary['eval_reward_margin'][-1]:+.4f} at step {summary['eval_steps'][-1]}; "
      f"{summary['steps']} steps done ({summary['seconds']} s); wrote {out / 'summary.json'}"
    )
  return summary
