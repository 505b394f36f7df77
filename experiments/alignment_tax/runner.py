"""Run the whole protocol of a config: stages, methods, offline merges, sweeps.

Each method runs the same preference budget from the same SFT model on every
seed. A method with several settings reports the one with the best mean
validation score (`selection_score` on the validation prompts) and its test
metrics; nothing is selected on the test sets. Every row carries its paired
per-seed differences from AdamW with 95 % intervals (`stats.paired`).

Two optional readings put every method at one learning rate
(`learning_rates`): ``common_lr`` at the scale where AdamW's mean test tax
lies in ``cfg.common_lr_band``, chosen from AdamW's runs before any other
method trains (a test metric of the baseline picks where the methods are
compared, never a method's setting), and ``lr_sweep``, every method and the
claims' sweeps at each scale of AdamW's search.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time

import jax
import numpy as np
from flax import nnx

import omerge_jax
from experiments.alignment_tax import data as data_lib
from experiments.alignment_tax import learning_rates
from experiments.alignment_tax import methods as methods_lib
from experiments.alignment_tax import metrics
from experiments.alignment_tax import stats
from experiments.alignment_tax import training
from experiments.alignment_tax.config import Config

ONLINE_ALGORITHM_METHODS = ("AdamW", "OnDARE", "OnTIES")
# Algorithms of the Table-3 comparison whose learning rate each method searches
# anew (its grid, selected on validation by `selection_score` as for DPO):
# GRPO's loss is a policy gradient on sampled answers, not a log-ratio margin on
# the DPO pairs, so DPO's selected learning rate says nothing about it. IPO
# and KTO, losses on the same pairs and reference, keep DPO's settings.
OWN_LR_SEARCH = ("grpo",)


def _key(method, hp, seed):
  return json.dumps([method, sorted(hp.items()), seed])


def selection_score(m: dict) -> float:
  """Reward plus the sum of the skill accuracies: every task's points count once.

  The sum rather than the average: with the average, one point of reward
  weighed as much as one point on every skill at once, and the score
  followed the reward's far larger range.
  """
  return m["reward"] + sum(m["skills"].values())


class Runner:
  """Holds the per-seed stages and memoises every (method, setting, seed) run."""

  def __init__(self, cfg: Config, cache_dir: str | None, progress=None):
    self.cfg = cfg
    self.cache_dir = cache_dir
    self.progress = progress
    self.seeds = {}
    self.runs = {}
    self.trained = {}
    self.frontier = {}
    self.cached_stages = 0
    self.cached_runs = 0

  def _bar(self, desc, steps):
    """A callback advancing the progress bar by the steps of one training call."""
    if self.progress is None:
      return None
    self.progress.set_description(desc)
    done = {"n": 0}

    def on_chunk(n, model=None):
      del model
      self.progress.update(n - done["n"])
      done["n"] = n

    return on_chunk

  def setup(self, seed: int) -> dict:
    """Data, base, SFT (cached), reference delta and the SFT model's test metrics for ``seed``."""
    if seed in self.seeds:
      return self.seeds[seed]
    cfg = self.cfg
    data = data_lib.build(cfg, seed)
    base, hit = training.cached_stage(
      cfg,
      "base",
      seed,
      self.cache_dir,
      lambda: training.pretrain(cfg, data, seed, self._bar(f"seed {seed}: base", cfg.base_steps)),
    )
    self.cached_stages += hit
    if self.progress is not None and hit:
      self.progress.update(cfg.base_steps)
    sft, hit = training.cached_stage(
      cfg,
      "sft",
      seed,
      self.cache_dir,
      lambda: training.sft(cfg, base, data, seed, self._bar(f"seed {seed}: SFT", cfg.sft_steps)),
    )
    self.cached_stages += hit
    if self.progress is not None and hit:
      self.progress.update(cfg.sft_steps)
    base_params, sft_params = training.params_of(base), training.params_of(sft)
    for split in ("pref", "pref_val", "pref_test"):
      data[split] = training.with_reference(sft, data[split])
    setup = {
      "data": data,
      "base": base_params,
      "sft": sft_params,
      # Shaped like what `nnx.Optimizer` hands to ``tx.init``: the Param variables.
      "tau": omerge_jax.reference_delta(nnx.state(sft, nnx.Param), nnx.state(base, nnx.Param)),
      "test": metrics.evaluate(sft, cfg, data, "test", seed=seed),
      "base_skills": metrics.skill_accuracy(base, cfg, data["test_raw"]),
    }
    self.seeds[seed] = setup
    return setup

  def run(self, method: str, hp: dict, seed: int, *, validate: bool) -> dict:
    """Train ``method`` with setting ``hp`` from the SFT model of ``seed``; test (and val) metrics.

    Runs are memoised by their canonical settings, so ChildTuning at OnDARE's
    reserve rate is the OnDARE run with alpha = 0, whichever asked first. An
    AdamW run also evaluates its checkpoints at ``cfg.frontier_fractions`` of
    the run (`self.frontier`).
    """
    cfg = self.cfg
    optimizer, full = methods_lib.canonical(method, hp, cfg)
    key = _key(optimizer, full, seed)
    if key in self.runs and (not validate or "val" in self.runs[key]):
      return self.runs[key]
    if key not in self.trained:
      keep = {
        max(cfg.chunk, round(f * cfg.pref_steps / cfg.chunk) * cfg.chunk)
        for f in cfg.frontier_fractions
      }
      keep = (
        sorted(n for n in keep if n < cfg.pref_steps)
        if optimizer == "AdamW" and not full["ema"]
        else []
      )
      path = (
        os.path.join(self.cache_dir, "pref", cfg.run_key(key, seed) + ".npz")
        if self.cache_dir
        else None
      )
      # The trained params and the frontier's checkpoints are cached, so a
      # protocol killed mid-way resumes with its first unfinished run.
      trees, hit = training.cached_params(
        path,
        cfg,
        seed,
        1 + len(keep),
        lambda: self._train(method, hp, seed, keep),
        f"the {method} run",
      )
      self.cached_runs += hit
      if self.progress is not None and hit:
        self.progress.update(cfg.pref_steps)
      self.trained[key] = trees[0]
      if keep:
        self.frontier[key] = {
          n: self.evaluate(p, seed, validate=False)["test"]
          for n, p in zip(keep, trees[1:], strict=True)
        }
    result = self.evaluate(self.trained[key], seed, validate=validate, beta=full["beta"])
    self.runs[key] = result
    return result

  def _train(self, method: str, hp: dict, seed: int, keep: list) -> list:
    """``method``'s preference run from the SFT model: its final params, then those at the steps ``keep``."""
    cfg, s = self.cfg, self.setup(seed)
    _, full = methods_lib.canonical(method, hp, cfg)
    snapshots, bar = {}, self._bar(f"seed {seed}: {method}", cfg.pref_steps)

    def on_chunk(n, model):
      if bar is not None:
        bar(n)
      if n in keep:
        snapshots[n] = training.params_of(model)

    tx = methods_lib.make_tx(method, hp, cfg, s["tau"])
    model = training.with_params(cfg, s["sft"], seed)
    stage = training.preference_stage(cfg, full["algorithm"], full["beta"], s["data"], s["sft"])
    model, _ = training.train(
      model,
      tx,
      steps=cfg.pref_steps,
      seed=seed + 2000,
      chunk=cfg.chunk,
      ema=full["ema"],
      on_chunk=on_chunk,
      **stage,
    )
    return [training.params_of(model)] + [snapshots[n] for n in keep]

  def frontier_of(self, method: str, hp: dict) -> dict:
    """``{steps: [test metrics per seed]}`` of the checkpoints along ``method``'s runs with ``hp``."""
    optimizer, full = methods_lib.canonical(method, hp, self.cfg)
    per_seed = [self.frontier.get(_key(optimizer, full, seed), {}) for seed in self.cfg.seeds]
    return {
      n: [p[n] for p in per_seed] for n in sorted(per_seed[0]) if all(n in p for p in per_seed)
    }

  def evaluate(self, params, seed, *, validate, beta=None):
    cfg, s = self.cfg, self.setup(seed)
    model = training.with_params(cfg, params, seed)
    result = {"test": metrics.evaluate(model, cfg, s["data"], "test", beta=beta, seed=seed)}
    if validate:
      result["val"] = metrics.evaluate(model, cfg, s["data"], "val", beta=beta, seed=seed)
    return result

  def select(self, method: str, grid, run_fn=None) -> tuple[dict, list[dict]]:
    """The setting of ``grid`` with the best mean validation score, and its test runs per seed."""
    run_fn = run_fn or (lambda hp, seed, validate: self.run(method, hp, seed, validate=validate))
    grid = list(grid) or [{}]
    validate = len(grid) > 1
    best, best_score, best_runs = None, -np.inf, None
    for hp in grid:
      runs = [run_fn(hp, seed, validate) for seed in self.cfg.seeds]
      score = np.mean([selection_score(r["val"]) for r in runs]) if validate else 0.0
      if score > best_score:
        best, best_score, best_runs = hp, score, runs
    return best, [r["test"] for r in best_runs]

  def reference(self):
    return [self.setup(seed)["test"] for seed in self.cfg.seeds]

  def offline(self, kind: str, hp: dict, seed: int, adamw_hp: dict, validate: bool) -> dict:
    """Merge the SFT and AdamW models of ``seed`` over the base model (``omerge_jax.offline``)."""
    key = _key(f"Offline {kind}", dict(hp, adamw=json.dumps(adamw_hp)), seed)
    if key in self.runs and (not validate or "val" in self.runs[key]):
      return self.runs[key]
    s = self.setup(seed)
    self.run("AdamW", adamw_hp, seed, validate=False)
    policy = self.trained[_key(*methods_lib.canonical("AdamW", adamw_hp, self.cfg), seed)]
    merged = _offline_merge(
      kind, hp["weight"], hp.get("density", 1.0), seed, s["base"], s["sft"], policy
    )
    self.runs[key] = self.evaluate(merged, seed, validate=validate)
    return self.runs[key]


