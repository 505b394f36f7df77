"""Draw the ``metrics.jsonl`` of one or several DPO runs into a PNG.

    python -m experiments.llm_dpo.plot runs/adamw runs/ondare runs/onties --out runs/dpo.png

Panels: DPO loss, reward accuracy and reward margin (train: lines, held-out:
dashed with markers), and the merge statistics of `omerge_jax.merge_stats`
(kept fraction, sign agreement, norms of the update and of the merged
update); runs with AdamW have no merge statistics. Each run has one colour,
labelled with its folder name. A resumed run's metrics continue in the same
file; a step logged twice keeps its last value.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib

from experiments.llm_dpo.train import PREFIX

# (title, [(metric name under PREFIX/<mode>/, label suffix)], modes)
PANELS = [
  ("DPO loss", [("loss", "")], ("train", "eval")),
  ("reward accuracy", [("rewards/accuracy", "")], ("train", "eval")),
  ("reward margin", [("rewards/margin", "")], ("train", "eval")),
  ("merge: kept fraction", [("merge/kept_fraction", "")], ("train",)),
  ("merge: sign agreement", [("merge/sign_agreement", "")], ("train",)),
  (
    "merge: norms",
    [("merge/update_norm", " update"), ("merge/merged_norm", " merged")],
    ("train",),
  ),
]


def read_metrics(run) -> dict[str, dict[int, float]]:
  """``OUT/metrics.jsonl`` -> metric name -> {step: value} (a step's last value)."""
  path = pathlib.Path(run) / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{run} has no metrics.jsonl: expected the --out of a DPO run")
  metrics = collections.defaultdict(dict)
  for line in path.read_text().splitlines():
    if line.strip():
      record = json.loads(line)
      metrics[record["name"]][record["step"]] = record["value"]
  return dict(metrics)


def plot(runs, out) -> dict[str, list[tuple[str, list[int], list[float]]]]:
  """Draw ``runs`` into the PNG ``out``.

  Returns:
    panel title -> the lines drawn, each ``(label, steps, values)``.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(2, 3, figsize=(15, 8))
  drawn = {title: [] for title, _, _ in PANELS}
  for i, run in enumerate(runs):
    metrics, colour = read_metrics(run), f"C{i}"
    for ax, (title, names, modes) in zip(axes.flat, PANELS, strict=True):
      for name, suffix in names:
        for mode in modes:
          series = metrics.get(f"{PREFIX}/{mode}/{name}")
          if not series:
            continue
          steps = sorted(series)
          values = [series[s] for s in steps]
          held_out = mode == "eval"
          label = f"{pathlib.Path(run).name}{suffix}" + (" held-out" if held_out else "")
          ax.plot(
            steps,
            values,
            color=colour,
            label=label,
            linestyle="--" if held_out else "-",
            marker="o" if held_out else None,
            alpha=0.6 if suffix == " merged" else 1.0,
          )
          drawn[title].append((label, steps, values))
  for ax, (title, _, _) in zip(axes.flat, PANELS, strict=True):
    ax.set_title(title)
    ax.set_xlabel("step")
    if drawn[title]:
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "no merge statistics (AdamW)", ha="center", transform=ax.transAxes)
  fig.tight_layout()
  pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return drawn


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs", nargs="+", help="--out folders of DPO runs")
  p.add_argument("--out", required=True, help="PNG to write")
  args = p.parse_args(argv)
  drawn = plot(args.runs, args.out)
  print(f"wrote {args.out} ({sum(map(len, drawn.values()))} lines from {len(args.runs)} runs)")
  return drawn


if __name__ == "__main__":
  main()
