"""The methods compared, each an optimizer of the preference stage and its settings.

A method is one of three optimizers (AdamW, OnDARE, OnTIES) with settings it
always has: ChildTuning is OnDARE with merging weight 0, KL is AdamW with a
larger DPO beta, EMA is AdamW evaluated on the average of its weights, the
step-K methods are OnDARE/OnTIES with ``merge_every``. `canonical` spells a
run out in full, so two methods that train the same model are one run.

Settings (a dict): ``lr_scale`` (times ``cfg.pref_lr``), ``beta`` (the
preference loss's), ``algorithm`` (``dpo``/``ipo``/``kto``), ``ema``; for the
merges ``alpha``, ``reserve_p``, ``merge_every``. The offline merges are not
here: they post-process AdamW models (`runner`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import omerge_jax
from experiments.alignment_tax import training

# name -> (optimizer, settings the method always has)
METHODS = {
  "AdamW": ("AdamW", {}),
  "KL": ("AdamW", {}),  # the grid sets a larger ``beta``
  "EMA": ("AdamW", {}),  # the grid sets ``ema``
  "ChildTuning": ("OnDARE", {"alpha": 0.0}),  # unbiased gradient dropout (ChildTuning-F)
  "OnDARE": ("OnDARE", {}),
  "OnTIES": ("OnTIES", {}),
  "OnDARE step-K": ("OnDARE", {}),
  "OnTIES step-K": ("OnTIES", {}),
}


def canonical(method: str, hp: dict, cfg) -> tuple[str, dict]:
  """``(optimizer, every setting)`` of ``method`` run with ``hp``: the identity of a run."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)} and Offline")
  optimizer, fixed = METHODS[method]
  full = {"lr_scale": 1.0, "beta": cfg.beta, "algorithm": cfg.algorithm, "ema": 0.0}
  if optimizer != "AdamW":
    full.update(alpha=cfg.alpha, reserve_p=cfg.reserve_p, merge_every=1)
  unknown = set(hp) - set(full)
  if unknown:
    raise ValueError(f"{method}: unknown settings {sorted(unknown)}; known: {sorted(full)}")
  full.update(hp)
  full.update(fixed)
  return optimizer, full


def _adamw(lr, tau, hp):
  del tau, hp
  return optax.adamw(lr, weight_decay=0.0)


# No clip of F(tau): in the paper's regime it never acts (|tau| / p is far
# below 1), while here |tau| averages about 0.03, so the library's default clip
# of 1 would cut a tenth of F(tau) at p = 0.05 and tie the pull to p.
DARE_CLIP = None


def _ondare(lr, tau, hp):
  return omerge_jax.ondare(
    lr,
    tau,
    alpha=hp["alpha"],
    reserve_p=hp["reserve_p"],
    merge_every=hp["merge_every"],
    clip=DARE_CLIP,
  )


def _onties(lr, tau, hp):
  return omerge_jax.onties(
    lr, tau, alpha=hp["alpha"], reserve_p=hp["reserve_p"], merge_every=hp["merge_every"]
  )


OPTIMIZERS = {"AdamW": _adamw, "OnDARE": _ondare, "OnTIES": _onties}


def make_tx(method: str, hp: dict, cfg, tau) -> optax.GradientTransformation:
  """The preference stage's optimizer of ``method`` with setting ``hp``."""
  optimizer, full = canonical(method, hp, cfg)
  lr = training.schedule(cfg.pref_lr * full["lr_scale"], cfg.warmup, cfg.pref_steps)
  return OPTIMIZERS[optimizer](lr, tau, full)


# The paper's regime (Qwen1.5/LLaMA-3, lr 5e-7..1e-6, p = 0.01, about 950
# steps, alpha 1e-7..5e-6; the pull of a 1e-3 task-vector entry), beside which
# `regime` prints the testbed's.
PAPER_REGIME = {
  "lr_over_p": (5e-5, 1e-4),
  "p_T": (9.5, 9.5),
  "alpha_T": (1e-4, 5e-3),
  "pull_ratio": (1e-4, 5e-3),
  "clipped": (0.0, 0.0),
}


def regime(cfg, method: str, hp: dict, taus: list) -> dict:
  """`regime_numbers` of ``method`` at setting ``hp`` of the testbed's ``cfg``."""
  _, full = canonical(method, hp, cfg)
  return regime_numbers(
    "OnDARE" if method.startswith("OnDARE") else "OnTIES",
    cfg.pref_lr * full["lr_scale"],
    full["reserve_p"],
    full["alpha"],
    cfg.pref_steps,
    taus,
  )


def regime_numbers(kind: str, lr: float, p: float, alpha: float, steps: int, taus: list) -> dict:
  r"""The dimensionless numbers that say whether a merge runs in the paper's regime.

  With the peak learning rate :math:`\eta`, reserve rate :math:`p`, merging
  weight :math:`\alpha` and :math:`T` steps: :math:`\eta/p` is the jump of a
  kept coordinate under DARE (Adam's step is about :math:`\eta` per entry),
  :math:`pT` the expected number of updates per coordinate, :math:`\alpha T`
  the fraction of the task vector re-added over the run, ``pull_ratio`` the
  merge's pull on a kept coordinate over the optimizer's step there (OnDARE:
  :math:`\alpha\,\mathrm{E}|\mathrm{clip}(\tau/p)| / (\eta/p)`; OnTIES:
  :math:`\alpha\,\mathrm{mean}|\tau|` over its top-p entries :math:`/\,\eta`),
  and ``clipped`` the fraction of :math:`F(\tau)` entries the DARE clip
  (`DARE_CLIP`) touches. Means over the seeds' reference deltas ``taus``.

  Args:
    kind: ``"OnDARE"`` or ``"OnTIES"``.
    lr, p, alpha, steps: :math:`\eta`, :math:`p`, :math:`\alpha`, :math:`T`.
    taus: reference deltas (pytrees), one per seed.
  """
  if kind not in ("OnDARE", "OnTIES"):
    raise ValueError(f"kind {kind!r} is not 'OnDARE' or 'OnTIES'")
  pulls, clipped, sizes = [], [], []
  for tau in taus:
    flat = jnp.concatenate(
      [jnp.abs(jnp.asarray(x, jnp.float32)).ravel() for x in jax.tree.leaves(tau)]
    )
    sizes.append(float(jnp.mean(flat)))
    if kind == "OnDARE":
      clip = jnp.inf if DARE_CLIP is None else DARE_CLIP
      pulls.append(float(alpha * jnp.mean(jnp.minimum(flat / p, clip)) / (lr / p)))
      clipped.append(float(jnp.mean(flat / p > clip)))
    else:
      k = max(1, int(p * flat.size))
      pulls.append(float(alpha * jnp.mean(jax.lax.top_k(flat, k)[0]) / lr))
      clipped.append(0.0)
  return {
    "lr_over_p": lr / p,
    "p_T": p * steps,
    "alpha_T": alpha * steps,
    "pull_ratio": float(np.mean(pulls)),
    "clipped": float(np.mean(clipped)),
    "tau_mean_abs": float(np.mean(sizes)),
  }