@functools.partial(jax.jit, static_argnames=("kind", "density", "seed"))
def _offline_merge(kind, weight, density, seed, base, sft, policy):
  """``base + (1-w) tau_sft + w tau_policy``, by linear, DARE or TIES merging over the base model."""
  models, weights = [sft, policy], [1.0 - weight, weight]
  if kind == "linear":
    return omerge_jax.offline.linear(base, models, weights)
  if kind == "DARE":
    return omerge_jax.offline.dare(base, models, weights, density=density, seed=seed)
  return omerge_jax.offline.ties(base, models, weights, density=density)


def run_protocol(cfg: Config, cache_dir: str | None, progress=None) -> dict:
  """Every table, curve and sweep of ``cfg``: the content of ``results.json``."""
  start = time.time()
  # Auto axes: the annotated parameters are sharded and XLA propagates the rest.
  mesh = (
    jax.make_mesh(
      tuple(n for _, n in cfg.mesh),
      tuple(a for a, _ in cfg.mesh),
      axis_types=(jax.sharding.AxisType.Auto,) * len(cfg.mesh),
    )
    if cfg.mesh
    else None
  )
  with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
    run = Runner(cfg, cache_dir, progress)
    results = _protocol(cfg, run)
  results["wall_time_s"] = time.time() - start
  results["cached_stages"] = run.cached_stages
  results["cached_runs"] = run.cached_runs
  return results


