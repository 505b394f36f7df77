"""Turn a ``results.json`` into the table, the figures and ``docs/RESULTS.md``.

Every number and figure written here is read from the results: run
``python -m experiments.alignment_tax.report RESULTS_JSON [OUT_MD]`` to
regenerate ``docs/RESULTS.md`` from a ``paper`` run. The run's
``results.json`` is copied to ``figures/`` beside ``OUT_MD`` and the figures
are drawn from it there, so the document and the numbers it was made from are
versioned together, and rerunning the command on ``docs/figures/results.json``
reproduces both.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.alignment_tax import config as config_lib  # noqa: E402
from experiments.alignment_tax import frontier as frontier_lib  # noqa: E402
from experiments.alignment_tax import learning_rates  # noqa: E402
from experiments.alignment_tax import methods as methods_lib  # noqa: E402
from experiments.alignment_tax import stats  # noqa: E402


def _ci(row, key, baseline="vs_adamw"):
  diff = row.get(baseline, {}).get(key)
  return stats.fmt(diff) if diff else "—"


def _hp(hp):
  return (
    ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()) or "—"
  )


SHORT_HEAD = "Reward | Benchmark avg | Tax | Δ reward vs AdamW | Δ tax vs AdamW"


def _short(row: dict) -> str:
  """The cells under `SHORT_HEAD` of one row."""
  return (
    f"{row['reward']:.1f} | {row['benchmark_avg']:.1f} | {row['tax']:.1f} | {_ci(row, 'reward')} | "
    f"{_ci(row, 'tax')}"
  )


def table_md(results: dict) -> str:
  """The paper's Table 1 layout: one row per method; reward, skills, average, the taxes,
  and the paired differences from AdamW with their 95 % intervals."""
  skills = results["config"]["skills"]
  head = [
    "Method",
    "Reward",
    *skills,
    "Benchmark avg",
    "Tax",
    "Tax (pref. skills)",
    "Tax (other skills)",
    "Δ reward vs AdamW",
    "Δ tax vs AdamW",
    "Setting",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in results["methods"].items():
    cells = [name, f"{row['reward']:.1f}"]
    cells += [f"{row['skills'][s]:.1f}" for s in skills]
    cells += [
      f"{row['benchmark_avg']:.1f}",
      f"{row['tax']:.1f}",
      f"{row.get('tax_pref', 0.0):.1f}",
      f"{row.get('tax_other', 0.0):.1f}",
    ]
    cells += [_ci(row, "reward"), _ci(row, "tax"), _hp(row.get("hparams", {}))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# Table 3's preference algorithms; the paper has no RL row.
PAPER_ALGORITHMS = ("dpo", "ipo", "kto")


def algorithms_md(results: dict) -> str:
  """Table 3's layout: reward / benchmark_avg / tax per algorithm and method, with paired intervals."""
  algs = results.get("algorithms") or {}
  if not algs:
    return ""
  lines = [f"| Algorithm | Method | {SHORT_HEAD} | Setting |", "|---|---|---|---|---|---|---|---|"]
  for alg, rows in algs.items():
    for method, row in rows.items():
      setting = _hp({k: v for k, v in row.get("hparams", {}).items() if k != "algorithm"})
      lines.append(f"| {alg.upper()} | {method} | {_short(row)} | {setting} |")
  return "\n".join(lines) + "\n"


def sweep_md(name: str, sweep: dict) -> str:
  lines = [f"| Method | {sweep['param']} | {SHORT_HEAD} |", "|---|---|---|---|---|---|---|"]
  for r in sweep["rows"]:
    lines.append(f"| {r['method']} | {r['value']:g} | {_short(r)} |")
  return "\n".join(lines) + "\n"


def frontier_md(results: dict) -> str:
  """AdamW at each learning rate of its search, along the run: the frontier on the Pareto figure."""
  rows = results.get("adamw_frontier") or []
  if not rows:
    return ""
  lines = [
    "| lr_scale | steps | Reward | Benchmark avg | Tax | Tax per seed |",
    "|---|---|---|---|---|---|",
  ]
  for r in rows:
    per_seed = ", ".join(f"{t:.1f}" for t in r["per_seed"]["tax"])
    lines.append(
      f"| {r['hparams'].get('lr_scale', 1.0):g} | {r['steps']} | {r['reward']:.1f} | "
      f"{r['benchmark_avg']:.1f} | {r['tax']:.1f} | {per_seed} |"
    )
  return "\n".join(lines) + "\n"


