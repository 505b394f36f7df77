"""The alignment-tax testbed: ``python -m experiments.alignment_tax [--preset NAME] [--out DIR] [key=value ...]``.

Pre-trains a small transformer on string skills, SFTs it into a chat format,
then runs the preference stage with every method of the preset and prints
the paper-style table; results, table and figures go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
from tqdm.auto import tqdm

from experiments.alignment_tax import config as config_lib
from experiments.alignment_tax import methods
from experiments.alignment_tax import report
from experiments.alignment_tax import runner


def planned_steps(cfg: config_lib.Config) -> int:
  """The training steps of ``cfg``, each distinct run (`methods.canonical`) counted once.

  Counted as if every selection picked its grid's first setting: when each
  grid is one setting or a learning-rate search (`config.lr_search`), a
  selection moves which runs are made, not how many, and the count is exact.
  """
  grids = {name: list(grid) or [{}] for name, grid in cfg.methods if name != "Offline"}
  base_of = lambda m: grids.get(m, [{}])[0]
  planned = [(m, hp) for m, grid in grids.items() for hp in grid]
  planned += [
    (m, dict(base_of(m), **{p: v})) for _, ms, p, vs in cfg.sweeps for m in ms for v in vs
  ]
  for a in cfg.algorithms:
    for m in runner.ONLINE_ALGORITHM_METHODS:
      searched = grids.get(m, [{}]) if a in runner.OWN_LR_SEARCH else [base_of(m)]
      planned += [(m, dict(hp, algorithm=a)) for hp in searched]
  scales = runner.adamw_scales(cfg) if cfg.common_lr_band or cfg.lr_sweep else []
  planned += [(m, dict(base_of(m), lr_scale=s)) for s in scales for m in grids]
  if cfg.lr_sweep:
    planned += [
      (m, dict(base_of(m), lr_scale=s, **{p: v}))
      for s in scales
      for _, ms, p, vs in cfg.lr_sweep_sweeps
      for m in ms
      for v in vs
    ]
  runs = {json.dumps(methods.canonical(m, hp, cfg), sort_keys=True) for m, hp in planned}
  return len(cfg.seeds) * (cfg.base_steps + cfg.sft_steps + len(runs) * cfg.pref_steps)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="default", choices=sorted(config_lib.PRESETS))
  parser.add_argument("--out", default=None, help="default: results/alignment_tax/<preset>/")
  parser.add_argument(
    "--no-cache",
    action="store_true",
    help="retrain every stage and preference run (nothing read from or written to OUT/cache)",
  )
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.add_argument(
    "overrides",
    nargs="*",
    help="config overrides, e.g. pref_steps=300 'seeds=(0,1)' (quoted for the shell)",
  )
  args = parser.parse_args(argv)
  cfg = config_lib.with_overrides(config_lib.PRESETS[args.preset], args.overrides)
  out = args.out or os.path.join("results", "alignment_tax", cfg.name)
  cache = None if args.no_cache else os.path.join(out, "cache")
  if cache:
    # Reruns and sweeps in new processes skip XLA compilation, most of a small run's time.
    jax.config.update("jax_compilation_cache_dir", os.path.join(cache, "xla"))
  with tqdm(total=planned_steps(cfg), unit="step", disable=args.quiet, dynamic_ncols=True) as bar:
    results = runner.run_protocol(cfg, cache, bar)
  report.write_outputs(results, out)
  print()
  print(report.table_md(results))
  print(report.frontier_verdicts_md(results))
  print(report.claims_md(results))
  for text in (report.common_lr_md(results), report.claims_over_lr_md(results)):
    if text:
      print(text)
  print(f"wall time {results['wall_time_s']:.1f} s; results, table.md and figures in {out}/")
  return results


if __name__ == "__main__":
  main()
