"""GRPO of a Hugging Face Qwen/Llama checkpoint with Tunix and AdamW, OnDARE or OnTIES.

    python -m experiments.llm_grpo --base BASE_DIR --sft SFT_DIR --prompts gsm8k.jsonl \\
        --reward exact_answer --optimizer ondare --mesh fsdp=4,tp=2 --steps 500 --out runs/x

1. Read the prompts and resolve the reward functions (errors before any model
   loads).
2. Build the ``fsdp`` x ``tp`` mesh; load the SFT model (the actor) and
   :math:`\\tau_r` = SFT - base, then the frozen reference (the SFT model in
   ``--ref-dtype``), as `experiments.llm_dpo.train` does.
3. Build the optimizer (`experiments.llm_dpo.train.build_optimizer`): its
   ``init`` stores :math:`F(\\tau_r)` in the actor's optimizer state (inside
   the ``optax.MultiSteps`` Tunix wraps around it with ``--grad-accum``).
4. Train with Tunix's ``GRPOLearner``: per step, ``--batch-size`` prompts,
   ``--num-generations`` completions each sampled by the actor (Tunix's
   vanilla rollout, sharing the actor's weights), rewards summed over
   ``--reward`` functions, group-relative advantages, the clipped policy loss
   with ``--beta`` times the KL to the reference. Orbax checkpoints go to
   ``OUT/checkpoints/actor`` and a run resumes from the newest intact one
   (`experiments.llm_dpo.checkpoints`).
5. Write ``OUT/metrics.jsonl`` (rewards, loss, KL, merge statistics) and
   ``OUT/summary.json``; with ``--export DIR``, the trained actor as a Hugging
   Face folder.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

import omerge_jax
from experiments.llm_dpo import checkpoints
from experiments.llm_dpo import data
from experiments.llm_dpo import distributed
from experiments.llm_dpo import export
from experiments.llm_dpo import extra
from experiments.llm_dpo import train as dpo
from experiments.llm_grpo import prompts as prompts_lib
from experiments.llm_grpo import rewards as rewards_lib

ACTOR = "actor"  # Tunix's metrics prefix of the actor's trainer
# What Tunix's GRPO logs, as PREFIX/MODE/NAME: rewards/train/score/mean, ...
PREFIXES = (ACTOR, "rewards", "completions")


def parse_args(argv=None):
  p = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    epilog="RL starts from the paper's DPO hyper-parameters (lr 5e-7..1e-6, --reserve-p "
    "0.01, --alpha 1e-7..5e-6 relative to the lr), but a GRPO step sees fewer, noisier "
    "gradients: keep the lr at 1e-6 or below, --warmup short, and judge --alpha by the "
    "reward and the KL it leaves, as the merging weight trades reward against the drift "
    "from the SFT model. See docs/llm.md.",
  )
  p.add_argument(
    "--prompts",
    required=True,
    help="JSONL of prompt (string or chat messages) and the reward's fields",
  )
  p.add_argument(
    "--reward",
    action="append",
    required=True,
    help=f"one of {sorted(rewards_lib.REWARDS)} or module:function "
    "fn(prompts, completions, **fields) -> list[float]; repeat to sum several",
  )
  p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (G)")
  p.add_argument("--beta", type=float, default=0.04, help="KL coefficient to the reference")
  p.add_argument("--epsilon", type=float, default=0.2, help="clipping of the policy ratio")
  p.add_argument(
    "--num-iterations",
    type=int,
    default=1,
    help="updates per batch of rollouts (mu); >1 adds the old policy's log-probs",
  )
  p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=None)
  dpo.add_common_args(p)
  args = p.parse_args(argv)
  if args.num_generations < 2:
    p.error("--num-generations must be at least 2 (advantages are relative to the group)")
  return args


def learner_class():
  """Tunix's ``GRPOLearner``, sampling with a new key at every micro-batch.

  With a fixed ``RolloutConfig.seed`` Tunix samples every step with the same
  key; here the key is ``fold_in(seed, micro-batch index)``, an index a
  resumed run restores, so it draws the rollouts the uninterrupted run drew.
  A function, so that the command's ``--help`` needs no Tunix.

  Returns:
    The class; ``Learner(seed, *args, **kwargs)`` takes ``GRPOLearner``'s arguments after ``seed``.
  """
  from tunix.rl import rl_cluster as rl  # pylint: disable=g-import-not-at-top
  from tunix.rl.grpo import grpo_learner  # pylint: disable=g-import-not-at-top

  class Learner(grpo_learner.GRPOLearner):
    """Tunix's ``GRPOLearner`` with a rollout key per micro-batch (see `learner_class`)."""

    def __init__(self, seed: int, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.seed = seed

    def _generate_and_compute_advantage(self, training_input, mode=rl.Mode.TRAIN):
      self.rl_cluster.get_rollout_config(mode).seed = jax.random.fold_in(
        jax.random.PRNGKey(self.seed), self._iter_steps
      )
      return super()._generate_and_compute_advantage(training_input, mode)

  return Learner


def prompt_length(tokenizer, text: str) -> int:
  """Tokens of ``text`` as Tunix's sampler counts them (``Sampler.tokenize``: BOS once)."""
  bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
  ids = bos + tokenizer.encode(text)
  while len(ids) > 1 and ids[0] == ids[1] == tokenizer.bos_token_id:
    ids = ids[1:]
  return len(ids)


def run(args):
  """Train; returns ``(summary, cluster)``, the Tunix ``RLCluster`` after training."""
  extra.require("experiments.llm_grpo")
  reward_fns = [rewards_lib.resolve(spec) for spec in args.reward]
  fields = set().union(*(rewards_lib.required_fields(fn) for fn in reward_fns))
  rows = prompts_lib.read_prompts(args.prompts, fields)
  distributed.start(args)
  import transformers  # pylint: disable=g-import-not-at-top
  from tunix.rl import rl_cluster as rl  # pylint: disable=g-import-not-at-top
  from tunix.rl.grpo import grpo_learner  # pylint: disable=g-import-not-at-top
  from tunix.rl.rollout import base_rollout  # pylint: disable=g-import-not-at-top

  start = time.time()
  log = dpo.log_since(start)

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  mesh = distributed.make_mesh(args.mesh)
  fsdp = mesh.shape["fsdp"]
  micro = args.batch_size // args.grad_accum
  if args.batch_size % args.grad_accum or micro * args.num_generations % fsdp:
    raise ValueError(
      f"--batch-size {args.batch_size} / --grad-accum {args.grad_accum} x "
      f"--num-generations {args.num_generations} must be a multiple of fsdp={fsdp}"
    )

  tokenizer = transformers.AutoTokenizer.from_pretrained(args.sft)
  if tokenizer.pad_token_id is None:
    tokenizer.pad_token = tokenizer.eos_token  # Llama-3 has none; Tunix pads completions
  for row in rows:
    row["text"] = data.render_prompt(tokenizer, row["messages"])
  # A longer prompt would make Tunix's sampler pad the batch to the next power
  # of two, a new shape compiled again; verl drops them too.
  kept = [r for r in rows if prompt_length(tokenizer, r["text"]) <= args.max_prompt_length]
  if len(kept) < len(rows):
    log(
      f"dropped {len(rows) - len(kept)} of {len(rows)} prompts longer than "
      f"--max-prompt-length {args.max_prompt_length} tokens"
    )

  with mesh:  # Tunix reads the mesh from `pxla.thread_resources` (see llm_dpo)
    policy, tau = dpo.load_policy(args, mesh)
    log("actor loaded" + ("" if tau is None else ", reference delta computed, base freed"))
    reference = dpo.load_reference(args, mesh)
    tx = dpo.build_optimizer(args, tau, mesh)
    training = rl.RLTrainingConfig(
      actor_optimizer=tx,
      eval_every_n_steps=args.steps,  # no held-out prompts: never
      mini_batch_size=args.batch_size,
      train_micro_batch_size=micro,
      **dpo.trainer_options(args, out, PREFIXES),
    )
    rollout = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.max_response_length,
      max_prompt_length=args.max_prompt_length,
      kv_cache_size=args.max_prompt_length + args.max_response_length,
      temperature=args.temperature,
      top_p=args.top_p,
      top_k=args.top_k,
    )
    # The actor's trainer restores the latest step of OUT/checkpoints/actor
    # when RLCluster builds it: leave the newest intact one there.
    checkpoints.resume(
      out / "checkpoints" / ACTOR,
      checkpoints.abstract_state(policy, tx, training.gradient_accumulation_steps),
      log,
    )
    # Actor, rollout and reference on one mesh: the rollout samples with the
    # actor's own weights (no copy, no sync).
    cluster = rl.RLCluster(
      actor=policy,
      reference=reference,
      tokenizer=tokenizer,
      cluster_config=rl.ClusterConfig(
        role_to_mesh={rl.Role.ACTOR: mesh, rl.Role.REFERENCE: mesh, rl.Role.ROLLOUT: mesh},
        rollout_engine="vanilla",
        training_config=training,
        rollout_config=rollout,
      ),
    )
    trainer = cluster.actor_trainer
    checkpoints.write_digests(trainer.checkpoint_manager)
    resumed_from = trainer.train_steps
    log(
      f"optimizer ready ({args.optimizer})"
      + (f", resumed from step {resumed_from}" if resumed_from else "")
    )
    if tau is not None:
      dpo.delete(tau)  # the transform keeps tau for `init`, which is never called again

    def report(prompts, completions, rewards, advantages, **kwargs):
      # Rollouts run ahead of the updates, in Tunix's data thread: this line
      # names the step the rollout is for.
      del prompts, completions, advantages, kwargs
      if jax.process_index() == 0:
        print(
          f"step {cluster.global_steps + 1:5d}  rollout reward {np.mean(rewards):.4f}", flush=True
        )
      return {}

    last = lambda name: trainer.metrics_logger.get_metric_history(ACTOR, name, "train")[-1]
    trainer.with_training_hooks(
      dpo.step_log(ACTOR, tau is not None, lambda _: f"kl {last('kl'):.5f}")
    )
    config = grpo_learner.GRPOConfig(
      num_generations=args.num_generations,
      num_iterations=args.num_iterations,
      beta=args.beta,
      epsilon=args.epsilon,
    )
    learner = learner_class()(
      args.seed, cluster, config, reward_fns=reward_fns, metric_fns=[report]
    )
    learner.train(data.Batches(kept, args.batch_size, prompts_lib.batch, seed=args.seed))

  metric = lambda prefix, name: dpo.history(trainer.metrics_logger, prefix, name, "train")
  summary = {
    "optimizer": args.optimizer,
    "steps": trainer.train_steps,
    "resumed_from": resumed_from,
    "prompts": len(kept),
    "train_loss": metric(ACTOR, "loss"),
    "kl": metric(ACTOR, "kl"),
    "reward_mean": metric("rewards", "score/mean"),
    "completion_length": metric("completions", "mean_length"),
    "seconds": round(time.time() - start, 1),
  }
  if tau is not None:
    summary["merge"] = {
      name: metric(ACTOR, f"merge/{name}") for name in omerge_jax.MergeStats._fields
    }
  if args.export:
    export.export_policy(args, trainer.model)
    log(f"exported the actor to {args.export}")
  if jax.process_index() == 0:
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    rewards = summary["reward_mean"]
    print(
      f"mean reward {rewards[0] if rewards else float('nan'):.4f} -> "
      f"{rewards[-1] if rewards else float('nan'):.4f}; {summary['steps']} steps done "
      f"({summary['seconds']} s); wrote {out / 'summary.json'}"
    )
  return summary, cluster


def main(argv=None):
  return run(parse_args(argv))[0]