def _outside(results: dict, side: dict) -> str:
  return (
    "outside (seed " + ", ".join(str(results["config"]["seeds"][i]) for i in side["outside"]) + ")"
  )


def _reading(results: dict, side: dict) -> tuple[str, str]:
  """AdamW's mean value on the frontier and the paired difference, or which seeds fall outside it."""
  if side["outside"]:
    return _outside(results, side), "—"
  return f"{sum(side['adamw']) / len(side['adamw']):.1f}", stats.fmt(side["diff"])


def frontier_verdicts_md(results: dict) -> str:
  """Every method against AdamW's frontier, seed by seed (`frontier.compare`)."""
  if not results.get("adamw_frontier"):
    return ""
  lines = [
    "| Method | Tax | AdamW's reward at that tax | Δ reward | Reward | AdamW's tax at that reward | Δ tax "
    "| Verdict |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for name, row in results["methods"].items():
    if name == "SFT":
      continue  # a vertex of the frontier itself
    c = frontier_lib.compare(results, row)
    reward_at, d_reward = _reading(results, c["reward"])
    tax_at, d_tax = _reading(results, c["tax"])
    lines.append(
      f"| {name} | {row['tax']:.1f} | {reward_at} | {d_reward} | {row['reward']:.1f} | {tax_at} | "
      f"{d_tax} | {c['verdict']} |"
    )
  return "\n".join(lines) + "\n"


def regime_md(results: dict) -> str:
  """The merges' dimensionless numbers beside the paper's (`methods.regime`)."""
  regime = results.get("regime") or {}
  if not regime:
    return ""
  keys = [
    ("lr_over_p", "lr / p"),
    ("p_T", "p·T (updates per coordinate)"),
    ("alpha_T", "α·T"),
    ("pull_ratio", "merge pull / optimizer step"),
    ("clipped", "F(τ) entries clipped"),
  ]
  head = "| quantity | paper | " + " | ".join(regime) + " |"
  lines = [head, "|---|---|" + "---|" * len(regime)]
  for key, label in keys:
    lo, hi = methods_lib.PAPER_REGIME[key]
    paper = f"{lo:.2g}" if lo == hi else f"{lo:.2g} – {hi:.2g}"
    lines.append(
      f"| {label} | {paper} | " + " | ".join(f"{r[key]:.2g}" for r in regime.values()) + " |"
    )
  return "\n".join(lines) + "\n"


def _draw_pareto(ax, results: dict, bars: bool) -> None:
  """One panel of `pareto_figure`: every point, with std bars over seeds when ``bars``."""
  frontier = [(r["benchmark_avg"], r["reward"]) for r in results.get("adamw_frontier") or []]
  if frontier:
    ax.scatter(
      *zip(*frontier, strict=True),
      s=12,
      color="black",
      alpha=0.35,
      label="AdamW runs and checkpoints",
    )
    sft = results["methods"]["SFT"]
    ax.plot(
      *zip(*frontier_lib.envelope(frontier + [(sft["benchmark_avg"], sft["reward"])]), strict=True),
      "-",
      color="black",
      lw=1,
      label="AdamW frontier (lr × steps)",
    )
  points = results.get("offline_points") or []
  for kind, marker in (("linear", "x"), ("DARE", "+"), ("TIES", "1")):
    xy = [(p["benchmark_avg"], p["reward"]) for p in points if p["kind"] == kind]
    if xy:
      ax.scatter(
        *zip(*xy, strict=True), marker=marker, s=30, color="grey", label=f"offline {kind} merges"
      )
  linear = sorted(
    (p["hparams"]["weight"], p["benchmark_avg"], p["reward"])
    for p in points
    if p["kind"] == "linear"
  )
  if linear:
    ax.plot([x for _, x, _ in linear], [y for _, _, y in linear], "--", color="grey", lw=1)
  # More methods than a default colour cycle: pair 20 colours with markers.
  colors, markers = plt.get_cmap("tab20").colors, "osD^v<p"
  for i, (name, row) in enumerate(results["methods"].items()):
    ax.errorbar(
      row["benchmark_avg"],
      row["reward"],
      xerr=row["std"]["benchmark_avg"] if bars else None,
      yerr=row["std"]["reward"] if bars else None,
      fmt=markers[i % len(markers)],
      color=colors[(2 * i + i // 10) % 20],
      capsize=2,
      label=name,
    )
  ax.set_xlabel("benchmark average (exact match, %)")
  ax.set_ylabel("gold reward (styled and correct, %)")


def _methods_box(results: dict) -> tuple[tuple[float, float], tuple[float, float]]:
  """The x and y ranges the methods other than the offline merges occupy, padded.

  The offline merges are left out: where they collapse they would stretch the
  box over tens of points and squeeze the methods back into a sliver. So are
  the error bars: a seed's SFT model moves every method's score together, so
  the std over seeds spans the box while the paired differences are tight.
  """
  rows = [row for name, row in results["methods"].items() if not name.startswith("Offline")]
  box = []
  for key in ("benchmark_avg", "reward"):
    lo, hi = min(row[key] for row in rows), max(row[key] for row in rows)
    pad = max(0.15 * (hi - lo), 0.5)
    box.append((lo - pad, hi + pad))
  return tuple(box)


def pareto_figure(results: dict, path: str) -> tuple[tuple[float, float], tuple[float, float]]:
  """Reward against benchmark average: every method, the AdamW frontier over learning rate
  and steps, and every offline merge of the SFT and AdamW models.

  The left panel shows every point; the right one zooms on the box the methods
  occupy (`_methods_box`), where AdamW's frontier decides the trade-off claim.
  Error bars (std over seeds) only with several seeds. Returns the zoom's x and
  y ranges.
  """
  n = len(results["config"]["seeds"])
  bars = n >= 2
  fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": (1, 1.6)})
  for ax in (full, zoom):
    _draw_pareto(ax, results, bars)
  (x0, x1), (y0, y1) = _methods_box(results)
  zoom.set_xlim(x0, x1)
  zoom.set_ylim(y0, y1)
  full.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls=":", color="tab:red"))
  full.set_title("every point (dotted: the zoom on the right)", fontsize=9)
  zoom.set_title("zoom: the methods and AdamW's frontier", fontsize=9)
  seeds = f"{n} seeds; bars: std over seeds" if bars else "1 seed, no error bars"
  fig.suptitle(f"Reward vs alignment tax ({results['config']['name']} preset, {seeds})")
  zoom.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return (x0, x1), (y0, y1)


def sweep_figure(name: str, sweep: dict, path: str) -> None:
  """Reward and benchmark average against the swept parameter, one line per method."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  methods = sorted(
    {r["method"] for r in sweep["rows"]}, key=[r["method"] for r in sweep["rows"]].index
  )
  values = [r["value"] for r in sweep["rows"]]
  log = min(values) > 0 and max(values) / min(values) >= 100
  for method in methods:
    rows = [r for r in sweep["rows"] if r["method"] == method]
    xs = [r["value"] for r in rows]
    for ax, key in zip(axes, ("reward", "benchmark_avg"), strict=True):
      ax.errorbar(
        xs,
        [r[key] for r in rows],
        yerr=[r["std"][key] for r in rows],
        marker="o",
        capsize=2,
        label=method,
      )
  for ax, label in zip(axes, ("gold reward (%)", "benchmark average (%)"), strict=True):
    ax.set_xlabel(sweep["param"])
    ax.set_ylabel(label)
    if log:
      ax.set_xscale("log")
    elif sweep["param"] == "alpha":
      ax.set_xscale("symlog", linthresh=1e-5)
    ax.legend(fontsize=7)
  fig.suptitle(f"sweep: {name}")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(results: dict, out_dir: str) -> list[str]:
  """``results.json``, ``table.md`` and the figures in ``out_dir``; returns the figure paths."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  text = table_md(results)
  if results.get("common_lr"):
    text += "\nEvery method at the common learning rate:\n\n" + common_lr_md(results)
  if results.get("lr_sweep"):
    text += "\nThe claims across learning rates:\n\n" + claims_over_lr_md(results)
  if results.get("algorithms"):
    text += "\n" + algorithms_md(results)
  for name, sweep in results.get("sweeps", {}).items():
    text += f"\nSweep `{name}`:\n\n" + sweep_md(name, sweep)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text)
  return write_figures(results, out_dir)