def _row(cfg, hp, runs, reference, **extra):
  return dict(metrics.aggregate(runs, reference, cfg.pref_skills), hparams=hp, **extra)


def _versus(row: dict, baseline: dict) -> dict:
  """Paired per-seed differences ``row - baseline`` of each metric, with 95 % intervals."""
  return {k: stats.paired(row["per_seed"][k], baseline["per_seed"][k]) for k in metrics.PAIRED_KEYS}


def _test_runs(cfg: Config, runner: Runner, method: str, hp: dict) -> list[dict]:
  return [runner.run(method, hp, seed, validate=False)["test"] for seed in cfg.seeds]


def adamw_scales(cfg: Config) -> list[float]:
  """The learning-rate scales of AdamW's search, increasing."""
  return sorted(
    {methods_lib.canonical("AdamW", hp, cfg)[1]["lr_scale"] for hp in dict(cfg.methods)["AdamW"]}
  )


def _common_lr(cfg: Config, runner: Runner, reference: list) -> dict:
  """`learning_rates.common_scale` read from AdamW's runs alone, at its selected setting times each scale.

  `_protocol` calls it before any other method trains, so no other method's
  result can move the comparison point.
  """
  hp, _ = runner.select("AdamW", dict(cfg.methods)["AdamW"])
  taxes = {
    s: metrics.aggregate(_test_runs(cfg, runner, "AdamW", dict(hp, lr_scale=s)), reference)["tax"]
    for s in adamw_scales(cfg)
  }
  return learning_rates.common_scale(taxes, cfg.common_lr_band)


