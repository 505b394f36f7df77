"""Preemption, on purpose: SIGKILL a training command at chosen moments, restart it, compare.

    python -m experiments.llm_dpo.preemption --out /tmp/soak     # the soak (about 5 minutes)

`run` starts a command (`experiments.llm_dpo`, `experiments.llm_grpo`) and
kills it with SIGKILL, which no handler sees, either right after it prints a
step or while Orbax writes a checkpoint step; restarted with the same command
line, the run resumes from its last complete checkpoint. `metrics` reads the
run's metrics file and checks that every repeated entry (the steps a restart
trains again) equals the first bit for bit. `tests/test_preemption.py` uses
them on a few steps; the soak trains the tiny Qwen2 model for 2,000 DPO steps
killed every few hundred (seeded), and compares the final policy, byte for
byte, and every metric with an uninterrupted run; its result goes to
docs/guarantees.md with its date and machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import threading
import time

import numpy as np

AFTER_STEP, IN_SAVE = "after step", "inside the save of step"


def saving(checkpoints: pathlib.Path, step: int) -> bool:
  """Whether Orbax is writing ``step`` under ``checkpoints`` (its temporary folder exists)."""
  try:
    return any(e.name.startswith(f"{step}.") and "tmp" in e.name for e in os.scandir(checkpoints))
  except FileNotFoundError:
    return False


def run(argv, checkpoints: pathlib.Path | None, moment=None, **popen):
  """Run ``argv``; SIGKILL it at ``moment``, or let it end (``moment`` None).

  ``moment`` is ``(AFTER_STEP | IN_SAVE, step)`` (Orbax checkpoints under
  ``checkpoints``) or a predicate, polled every half millisecond, that says
  when (e.g. once a cache holds so many files).

  Returns ``(killed, returncode, output)``.
  """
  proc = subprocess.Popen(
    argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
  )
  lines, killed = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if (
        isinstance(moment, tuple)
        and moment[0] == AFTER_STEP
        and line.startswith(f"step {moment[1]:5d} ")
      ):
        proc.send_signal(signal.SIGKILL)
        killed.set()

  reader = threading.Thread(target=read)
  reader.start()
  due = (
    moment
    if callable(moment)
    else ((lambda: saving(checkpoints, moment[1])) if moment and moment[0] == IN_SAVE else None)
  )
  if due is not None:
    while proc.poll() is None and not due():
      time.sleep(0.0005)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      killed.set()
  proc.wait()
  reader.join()
  return killed.is_set(), proc.returncode, "".join(lines)


def metrics(path) -> dict:
  """``{(name, step): value}`` of a metrics file; a repeated entry must equal the first."""
  out = {}
  for line in open(path):
    r = json.loads(line)
    key = (r["name"], r["step"])
    if out.setdefault(key, r["value"]) != r["value"]:
      raise AssertionError(f"{key} logged as {out[key]!r} and then {r['value']!r}")
  return out


def compare(straight: pathlib.Path, killed: pathlib.Path) -> dict:
  """The killed run's policy and metrics against the uninterrupted run's (``--out`` folders)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  a, b = (load_file(p / "hf" / "model.safetensors") for p in (straight, killed))
  want, got = metrics(straight / "metrics.jsonl"), metrics(killed / "metrics.jsonl")
  return {
    "tensors": len(a),
    "tensors_differing": sorted(k for k in a if k not in b or not np.array_equal(a[k], b[k])),
    "metrics": len(want),
    "metrics_differing": sorted(str(k) for k in want if got.get(k) != want[k]),
    # A resumed run also evaluates when it starts: the only entries the other lacks.
    "extra_metrics_not_eval": sorted(
      str(k) for k in got.keys() - want.keys() if "/eval/" not in k[0]
    ),
  }


def kill_moments(rng, steps: int, save_every: int, kill_every: int) -> list:
  """Moments about every ``kill_every`` steps, half of them inside a save; each after the last.

  Each is past the step of the one before, so the restarted run (back at its
  last complete checkpoint) still has it ahead.
  """
  moments, at, last = [], 0, 0
  while True:
    at += int(rng.integers(kill_every // 2, 3 * kill_every // 2))
    if at >= steps:
      return moments
    save = at // save_every * save_every
    moments.append((IN_SAVE, save) if rng.random() < 0.5 and save > last else (AFTER_STEP, at))
    last = moments[-1][1]


def soak(out: pathlib.Path, steps: int, save_every: int, kill_every: int, seed: int) -> dict:
  """The tiny DPO run, uninterrupted and killed about every ``kill_every`` steps."""
  from experiments.llm_dpo import tiny  # pylint: disable=g-import-not-at-top

  tiny.write_all(out / "data", "qwen2", n_pairs=256, layers=1)
  command = lambda name: [
    sys.executable,
    "-m",
    "experiments.llm_dpo",
    f"--base={out}/data/base",
    f"--sft={out}/data/sft",
    f"--data={out}/data/prefs.jsonl",
    "--optimizer=ondare",
    f"--steps={steps}",
    f"--save-every={save_every}",
    "--warmup=10",
    "--lr=1e-3",
    "--alpha=0.01",
    "--reserve-p=0.5",
    "--batch-size=4",
    "--max-prompt-length=32",
    "--max-response-length=24",
    "--eval-fraction=0.25",
    f"--eval-every={save_every * 5}",
    "--export-dtype=float32",
    f"--out={out / name}",
    f"--export={out / name}/hf",
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  start = time.time()
  killed, code, output = run(command("straight"), out / "straight" / "checkpoints", env=env)
  if code:
    raise RuntimeError(output[-3000:])
  straight_s = time.time() - start
  moments = kill_moments(np.random.default_rng(seed), steps, save_every, kill_every)
  record, start = [], time.time()
  for moment in moments + [None]:
    killed, code, output = run(command("killed"), out / "killed" / "checkpoints", moment, env=env)
    record.append({"moment": moment, "killed": killed, "exit": code})
    if moment is None and code:
      raise RuntimeError(output[-3000:])
  return {
    "steps": steps,
    "save_every": save_every,
    "seed": seed,
    "kills": record,
    "straight_seconds": round(straight_s),
    "killed_seconds": round(time.time() - start),
    **compare(out / "straight", out / "killed"),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="work folder (two runs and the tiny model)")
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--save-every", type=int, default=50)
  p.add_argument("--kill-every", type=int, default=300, help="mean steps between kills")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  result = soak(pathlib.Path(args.out), args.steps, args.save_every, args.kill_every, args.seed)
  result["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  result["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
  with open(pathlib.Path(args.out) / "soak.json", "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