def write_figures(results: dict, out_dir: str) -> list[str]:
  """The Pareto and sweep figures of ``results`` in ``out_dir``; returns their paths."""
  figures = [os.path.join(out_dir, "pareto.png")]
  pareto_figure(results, figures[0])
  for name, sweep in results.get("sweeps", {}).items():
    figures.append(os.path.join(out_dir, f"sweep_{name}.png"))
    sweep_figure(name, sweep, figures[-1])
  return figures


# A robustness claim ("does not change") is reproduced when the whole interval
# of the change lies within this many points of zero.
EQUIVALENCE_MARGIN = 5.0


def _verdict(ok: bool, n: int) -> str:
  if n < 2:
    return "undetermined (1 seed)"
  return "reproduced" if ok else "not reproduced"


def _rows(sweep: dict, method: str) -> list[dict]:
  return sorted((r for r in sweep["rows"] if r["method"] == method), key=lambda r: r["value"])


def _diff(a: dict, b: dict, key: str) -> dict:
  return stats.paired(a["per_seed"][key], b["per_seed"][key])


def claims(results: dict) -> list[dict]:
  """The paper's claims checked with paired 95 % intervals.

  Each item: ``claim`` (what the paper says), ``evidence`` (the differences
  and intervals) and ``reproduced`` (True only when every interval the claim
  needs excludes zero in the paper's direction, or, for a robustness claim,
  lies within `EQUIVALENCE_MARGIN`).
  """
  m = results["methods"]
  sft, adamw = m["SFT"], m.get("AdamW")
  out = []
  if adamw is None:
    return out
  gain, tax = _diff(adamw, sft, "reward"), _diff(adamw, sft, "benchmark_avg")
  out.append(
    {
      "claim": "The testbed has an alignment tax: AdamW-DPO raises the reward and lowers the benchmark average",
      "evidence": f"reward {stats.fmt(gain)}, benchmark average {stats.fmt(tax)} (AdamW − SFT)",
      "reproduced": stats.reproduced(gain, +1) and stats.reproduced(tax, -1),
    }
  )
  for name in ("OnDARE", "OnTIES"):
    if name not in m:
      continue
    r, t = m[name]["vs_adamw"]["reward"], m[name]["vs_adamw"]["tax"]
    out.append(
      {
        "claim": f"Table 1: {name} gets a higher reward and a lower tax than AdamW",
        "evidence": f"reward {stats.fmt(r)} ({stats.verdict(r)}), tax {stats.fmt(t)} "
        f"({stats.verdict(t, higher_is_better=False)})",
        "reproduced": stats.reproduced(r, +1) and stats.reproduced(t, -1),
      }
    )
    if results.get("adamw_frontier"):
      c = frontier_lib.compare(results, m[name])
      gap = {
        k: stats.fmt(c[k]["diff"]) if c[k]["diff"] else _outside(results, c[k])
        for k in ("reward", "tax")
      }
      out.append(
        {
          "claim": f"Table 1 on AdamW's frontier: {name} lies above it (more reward than AdamW at its "
          "tax and less tax than AdamW at its reward)",
          "evidence": f"reward {gap['reward']}, tax {gap['tax']} (minus AdamW's on the frontier): "
          f"{c['verdict']}",
          "reproduced": c["verdict"] == "above AdamW's frontier",
        }
      )
  if "OnDARE" in m and "ChildTuning" in m:
    r, a = (
      _diff(m["OnDARE"], m["ChildTuning"], "reward"),
      _diff(m["OnDARE"], m["ChildTuning"], "benchmark_avg"),
    )
    out.append(
      {
        "claim": "The merge pull, not only the sparse update, helps: OnDARE beats ChildTuning "
        "(OnDARE with α = 0) on reward or benchmark average",
        "evidence": f"reward {stats.fmt(r)} ({stats.verdict(r)}), benchmark average {stats.fmt(a)} "
        f"({stats.verdict(a)}) (OnDARE − ChildTuning)",
        "reproduced": (stats.reproduced(r, +1) or stats.reproduced(a, +1))
        and not (stats.reproduced(r, -1) or stats.reproduced(a, -1)),
      }
    )
  sweeps = results.get("sweeps", {})
  if "reserve_p" in sweeps:
    drops = {}
    for method in ("OnDARE", "OnTIES"):
      rows = _rows(sweeps["reserve_p"], method)
      chosen = (
        m.get(method, {}).get("hparams", {}).get("reserve_p", results["config"].get("reserve_p"))
      )
      at = {r["value"]: r for r in rows}
      low = rows[0] if rows else None
      if low is None or chosen not in at:
        continue
      r = _diff(low, at[chosen], "reward")
      a = _diff(low, at[chosen], "benchmark_avg")
      if method == "OnDARE":
        within = all(abs(x) <= EQUIVALENCE_MARGIN for d in (r, a) for x in (d["lo"], d["hi"]))
        out.append(
          {
            "claim": f"Fig. 2: OnDARE is robust to the reserve rate down to p = {low['value']:g}",
            "evidence": f"p = {low['value']:g} minus p = {chosen:g}: reward {stats.fmt(r)}, benchmark "
            f"average {stats.fmt(a)} (robust = both intervals within ±{EQUIVALENCE_MARGIN:g})",
            "reproduced": within,
          }
        )
      drops[method] = (low, at[chosen])
    if len(drops) == 2:

      def change(method):
        low, ref = drops[method]
        return [
          x - y for x, y in zip(low["per_seed"]["reward"], ref["per_seed"]["reward"], strict=True)
        ]

      d = stats.paired(change("OnTIES"), change("OnDARE"))
      out.append(
        {
          "claim": "Fig. 2: OnTIES is more sensitive to a small reserve rate than OnDARE",
          "evidence": f"reward change at the smallest p, OnTIES minus OnDARE: {stats.fmt(d)}",
          "reproduced": stats.reproduced(d, -1),
        }
      )
  if "alpha" in sweeps:
    for method in ("OnDARE", "OnTIES"):
      rows = _rows(sweeps["alpha"], method)
      if len(rows) >= 2:
        a = _diff(rows[-1], rows[0], "benchmark_avg")
        out.append(
          {
            "claim": f"Table 2: a large merging weight collapses {method} "
            f"(α = {rows[-1]['value']:g} against α = {rows[0]['value']:g})",
            "evidence": f"benchmark average {stats.fmt(a)}, reward {stats.fmt(_diff(rows[-1], rows[0], 'reward'))}",
            "reproduced": stats.reproduced(a, -1),
          }
        )
  if "merge_every" in sweeps:
    for method in ("OnDARE", "OnTIES"):
      rows = _rows(sweeps["merge_every"], method)
      if len(rows) >= 2:
        r = _diff(rows[-1], rows[0], "reward")
        out.append(
          {
            "claim": f"Fig. 3: a larger merge interval K lowers {method}'s reward "
            f"(K = {rows[-1]['value']:g} against K = {rows[0]['value']:g})",
            "evidence": f"reward {stats.fmt(r)}, tax {stats.fmt(_diff(rows[-1], rows[0], 'tax'))}",
            "reproduced": stats.reproduced(r, -1),
          }
        )
  for alg, rows in (results.get("algorithms") or {}).items():
    if alg not in PAPER_ALGORITHMS:
      continue  # GRPO is this testbed's addition: its rows are in the table, not among the paper's claims
    for name in ("OnDARE", "OnTIES"):
      if name in rows:
        r, t = rows[name]["vs_adamw"]["reward"], rows[name]["vs_adamw"]["tax"]
        out.append(
          {
            "claim": f"Table 3, {alg.upper()}: {name} gets a higher reward and a lower tax than AdamW",
            "evidence": f"reward {stats.fmt(r)} ({stats.verdict(r)}), tax {stats.fmt(t)} "
            f"({stats.verdict(t, higher_is_better=False)})",
            "reproduced": stats.reproduced(r, +1) and stats.reproduced(t, -1),
          }
        )
  return out


