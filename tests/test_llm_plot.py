"""``python -m experiments.llm_dpo.plot`` draws runs' metrics.jsonl (the keys a DPO run writes)."""

import json

import numpy as np
import pytest

from experiments.llm_dpo import plot


def write_run(folder, merge: bool):
  records = []
  for step in (1, 2, 3):
    values = {
      "loss": 0.7 - 0.1 * step,
      "rewards/accuracy": 0.2 * step,
      "rewards/margin": 0.05 * step,
    }
    if merge:
      values |= {
        "merge/kept_fraction": 0.5,
        "merge/sign_agreement": 0.9,
        "merge/update_norm": 1.0 + step,
        "merge/merged_norm": 2.0,
        "merge/merged": 1.0,
      }
    records += [{"name": f"dpo/train/{n}", "value": v, "step": step} for n, v in values.items()]
  records += [
    {"name": "dpo/eval/rewards/accuracy", "value": v, "step": s}
    for s, v in ((0, 0.5), (3, 0.75), (3, 1.0))
  ]  # step 3 logged again: the last wins
  records += [
    {"name": f"dpo/eval/{n}", "value": 0.1, "step": s}
    for s in (0, 3)
    for n in ("loss", "rewards/margin")
  ]
  folder.mkdir()
  (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_draws_several_runs_into_a_png(tmp_path):
  write_run(tmp_path / "ondare", merge=True)
  write_run(tmp_path / "adamw", merge=False)
  out = tmp_path / "figs" / "dpo.png"
  drawn = plot.main([str(tmp_path / "ondare"), str(tmp_path / "adamw"), "--out", str(out)])
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  accuracy = {label: (steps, values) for label, steps, values in drawn["reward accuracy"]}
  assert accuracy["ondare held-out"] == ([0, 3], [0.5, 1.0])
  np.testing.assert_allclose(accuracy["adamw"][1], [0.2, 0.4, 0.6])
  assert [label for label, _, _ in drawn["merge: norms"]] == ["ondare update", "ondare merged"]
  assert drawn["merge: norms"][0][2] == [2.0, 3.0, 4.0]
  assert [label for label, _, _ in drawn["DPO loss"]] == [
    "ondare",
    "ondare held-out",
    "adamw",
    "adamw held-out",
  ]


def test_plot_names_a_folder_without_metrics(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
