"""Turn a ``results.json`` into the table, the figures and ``docs/RESULTS.md``.

Every number written here is read from the results: run
``python -m experiments.alignment_tax.report RESULTS_JSON [OUT_MD]`` to
regenerate ``docs/RESULTS.md`` from a ``paper`` run. The run's
``results.json`` and figures are copied to ``figures/`` beside ``OUT_MD``, so
the document and the numbers it was made from are versioned together.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _cell(row, key, seeds):
  value = row[key]
  if seeds > 1:
    return f"{value:.1f} ± {row['std'][key]:.1f}"
  return f"{value:.1f}"


def _hp(hp):
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items()) or "—"


def table_md(results: dict) -> str:
  """The paper's Table 1 layout: one row per method, reward, skills, average, tax."""
  seeds = len(results["config"]["seeds"])
  skills = results["config"]["skills"]
  head = ["Method", "Reward", *skills, "Benchmark avg", "Tax", "Impl. acc", "Setting"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, row in results["methods"].items():
    cells = [name, _cell(row, "reward", seeds)]
    cells += [f"{row['skills'][s]:.1f}" for s in skills]
    cells += [_cell(row, "benchmark_avg", seeds), _cell(row, "tax", seeds)]
    cells += [f"{row['implicit_acc']:.1f}" if "implicit_acc" in row else "—", _hp(row.get("hparams", {}))]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def algorithms_md(results: dict) -> str:
  """Table 3's layout: reward / benchmark_avg / tax per algorithm and method."""
  algs = results.get("algorithms") or {}
  if not algs:
    return ""
  lines = ["| Algorithm | Method | Reward | Benchmark avg | Tax |", "|---|---|---|---|---|"]
  for alg, rows in algs.items():
    for method, row in rows.items():
      lines.append(f"| {alg.upper()} | {method} | {row['reward']:.1f} | {row['benchmark_avg']:.1f} | {row['tax']:.1f} |")
  return "\n".join(lines) + "\n"


def sweep_md(name: str, sweep: dict) -> str:
  lines = [f"| Method | {sweep['param']} | Reward | Benchmark avg | Tax |", "|---|---|---|---|---|"]
  for r in sweep["rows"]:
    lines.append(f"| {r['method']} | {r['value']:g} | {r['reward']:.1f} | {r['benchmark_avg']:.1f} | {r['tax']:.1f} |")
  return "\n".join(lines) + "\n"


def pareto_figure(results: dict, path: str) -> None:
  """Reward against benchmark average: every method, and the offline linear-merge curve."""
  fig, ax = plt.subplots(figsize=(8, 4.5))
  curve = results.get("offline_curve") or []
  if curve:
    sft, adamw = results["methods"]["SFT"], results["methods"].get("AdamW")
    points = [(sft["benchmark_avg"], sft["reward"])] + [(c["benchmark_avg"], c["reward"]) for c in curve]
    if adamw is not None:
      points.append((adamw["benchmark_avg"], adamw["reward"]))
    ax.plot(*zip(*points), "--", color="grey", label="offline linear merge (SFT→AdamW)")
  # More methods than a default colour cycle: pair 20 colours with markers.
  colors, markers = plt.get_cmap("tab20").colors, "osD^v<p"
  for i, (name, row) in enumerate(results["methods"].items()):
    ax.errorbar(row["benchmark_avg"], row["reward"], xerr=row["std"]["benchmark_avg"],
                yerr=row["std"]["reward"], fmt=markers[i % len(markers)], color=colors[(2 * i + i // 10) % 20],
                capsize=2, label=name)
  ax.set_xlabel("benchmark average (exact match, %)")
  ax.set_ylabel("gold reward (style score, %)")
  ax.set_title(f"Reward vs alignment tax ({results['config']['name']} preset)")
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def sweep_figure(name: str, sweep: dict, path: str) -> None:
  """Reward and benchmark average against the swept parameter, one line per method."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  methods = sorted({r["method"] for r in sweep["rows"]}, key=[r["method"] for r in sweep["rows"]].index)
  values = [r["value"] for r in sweep["rows"]]
  log = min(values) > 0 and max(values) / min(values) >= 100
  for method in methods:
    rows = [r for r in sweep["rows"] if r["method"] == method]
    xs = [r["value"] for r in rows]
    for ax, key in zip(axes, ("reward", "benchmark_avg")):
      ax.errorbar(xs, [r[key] for r in rows], yerr=[r["std"][key] for r in rows], marker="o", capsize=2, label=method)
  for ax, label in zip(axes, ("gold reward (%)", "benchmark average (%)")):
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
  if results.get("algorithms"):
    text += "\n" + algorithms_md(results)
  for name, sweep in results.get("sweeps", {}).items():
    text += f"\nSweep `{name}`:\n\n" + sweep_md(name, sweep)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text)
  figures = [os.path.join(out_dir, "pareto.png")]
  pareto_figure(results, figures[0])
  for name, sweep in results.get("sweeps", {}).items():
    figures.append(os.path.join(out_dir, f"sweep_{name}.png"))
    sweep_figure(name, sweep, figures[-1])
  return figures


def _verdict(ok: bool) -> str:
  return "**reproduced**" if ok else "**not reproduced**"


def claims(results: dict) -> list[str]:
  """Each of the paper's claims checked against the results, with the numbers."""
  m = results["methods"]
  out = []
  sft, adamw = m["SFT"], m.get("AdamW")
  if adamw is None:
    return out
  out.append(
      f"- Alignment tax (the testbed works): AdamW raises the reward {sft['reward']:.1f} → "
      f"{adamw['reward']:.1f} and pays a tax of {adamw['tax']:.1f} points "
      f"({sft['benchmark_avg']:.1f} → {adamw['benchmark_avg']:.1f}): "
      f"{_verdict(adamw['reward'] > sft['reward'] and adamw['tax'] >= 3)}.")
  baselines = [k for k in m if k not in ("SFT", "OnDARE", "OnTIES") and "step-K" not in k]
  for name in ("OnDARE", "OnTIES"):
    if name not in m:
      continue
    r = m[name]
    out.append(
        f"- {name} vs AdamW (Table 1): reward {r['reward']:.1f} vs {adamw['reward']:.1f}, tax "
        f"{r['tax']:.1f} vs {adamw['tax']:.1f}; higher reward AND lower tax: "
        f"{_verdict(r['reward'] > adamw['reward'] and r['tax'] < adamw['tax'])}.")
    score = r["reward"] + r["benchmark_avg"]
    beaten = [b for b in baselines if m[b]["reward"] + m[b]["benchmark_avg"] > score]
    out.append(
        f"- {name} has the best reward + benchmark_avg ({score:.1f}) of all baselines: "
        f"{_verdict(not beaten)}" + (f" (beaten by {', '.join(beaten)})." if beaten else "."))
  curve = [(sft["benchmark_avg"], sft["reward"])] + [(c["benchmark_avg"], c["reward"]) for c in results.get("offline_curve") or []]
  curve = sorted(curve + [(adamw["benchmark_avg"], adamw["reward"])])
  for name in ("OnDARE", "OnTIES"):
    if name in m and len(curve) > 2 and curve[0][0] <= m[name]["benchmark_avg"] <= curve[-1][0]:
      x = m[name]["benchmark_avg"]
      (x0, y0), (x1, y1) = next((a, b) for a, b in zip(curve, curve[1:]) if a[0] <= x <= b[0])
      on_curve = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
      out.append(
          f"- {name} above the offline linear-merge curve (SFT → AdamW) at its benchmark_avg {x:.1f}: "
          f"reward {m[name]['reward']:.1f} vs {on_curve:.1f} on the curve: {_verdict(m[name]['reward'] > on_curve)}.")
  sweeps = results.get("sweeps", {})
  if "reserve_p" in sweeps:
    for method in ("OnDARE", "OnTIES"):
      rows = [r for r in sweeps["reserve_p"]["rows"] if r["method"] == method]
      if rows:
        spread = max(r["benchmark_avg"] for r in rows) - min(r["benchmark_avg"] for r in rows)
        rspread = max(r["reward"] for r in rows) - min(r["reward"] for r in rows)
        out.append(
            f"- Fig. 2, {method} robust to the reserve rate p in "
            f"{min(r['value'] for r in rows):g}..{max(r['value'] for r in rows):g}: benchmark_avg spans "
            f"{spread:.1f} points, reward {rspread:.1f} points: {_verdict(spread < 5 and rspread < 10)} "
            f"(robust = both spans under 5 / 10 points).")
  if "alpha" in sweeps:
    for method in ("OnDARE", "OnTIES"):
      rows = sorted((r for r in sweeps["alpha"]["rows"] if r["method"] == method), key=lambda r: r["value"])
      if len(rows) >= 2:
        out.append(
            f"- Table 2, {method}: the largest alpha ({rows[-1]['value']:g}) costs skills against the "
            f"smallest ({rows[0]['value']:g}): benchmark_avg {rows[-1]['benchmark_avg']:.1f} vs "
            f"{rows[0]['benchmark_avg']:.1f}, reward {rows[-1]['reward']:.1f} vs {rows[0]['reward']:.1f}: "
            f"{_verdict(rows[-1]['reward'] + rows[-1]['benchmark_avg'] < max(r['reward'] + r['benchmark_avg'] for r in rows) - 5)} "
            f"(reproduced = reward+avg at the largest alpha > 5 points below the best).")
  if "merge_every" in sweeps:
    for method in ("OnDARE", "OnTIES"):
      rows = sorted((r for r in sweeps["merge_every"]["rows"] if r["method"] == method), key=lambda r: r["value"])
      if len(rows) >= 2:
        out.append(
            f"- Fig. 3, {method}: step-K drifts toward AdamW as K grows: tax at K={rows[0]['value']:g} "
            f"{rows[0]['tax']:.1f}, at K={rows[-1]['value']:g} {rows[-1]['tax']:.1f} (AdamW {adamw['tax']:.1f}): "
            f"{_verdict(abs(rows[-1]['tax'] - adamw['tax']) < abs(rows[0]['tax'] - adamw['tax']))}.")
  if "beta" in sweeps:
    rows = sweeps["beta"]["rows"]
    small = min(r["value"] for r in rows)
    pair = {r["method"]: r for r in rows if r["value"] == small}
    if "AdamW" in pair and "OnTIES" in pair:
      a, o = pair["AdamW"], pair["OnTIES"]
      out.append(
          f"- Fig. 4, complementary to a small DPO beta ({small:g}): OnTIES reward {o['reward']:.1f}, "
          f"benchmark_avg {o['benchmark_avg']:.1f} vs AdamW {a['reward']:.1f}, {a['benchmark_avg']:.1f}: "
          f"{_verdict(o['reward'] + o['benchmark_avg'] > a['reward'] + a['benchmark_avg'])} "
          f"(reproduced = higher reward + benchmark_avg).")
  for alg, rows in (results.get("algorithms") or {}).items():
    a = rows.get("AdamW")
    for name in ("OnDARE", "OnTIES"):
      if a and name in rows:
        r = rows[name]
        out.append(
            f"- Table 3, {alg.upper()}, {name} vs AdamW: reward {r['reward']:.1f} vs {a['reward']:.1f}, "
            f"tax {r['tax']:.1f} vs {a['tax']:.1f}: "
            f"{_verdict(r['reward'] + r['benchmark_avg'] > a['reward'] + a['benchmark_avg'])} "
            f"(reproduced = higher reward + benchmark_avg).")
  return out


def results_md(results: dict, figure_dir: str) -> str:
  """The text of ``docs/RESULTS.md``; ``figure_dir`` is where its figure links point."""
  cfg = results["config"]
  minutes = results.get("wall_time_s", 0.0) / 60
  parts = [
      "# Results: the alignment-tax testbed",
      "",
      "Generated by `python -m experiments.alignment_tax.report` from the `results.json` of "
      f"`python -m experiments.alignment_tax --preset {cfg['name']}` "
      f"(seeds {', '.join(map(str, cfg['seeds']))}; wall time {minutes:.1f} min, with "
      f"{results.get('cached_stages', 0)} of {2 * len(cfg['seeds'])} base/SFT stages loaded from the cache). "
      "No number here is typed by hand. "
      "Scores are in points (0-100): reward = gold style score of sampled generations on held-out "
      "prompts, skills = greedy exact match, tax = SFT benchmark average minus the method's; "
      "± is the std over seeds. How to run and what the stages are: `docs/experiments.md`. "
      f"The run's `results.json` and figures are in `{figure_dir}/`.",
      "",
      "Run: " + ", ".join(f"{k}={cfg[k]}" for k in ("d_model", "n_layers", "base_steps", "sft_steps", "pref_steps",
                                                   "pref_lr", "beta", "algorithm")) + "; sweeps: "
      + (", ".join(f"{s[0]} {tuple(s[3])}" for s in cfg["sweeps"]) or "none")
      + "; extra algorithms: " + (", ".join(cfg["algorithms"]) or "none") + ".",
      "",
      "## Table 1: methods at equal budget",
      "",
      table_md(results),
      f"![Pareto]({figure_dir}/pareto.png)",
      "",
      "## The paper's claims at this scale",
      "",
      *claims(results),
      "",
  ]
  if results.get("algorithms"):
    parts += ["## Table 3: DPO, IPO, KTO", "", algorithms_md(results)]
  for name, sweep in results.get("sweeps", {}).items():
    parts += [f"## Sweep: {name}", "", sweep_md(name, sweep), f"![{name}]({figure_dir}/sweep_{name}.png)", ""]
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
  run_dir = os.path.dirname(os.path.abspath(argv[0]))
  for path in [os.path.abspath(argv[0])] + sorted(glob.glob(os.path.join(run_dir, "*.png"))):
    if os.path.dirname(path) != figure_dir:
      shutil.copy(path, figure_dir)
  with open(out, "w") as f:
    f.write(results_md(results, "figures"))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