def intervals_md(results: dict) -> str:
  """With one seed: which runs give intervals, and what they cost; nothing with several seeds."""
  if len(results["config"]["seeds"]) >= 2:
    return ""
  minutes = results.get("wall_time_s", 0.0) / 60
  return (
    "One seed gives point estimates only: an interval, and so a verdict, needs two seeds or more. "
    f"`python -m experiments.alignment_tax --preset paper` runs {len(config_lib.PRESETS['paper'].seeds)} seeds "
    "of every method, sweep and algorithm "
    f"(the run behind docs/RESULTS.md, on {config_lib.PAPER_RUN_SEEDS} seeds, took "
    f"{config_lib.PAPER_RUN_MINUTES:g} min on 2 CPU cores); this "
    f"run's command with `'seeds=(0,1,2)'` added runs it on 3 seeds, about three times its {minutes:.1f} min "
    "(each seed trains its own base and SFT models).\n"
  )


def claims_md(results: dict) -> str:
  n = len(results["config"]["seeds"])
  lines = "".join(
    f"- {c['claim']}: {c['evidence']}: **{_verdict(c['reproduced'], n)}**.\n"
    for c in claims(results)
  )
  hint = intervals_md(results)
  return lines + ("\n" + hint if hint else "")


def common_lr_md(results: dict) -> str:
  """Every method beside AdamW at the common learning rate (`learning_rates.common_scale`), or why there is none."""
  common = results.get("common_lr") or {}
  if not common:
    return ""
  if common["lr_scale"] is None:
    return (
      f"No common learning rate: {common['reason']}. Nothing is extrapolated: a band AdamW's search "
      "does not reach needs a search that does.\n"
    )
  lr = results["config"]["pref_lr"] * common["lr_scale"]
  lines = [
    f"At lr {lr:.2g} (`pref_lr` × {common['lr_scale']:g}): {common['reason']}.",
    "",
    f"| Method | {SHORT_HEAD} | Setting |",
    "|---|---|---|---|---|---|---|",
  ]
  lines += [
    f"| {name} | {_short(row)} | {_hp(row['hparams'])} |" for name, row in common["methods"].items()
  ]
  return "\n".join(lines) + "\n"


