r"""The SFT stage: full fine-tuning on ASDiv answered ``#### N``, with Tunix's ``PeftTrainer``.

The loss is the mean negative log-likelihood of the answer's tokens (the
``#### N`` and the EOS), the prompt attended to but not trained on:

.. math::
  \mathcal{L}(\theta) = -\frac{1}{\sum_{i,t} m_{i,t}} \sum_{i,t} m_{i,t}\,
  \log p_\theta(y_{i,t} \mid x_i, y_{i,<t}),

with AdamW on a linear warm-up + cosine schedule. The result is written as
a Hugging Face folder beside the base's tokenizer and config, so that the
DPO stage and the evaluation load it as they load any checkpoint; the task
vector :math:`\tau = \theta_\text{SFT} - \theta_\text{base}` is then a real
fine-tune of a real LM.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.llm_dpo import data as dpo_data
from experiments.llm_dpo import distributed
from experiments.llm_dpo import export
from experiments.llm_dpo import models
from experiments.llm_dpo import train
from experiments.real_lm import data
from experiments.real_lm import evaluate

PREFIX = "sft"


def encode(tokenizer, problems, max_length: int) -> dict[str, np.ndarray]:
  """Right-padded ``input_tokens``, ``input_mask`` (real tokens), ``target_mask`` (the answer).

  The batch is padded to a multiple of `evaluate.BUCKET`, at most ``max_length``.
  """
  rows = []
  for problem in problems:
    prompt = tokenizer.encode(
      dpo_data.render_prompt(tokenizer, data.sft_messages(problem)), add_special_tokens=False
    )
    answer = tokenizer.encode(data.sft_target(problem), add_special_tokens=False)
    answer = answer + [tokenizer.eos_token_id]
    prompt = prompt[-(max_length - len(answer)) :]
    rows.append((prompt + answer, len(prompt)))
  length = min(max_length, -(-max(len(r[0]) for r in rows) // evaluate.BUCKET) * evaluate.BUCKET)
  out = {
    "input_tokens": np.full((len(rows), length), tokenizer.pad_token_id, np.int32),
    "input_mask": np.zeros((len(rows), length), bool),
    "target_mask": np.zeros((len(rows), length), bool),
  }
  for i, (tokens, n_prompt) in enumerate(rows):
    out["input_tokens"][i, : len(tokens)] = tokens
    out["input_mask"][i, : len(tokens)] = True
    out["target_mask"][i, n_prompt : len(tokens)] = True
  return out


def answer_loss(model, input_tokens, input_mask, target_mask):
  r"""The mean negative log-likelihood of the answer tokens (the module's :math:`\mathcal{L}`)."""
  total = jnp.sum(evaluate.sequence_logps(model, input_tokens, input_mask, target_mask))
  return -total / jnp.maximum(jnp.sum(target_mask[:, 1:]), 1)


def run(
  base,
  out,
  problems,
  *,
  steps: int,
  batch_size: int,
  lr: float,
  warmup: int,
  max_length: int,
  seed: int,
  log,
) -> dict:
  """Fine-tune the model of folder ``base`` on ``problems``; write it to folder ``out``.

  Returns:
    ``{"train_loss": [per step], "steps": steps}``.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  from tunix.sft import metrics_logger  # pylint: disable=g-import-not-at-top
  from tunix.sft import peft_trainer  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(base)
  mesh = distributed.make_mesh(None)
  with mesh:
    model = models.load(base, mesh, param_dtype=jnp.float32, dtype=jnp.float32)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, steps - 1), steps)
    config = peft_trainer.TrainingConfig(
      eval_every_n_steps=steps + 1,
      max_steps=steps,
      metrics_prefix=PREFIX,
      pbar_description=None,
      metrics_logging_options=metrics_logger.MetricsLoggerOptions(
        log_dir=str(out),
        backend_kwargs={
          "custom_backend": [lambda: train.JsonlBackend(out / "metrics.jsonl", (PREFIX,))]
        },
      ),
    )
    trainer = peft_trainer.PeftTrainer(model, optax.adamw(schedule), config)
    trainer = trainer.with_gen_model_input_fn(lambda batch: batch).with_loss_fn(answer_loss)
    batches = dpo_data.Batches(
      problems, batch_size, lambda rows: encode(tokenizer, rows, max_length), seed=seed
    )
    log(f"SFT: {steps} steps of {batch_size} ASDiv problems, lr {lr}")
    trainer.train(batches, None)
    loss = train.history(trainer.metrics_logger, PREFIX, "loss", "train")
    export.write_hf(nnx.state(model).to_pure_dict(), base, out, dtype="float32")
  return {"train_loss": loss, "steps": steps}