def _sweeps(
  cfg: Config, runner: Runner, reference: list, sweeps: tuple, base_of, adamw: dict | None
) -> dict:
  """Each sweep of ``sweeps`` through ``base_of(method)``, every row paired with ``adamw`` (when given)."""
  out = {}
  for name, methods, param, values in sweeps:
    rows = []
    for method in methods:
      for value in values:
        hp = dict(base_of(method), **{param: value})
        rows.append(
          _row(cfg, hp, _test_runs(cfg, runner, method, hp), reference, method=method, value=value)
        )
        if adamw is not None:
          rows[-1]["vs_adamw"] = _versus(rows[-1], adamw)
    out[name] = {"param": param, "rows": rows}
  return out


def _at_lr(
  cfg: Config,
  runner: Runner,
  reference: list,
  scale: float,
  selected: dict,
  offline: dict,
  sweeps: tuple,
  base_of,
) -> dict:
  """Every method at ``lr_scale = scale``, paired with AdamW at that scale, and ``sweeps`` through those settings.

  A method keeps its other selected settings; an offline merge keeps its
  selected weight and density and merges AdamW at ``scale``.
  """
  at = lambda hp: dict(hp, lr_scale=scale)
  table = {
    m: _row(cfg, at(hp), _test_runs(cfg, runner, m, at(hp)), reference)
    for m, hp in selected.items()
  }
  for kind, hp in offline.items():
    runs = [
      runner.offline(kind, hp, seed, at(selected["AdamW"]), False)["test"] for seed in cfg.seeds
    ]
    table[f"Offline {kind}"] = _row(cfg, hp, runs, reference)
  for row in table.values():
    row["vs_adamw"] = _versus(row, table["AdamW"])
  return {
    "lr_scale": scale,
    "methods": table,
    "sweeps": _sweeps(cfg, runner, reference, sweeps, lambda m: at(base_of(m)), table["AdamW"]),
  }


