"""The testbed's configuration, its presets and ``key=value`` overrides."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json


@dataclasses.dataclass(frozen=True)
class Config:
  """Every knob of the three stages, the methods and the sweeps.

  Grids are tuples of dicts: each dict is one hyper-parameter setting of a
  method, and the method's reported row is the setting with the best
  validation score (`runner.selection_score`, on held-out validation prompts).
  """

  name: str = "default"
  seeds: tuple = (0,)
  # Skills and data. Every skill is one the SFT model masters (>= 85 % exact match).
  skills: tuple = ("copy", "reverse", "sort", "shift", "rotate")
  min_len: int = 3
  max_len: int = 6
  prompt_len: int = 24
  answer_len: int = 10
  n_pretrain: int = 4000  # examples per skill
  n_sft: int = 1000  # examples per skill
  sft_style_rate: float = 0.1  # fraction of SFT answers already in the preferred style
  n_test: int = 256  # held-out exact-match prompts per skill
  n_val: int = 128
  # Model.
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  d_ff: int = 256
  # Stage 1: pre-training the base model.
  base_steps: int = 3000
  base_lr: float = 3e-3
  base_batch: int = 64
  # Stage 2: SFT into the chat format (the reference model).
  sft_steps: int = 1000
  sft_lr: float = 3e-3
  sft_batch: int = 64
  # Stage 3: preference optimisation from the SFT model.
  pref_skills: tuple = ("copy", "reverse")
  content_pair_rate: float = (
    0.5  # pairs whose rejected answer is styled but wrong (else plain, correct)
  )
  n_pref: int = 2000  # preference pairs per preference skill
  n_reward: int = 128  # held-out reward prompts per preference skill and split
  reward_samples: int = 2  # sampled generations per reward prompt
  algorithm: str = "dpo"
  beta: float = 0.1
  pref_steps: int = 200
  pref_lr: float = 1.5e-5
  pref_batch: int = 32
  warmup: int = 20
  # GRPO (algorithm "grpo"): answers sampled per prompt, and the KL coefficient to the SFT model.
  grpo_group: int = 4
  grpo_kl: float = 0.04
  # The merge's defaults, in the paper's dimensionless regime (`report.regime`).
  reserve_p: float = 0.05
  alpha: float = 1e-6
  # Methods: name -> grid of settings (see `methods.METHODS`).
  methods: tuple = ()
  offline_weights: tuple = (0.1, 0.3, 0.5, 0.7, 0.9)
  offline_densities: tuple = (0.3, 0.5, 0.7)
  # Sweeps: name -> (base methods, parameter, values).
  sweeps: tuple = ()
  algorithms: tuple = ()  # extra algorithms for the Table-3 comparison ("ipo", "kto", "grpo")
  # Every method at one learning rate where AdamW's mean tax lies in this band of points, e.g. (3.0, 10.0);
  # () skips it (`learning_rates.common_scale`).
  common_lr_band: tuple = ()
  # The claims re-read at every learning rate of AdamW's search, with these sweeps (shaped like
  # ``sweeps``) repeated at each (`learning_rates.robustness`).
  lr_sweep: bool = False
  lr_sweep_sweeps: tuple = ()
  # AdamW checkpoints evaluated along each of its runs, for its reward/tax frontier.
  frontier_fractions: tuple = (0.25, 0.5, 0.75)
  # Larger runs: a device mesh for sharding, e.g. ((\"data\", 2), (\"model\", 4)).
  mesh: tuple = ()
  chunk: int = 50  # training steps per compiled scan

  def stage_key(self, stage: str, seed: int) -> str:
    """A hash of everything the cached ``stage`` ("base" or "sft") depends on.

    The held-out sets are drawn first from the seed's generator, so the data
    fields (including the preference skills' held-out prompts) are part of it.
    """
    names = [f.name for f in dataclasses.fields(self)]
    stage_fields = names[
      names.index("skills") : names.index("sft_steps" if stage == "base" else "pref_skills")
    ]
    stage_fields += ["pref_skills", "n_reward"]
    relevant = {n: getattr(self, n) for n in stage_fields}
    blob = json.dumps(relevant, sort_keys=True, default=str)
    return f"{stage}_seed{seed}_{hashlib.sha1(blob.encode()).hexdigest()[:10]}"

  # What decides which runs a protocol makes, not what one run computes.
  _NOT_IN_A_RUN = (
    "name",
    "seeds",
    "methods",
    "offline_weights",
    "offline_densities",
    "sweeps",
    "algorithms",
    "common_lr_band",
    "lr_sweep",
    "lr_sweep_sweeps",
  )

  def run_key(self, run: str, seed: int) -> str:
    """A hash of the preference run ``run`` (its method and full setting) and of every
    field one run depends on: the data, the models, the stages, the schedule."""
    relevant = {
      f.name: getattr(self, f.name)
      for f in dataclasses.fields(self)
      if f.name not in self._NOT_IN_A_RUN
    }
    blob = json.dumps([relevant, run], sort_keys=True, default=str)
    return f"pref_seed{seed}_{hashlib.sha1(blob.encode()).hexdigest()[:16]}"

  def to_json(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self), default=list))


LR_SCALES = (0.5, 1.0, 2.0)


def lr_search(**hp) -> tuple:
  """Three settings of a method: its learning rate times 0.5, 1 and 2, the rest fixed."""
  return tuple(dict(hp, lr_scale=s) for s in LR_SCALES)


DEFAULT_METHODS = (
  ("AdamW", ({},)),
  ("ChildTuning", ({},)),
  ("OnDARE", ({},)),
  ("OnTIES", ({},)),
  ("Offline", ()),
)

# Equal budget: every method searches the same three learning rates, with the
# rest at the testbed's defaults (the merges' reserve rate and merging weight,
# ChildTuning at OnDARE's reserve rate, the EMA's horizon half the run, KL's
# larger DPO beta), and is selected by the same rule on validation data.
PAPER_METHODS = (
  ("AdamW", lr_search()),
  ("KL", lr_search(beta=0.3)),
  ("EMA", lr_search(ema=0.01)),
  ("ChildTuning", lr_search()),
  ("OnDARE", lr_search()),
  ("OnTIES", lr_search()),
  ("Offline", ()),
)

# The sweeps behind the paper's claims, each through the selected setting:
# reserve rate down to the paper's 5e-4 (Fig. 2), merging weight from 0 (the
# merge pull isolated) to far above the paper's range (Table 2), merge
# interval K up to the whole run (Fig. 3), the DPO beta (Fig. 4).
PAPER_SWEEPS = (
  ("reserve_p", ("OnDARE", "OnTIES"), "reserve_p", (1.0, 0.05, 5e-4)),
  ("alpha", ("OnDARE", "OnTIES"), "alpha", (0.0, 1e-6, 1e-4, 1e-3)),
  ("merge_every", ("OnDARE", "OnTIES"), "merge_every", (1, 200)),
  ("beta", ("AdamW", "OnTIES"), "beta", (0.03, 0.1)),
)

# The sweeps' values that the claims compare (`report.claims`: the smallest
# reserve rate against the default, the largest merging weight and interval
# against the smallest), repeated at every learning rate of the paper preset's
# claims sweep; the other values draw the sweep figures and make no claim.
PAPER_LR_SWEEPS = (
  ("reserve_p", ("OnDARE", "OnTIES"), "reserve_p", (0.05, 5e-4)),
  ("alpha", ("OnDARE", "OnTIES"), "alpha", (0.0, 1e-3)),
  ("merge_every", ("OnDARE", "OnTIES"), "merge_every", (1, 200)),
)

PRESETS = {
  "smoke": Config(
    name="smoke",
    n_pretrain=300,
    n_sft=100,
    n_test=16,
    n_val=8,
    n_pref=64,
    n_reward=16,
    reward_samples=2,
    d_model=32,
    n_layers=1,
    n_heads=2,
    d_ff=64,
    base_steps=40,
    sft_steps=20,
    pref_steps=10,
    base_batch=16,
    sft_batch=16,
    pref_batch=8,
    warmup=2,
    chunk=10,
    methods=(("AdamW", ({}, {"lr_scale": 2.0})),) + DEFAULT_METHODS[1:],
    offline_weights=(0.5,),
    offline_densities=(0.5,),
    frontier_fractions=(0.5,),
  ),
  "default": Config(
    name="default",
    methods=DEFAULT_METHODS,
    offline_weights=(0.25, 0.5, 0.75),
    offline_densities=(0.5,),
  ),
  "paper": Config(
    name="paper",
    seeds=(0, 1, 2, 3, 4),
    methods=PAPER_METHODS,
    sweeps=PAPER_SWEEPS,
    algorithms=("ipo", "kto", "grpo"),
    common_lr_band=(3.0, 10.0),
    lr_sweep=True,
    lr_sweep_sweeps=PAPER_LR_SWEEPS,
  ),
  "large": Config(
    name="large",
    seeds=(0, 1, 2, 3, 4),
    d_model=512,
    n_layers=8,
    n_heads=8,
    d_ff=2048,
    n_pretrain=50000,
    n_sft=10000,
    max_len=12,
    prompt_len=32,
    answer_len=16,
    base_steps=20000,
    sft_steps=4000,
    pref_steps=1000,
    base_batch=256,
    sft_batch=256,
    pref_batch=128,
    base_lr=1e-3,
    sft_lr=3e-4,
    pref_lr=1e-6,
    reserve_p=0.01,
    n_pref=64000,
    methods=PAPER_METHODS,
    sweeps=PAPER_SWEEPS,
    algorithms=("ipo", "kto", "grpo"),
    mesh=(("data", 2), ("model", 4)),
  ),
}


# Wall time and seeds of the `paper` run behind docs/RESULTS.md (its docs/figures/results.json, 2 CPU
# cores), so that a one-seed report can say what intervals cost; a test keeps them equal to that file's.
PAPER_RUN_MINUTES = 37.8
PAPER_RUN_SEEDS = 3


def with_overrides(config: Config, overrides: list[str]) -> Config:
  """Apply ``key=value`` overrides; values are Python literals (``seeds=(0,1)``)."""
  fields = {f.name: f for f in dataclasses.fields(config)}
  changes = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep or key not in fields:
      raise ValueError(f"override {item!r}: expected key=value with key in {sorted(fields)}")
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    current = getattr(config, key)
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
      value = (value,)
    if type(value) is not type(current):
      raise ValueError(f"override {item!r}: {key} is {type(current).__name__}")
    changes[key] = value
  return dataclasses.replace(config, **changes)