def claims_over_lr(results: dict) -> list[dict]:
  """The verdict of each claim of `claims` at every learning rate of the ``lr_sweep``.

  At each rate the claims read the methods and sweeps run there (with the SFT
  model and AdamW's frontier of the run); Table 3's claims are not among them:
  the algorithms run at the selected settings only.

  Returns:
    One item per claim: ``claim``, ``verdicts`` (one per learning rate, as in
    `claims_md`) and ``robustness`` (`learning_rates.robustness`).
  """
  sweep = results.get("lr_sweep") or {}
  n = len(results["config"]["seeds"])
  by_lr = []
  for at in sweep.get("at", ()):
    view = dict(
      results,
      methods={"SFT": results["methods"]["SFT"], **at["methods"]},
      sweeps=at["sweeps"],
      algorithms={},
    )
    by_lr.append({c["claim"]: _verdict(c["reproduced"], n) for c in claims(view)})
  if not by_lr:
    return []
  return [
    {
      "claim": claim,
      "verdicts": [v[claim] for v in by_lr],
      "robustness": learning_rates.robustness([v[claim] for v in by_lr]),
    }
    for claim in by_lr[0]
  ]


def claims_over_lr_md(results: dict) -> str:
  """`claims_over_lr` as a table: a column per learning rate (with AdamW's tax there), then the robustness."""
  sweep = results.get("lr_sweep") or {}
  if not sweep:
    return ""
  cols = [
    f"lr {sweep['pref_lr'] * at['lr_scale']:.2g} (× {at['lr_scale']:g}; AdamW tax "
    f"{at['methods']['AdamW']['tax']:.1f})"
    for at in sweep["at"]
  ]
  lines = [
    "| Claim | " + " | ".join(cols) + " | Across learning rates |",
    "|---|" + "---|" * (len(cols) + 1),
  ]
  lines += [
    f"| {c['claim']} | " + " | ".join(c["verdicts"]) + f" | **{c['robustness']}** |"
    for c in claims_over_lr(results)
  ]
  return "\n".join(lines) + "\n"