def _protocol(cfg: Config, runner: Runner) -> dict:
  grids = dict(cfg.methods)
  if (cfg.common_lr_band or cfg.lr_sweep) and "AdamW" not in grids:
    raise ValueError("common_lr_band and lr_sweep compare with AdamW: add it to the methods")
  if cfg.lr_sweep and len(adamw_scales(cfg)) < 2:
    raise ValueError(
      f"lr_sweep needs several learning rates in AdamW's search; it has {adamw_scales(cfg)}"
    )
  reference = runner.reference()
  table = {"SFT": _row(cfg, {}, reference, reference)}
  base = [runner.setup(seed)["base_skills"] for seed in cfg.seeds]
  stages = {
    "Base (raw format)": {
      "skills": {s: float(np.mean([b[s] for b in base])) for s in cfg.skills},
      "std": {"skills": {s: float(np.std([b[s] for b in base])) for s in cfg.skills}},
    },
    "SFT (chat format)": table["SFT"],
  }
  # Read off AdamW's runs before any other method trains: no other result can move it.
  common = _common_lr(cfg, runner, reference) if cfg.common_lr_band else {}
  selected, offline_selected = {}, {}
  for method, grid in cfg.methods:
    if method == "Offline":
      continue
    hp, runs = runner.select(method, grid)
    selected[method] = hp
    table[method] = _row(cfg, hp, runs, reference)
  frontier = []
  for hp in grids.get("AdamW", ()):
    for steps, runs in runner.frontier_of("AdamW", hp).items():
      frontier.append(_row(cfg, hp, runs, reference, steps=steps))
    runs = _test_runs(cfg, runner, "AdamW", hp)
    frontier.append(_row(cfg, hp, runs, reference, steps=cfg.pref_steps))
  curve, offline_points = [], []
  if "Offline" in grids:
    adamw_hp = selected.get("AdamW", {})
    weights, densities = cfg.offline_weights, cfg.offline_densities
    for kind, grid in (
      ("linear", [{"weight": w} for w in weights]),
      ("DARE", [{"weight": w, "density": d} for w in weights for d in densities]),
      ("TIES", [{"weight": w, "density": d} for w in weights for d in densities]),
    ):
      run_fn = lambda hp, seed, v, kind=kind: runner.offline(kind, hp, seed, adamw_hp, v)
      hp, runs = runner.select(kind, grid, run_fn)
      offline_selected[kind] = hp
      table[f"Offline {kind}"] = _row(cfg, hp, runs, reference)
      for point in grid:
        runs = [run_fn(point, seed, False)["test"] for seed in cfg.seeds]
        offline_points.append(_row(cfg, point, runs, reference, kind=kind))
    curve = [
      dict(p, weight=p["hparams"]["weight"]) for p in offline_points if p["kind"] == "linear"
    ]
  adamw = table.get("AdamW")
  for row in table.values():
    if adamw is not None:
      row["vs_adamw"] = _versus(row, adamw)
  base_of = lambda method: selected.get(method) or (list(grids.get(method, ())) or [{}])[0]
  sweeps = _sweeps(cfg, runner, reference, cfg.sweeps, base_of, adamw)
  if common.get("lr_scale") is not None:
    common["methods"] = _at_lr(
      cfg, runner, reference, common["lr_scale"], selected, offline_selected, (), base_of
    )["methods"]
  lr_sweep = {}
  if cfg.lr_sweep:
    lr_sweep = {
      "pref_lr": cfg.pref_lr,
      "rule": learning_rates.SWEEP_RULE,
      "at": [
        _at_lr(cfg, runner, reference, s, selected, offline_selected, cfg.lr_sweep_sweeps, base_of)
        for s in adamw_scales(cfg)
      ],
    }
  algorithms = {}
  for algorithm in (cfg.algorithm,) + tuple(a for a in cfg.algorithms if a != cfg.algorithm):
    if not cfg.algorithms:
      break
    algorithms[algorithm] = {}
    for method in ONLINE_ALGORITHM_METHODS:
      if algorithm in OWN_LR_SEARCH:
        grid = [dict(hp, algorithm=algorithm) for hp in grids.get(method, ())] or [
          {"algorithm": algorithm}
        ]
        hp, runs = runner.select(method, grid)
      else:
        hp = dict(selected.get(method, {}), algorithm=algorithm)
        runs = _test_runs(cfg, runner, method, hp)
      algorithms[algorithm][method] = _row(cfg, hp, runs, reference)
    base = algorithms[algorithm]["AdamW"]
    for row in algorithms[algorithm].values():
      row["vs_adamw"] = _versus(row, base)
  regime = {
    name: methods_lib.regime(cfg, name, selected[name], [runner.setup(s)["tau"] for s in cfg.seeds])
    for name in ("OnDARE", "OnTIES")
    if name in selected
  }
  return {
    "methods": table,
    "offline_curve": curve,
    "offline_points": offline_points,
    "adamw_frontier": frontier,
    "stages": stages,
    "sweeps": sweeps,
    "algorithms": algorithms,
    "regime": regime,
    "common_lr": common,
    "lr_sweep": lr_sweep,
    "config": cfg.to_json(),
  }
