"""The methods compared, each a recipe for the preference stage's optimizer.

A method maps one hyper-parameter setting (a dict) to an Optax transform
built from the SFT model's reference delta. Settings every method accepts:
``lr_scale`` (times ``cfg.pref_lr``), ``beta`` (the preference loss's) and
``algorithm`` (``dpo``/``ipo``/``kto``). The offline merges are not here:
they post-process the AdamW model (`runner`).
"""

from __future__ import annotations

import optax

import omerge_jax
from experiments.alignment_tax import training


def _adamw(lr, tau, hp):
  del tau, hp
  return optax.adamw(lr, weight_decay=0.0)


def _ondare(lr, tau, hp):
  return omerge_jax.ondare(lr, tau, alpha=hp.get("alpha", 1e-4), reserve_p=hp.get("reserve_p", 0.1),
                           merge_every=hp.get("merge_every", 1), seed=hp.get("mask_seed", 0))


def _onties(lr, tau, hp):
  return omerge_jax.onties(lr, tau, alpha=hp.get("alpha", 1e-4), reserve_p=hp.get("reserve_p", 0.1),
                           merge_every=hp.get("merge_every", 1))


def _childtuning(lr, tau, hp):
  # ChildTuning-F is unbiased gradient dropout: OnDARE with no reference delta weight.
  return omerge_jax.ondare(lr, tau, alpha=0.0, reserve_p=hp.get("reserve_p", 0.3),
                           seed=hp.get("mask_seed", 0))


METHODS = {
    "AdamW": _adamw,
    "KL": _adamw,            # AdamW with a larger DPO beta (the grid sets ``beta``)
    "EMA": _adamw,           # AdamW, evaluated on the EMA of its weights (``ema``)
    "ChildTuning": _childtuning,
    "OnDARE": _ondare,
    "OnTIES": _onties,
    "OnDARE step-K": _ondare,
    "OnTIES step-K": _onties,
}


def make_tx(method: str, hp: dict, cfg, tau) -> optax.GradientTransformation:
  """The preference stage's optimizer of ``method`` with setting ``hp``."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)} and Offline")
  lr = training.schedule(cfg.pref_lr * hp.get("lr_scale", 1.0), cfg.warmup, cfg.pref_steps)
  return METHODS[method](lr, tau, hp)