def stages_md(results: dict) -> str:
  """Base (raw format) and SFT (chat format) exact match per skill, mean ± std over seeds."""
  stages = results.get("stages") or {}
  if not stages:
    return ""
  skills = results["config"]["skills"]
  lines = ["| Model | " + " | ".join(skills) + " | Reward |", "|---|" + "---|" * (len(skills) + 1)]
  for name, row in stages.items():
    cells = [f"{row['skills'][s]:.1f} ± {row['std']['skills'][s]:.1f}" for s in skills]
    reward = f"{row['reward']:.1f}" if "reward" in row else "—"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {reward} |")
  return "\n".join(lines) + "\n"


def supported_md(results: dict) -> str:
  """Which of the paper's claims the run supports, read off `claims`."""
  items = claims(results)
  if len(results["config"]["seeds"]) < 2:
    return (
      f"With 1 seed no claim is decided: all {len(items)} read undetermined (1 seed); the point estimates "
      "are in the tables above.\n"
    )
  yes = [c["claim"] for c in items if c["reproduced"]]
  no = [c["claim"] for c in items if not c["reproduced"]]
  return (
    f"{len(yes)} of {len(items)} claims reproduced (the interval excludes zero in the paper's "
    "direction).\n\n"
    + "".join(f"- supported: {c}\n" for c in yes)
    + "".join(f"- not supported: {c}\n" for c in no)
  )


def command(cfg: dict) -> str:
  """The shell command that reruns a run of config ``cfg``: its preset plus the fields it overrides."""
  tupled = lambda v: tuple(map(tupled, v)) if isinstance(v, list) else v
  preset = config_lib.PRESETS.get(cfg["name"], config_lib.Config()).to_json()
  overrides = [
    shlex.quote(f"{k}={tupled(v)!r}".replace(" ", "")) for k, v in cfg.items() if preset.get(k) != v
  ]
  return " ".join(["python -m experiments.alignment_tax --preset", cfg["name"]] + overrides)


def results_md(results: dict, figure_dir: str) -> str:
  """The text of ``docs/RESULTS.md``; ``figure_dir`` is where its figure links point."""
  cfg = results["config"]
  minutes = results.get("wall_time_s", 0.0) / 60
  n = len(cfg["seeds"])
  parts = [
    "# Results: the alignment-tax testbed",
    "",
    "Generated by `python -m experiments.alignment_tax.report` from the `results.json` of "
    f"`{command(cfg)}` "
    f"(seeds {', '.join(map(str, cfg['seeds']))}; wall time {minutes:.1f} min, with "
    f"{results.get('cached_stages', 0)} of {2 * n} base/SFT stages"
    + (f" and {results['cached_runs']} preference runs" if results.get("cached_runs") else "")
    + " loaded from the cache). "
    "No number here is typed by hand. "
    "Scores are in points (0-100): reward = share of sampled generations on held-out preference "
    "prompts that are styled *and* correct, skills = greedy exact match, tax = SFT benchmark average "
    "minus the method's (also split into the skills in the preference data and the others). "
    f"Every Δ is the mean of the {n} paired per-seed differences (same seed, same base and SFT "
    f"models) with its 95 % Student-t interval in brackets; a verdict reads the interval: "
    "better / worse only when it excludes zero (with one seed there is none, and every verdict reads "
    "undetermined). How to run and what the stages are: "
    f"`docs/experiments.md`. The run's `results.json` and figures are in `{figure_dir}/`.",
    "",
    "Run: "
    + ", ".join(
      f"{k}={cfg[k]}"
      for k in (
        "d_model",
        "n_layers",
        "base_steps",
        "sft_steps",
        "pref_steps",
        "pref_lr",
        "beta",
        "algorithm",
        "reserve_p",
        "alpha",
      )
    )
    + "; sweeps: "
    + (", ".join(f"{s[0]} {tuple(s[3])}" for s in cfg["sweeps"]) or "none")
    + "; extra algorithms: "
    + (", ".join(cfg["algorithms"]) or "none")
    + ".",
    "",
    "## The models before preference training",
    "",
    stages_md(results),
    "## The regime: the paper's dimensionless numbers",
    "",
    "At each merge's selected setting (peak learning rate; `methods.regime` defines them):",
    "",
    regime_md(results),
    "## Table 1: methods at equal budget",
    "",
    "Every method searched the same three learning rates and was selected by the same rule on "
    "validation prompts (`runner.selection_score`: reward plus the sum of the skill accuracies).",
    "",
    table_md(results),
    f"![Pareto]({figure_dir}/pareto.png)",
    "",
    "Left: every point; right: the box the methods other than the offline merges occupy. "
    + (
      "Bars: std over seeds of each score; a seed's SFT model moves every method's score together, so "
      "overlapping bars do not make two methods indistinguishable: the paired Δs decide. "
      if n >= 2
      else ""
    )
    + "AdamW at each learning rate of its search (times `pref_lr`), evaluated along the run "
    "(the frontier on the figure):",
    "",
    frontier_md(results),
    "## Table 1 against AdamW's frontier",
    "",
    "Each method seed by seed against that seed's AdamW frontier (`frontier.py`): the Pareto envelope of "
    f"the {len(results.get('adamw_frontier') or [])} AdamW runs and checkpoints above and the SFT model, "
    "joined by straight segments. AdamW's reward at the method's tax and AdamW's tax at the method's reward "
    "are read off it, and each Δ is the method minus AdamW. Above the frontier means more reward at the "
    "same tax and less tax at the same reward: every reading inside the frontier's range excludes zero on "
    "that side. No extrapolation: where a method's tax (or reward) lies beyond the frontier's ends on a "
    "seed, that reading says outside and the verdict rests on the other one. The envelope keeps the best "
    "of AdamW's points on each seed, so a method is compared with AdamW's luckiest checkpoints.",
    "",
    frontier_verdicts_md(results),
    "## The paper's claims, with intervals",
    "",
    claims_md(results),
    "## What this testbed supports",
    "",
    supported_md(results),
  ]
  if results.get("common_lr"):
    parts += [
      "## Every method at one learning rate where AdamW pays a tax",
      "",
      "At the selected settings AdamW may pay little tax, and then there is little to mitigate. Here every "
      "method runs at one learning rate, chosen from AdamW's runs alone before any other method trained "
      f"(`learning_rates.common_scale`: {learning_rates.RULE}; "
      f"band {'–'.join(f'{b:g}' for b in results['common_lr']['band'])} points), with "
      "its other settings as selected (an offline merge: its selected weight and density, merging AdamW "
      "at that learning rate). Each Δ is paired with AdamW at the same learning rate.",
      "",
      common_lr_md(results),
    ]
  if results.get("lr_sweep"):
    parts += [
      "## The claims across learning rates",
      "",
      "Each claim re-read with every method at each learning rate of AdamW's search, its other settings "
      "as selected, and the sweeps' values that the claims compare repeated there (`learning_rates`). "
      "A claim is stable only when its verdict is the same at every learning rate. Table 3's claims are "
      "read at the selected settings only.",
      "",
      claims_over_lr_md(results),
    ]
  if results.get("algorithms"):
    names = ", ".join(a.upper() for a in results["algorithms"])
    parts += [f"## Table 3: {names}", "", algorithms_md(results)]
  for name, sweep in results.get("sweeps", {}).items():
    parts += [
      f"## Sweep: {name}",
      "",
      sweep_md(name, sweep),
      f"![{name}]({figure_dir}/sweep_{name}.png)",
      "",
    ]
  return "\n".join(parts) + "\n"


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    raise SystemExit("usage: python -m experiments.alignment_tax.report RESULTS_JSON [OUT_MD]")
  with open(argv[0]) as f:
    results = json.load(f)
  out = argv[1] if len(argv) > 1 else "docs/RESULTS.md"
  figure_dir = os.path.join(os.path.dirname(os.path.abspath(out)), "figures")
  os.makedirs(figure_dir, exist_ok=True)
  if os.path.dirname(os.path.abspath(argv[0])) != figure_dir:
    shutil.copy(argv[0], figure_dir)
  write_figures(results, figure_dir)
  with open(out, "w") as f:
    f.write(results_md(results, "figures"))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
