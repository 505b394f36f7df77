"""Preemption: a run SIGKILLed at random moments and restarted ends as if never stopped.

`experiments.llm_dpo` and `experiments.llm_grpo` on a tiny Qwen2 checkpoint: the command is killed
(SIGKILL, nothing runs at exit) at moments drawn from a seeded generator,
one of them while a checkpoint is being written, and started again with the
same command line until it finishes. Its final policy (every tensor of the
exported Hugging Face folder, byte for byte) and every metric it logged
equal an uninterrupted run's. Restarted steps log their metrics again: each
repeat must equal the first, bit for bit.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tunix  # noqa: F401  (the extra must be installed: fail, never skip)

from experiments.llm_dpo import tiny
from test_llm_dpo import _env

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 2  # saves at 2, 4 (and 6, the end)
COMMON = (
    f"--optimizer ondare --steps {STEPS} --save-every {SAVE_EVERY} --warmup 0 --alpha 0.01 "
    "--reserve-p 0.5 --max-prompt-length 32 --export-dtype float32"
).split()
COMMANDS = {  # module: (its flags, what it prints once it has exported, its checkpoints under --out)
    "experiments.llm_dpo": ("--data={root}/prefs.jsonl --lr 1e-2 --batch-size 4 "
                            "--max-response-length 24 --eval-fraction 0.25 --eval-every 3",
                            "exported the policy", "checkpoints"),
    "experiments.llm_grpo": ("--prompts={root}/prompts.jsonl --reward experiments.llm_dpo.tiny:letters "
                             "--lr 3e-2 --batch-size 4 --num-generations 4 --max-response-length 16",
                             "exported the actor", "checkpoints/actor"),
}
SEED = 20261203


def _kill_plan(rng):
  """Three kill moments, in order: after a step, inside a later checkpoint save, after a later step.

  Each comes after the one before, so the restarted run (back at the last
  complete checkpoint) still has it ahead.
  """
  save = int(rng.choice(np.arange(2 * SAVE_EVERY, STEPS, SAVE_EVERY)))
  before, after = int(rng.integers(1, save)), int(rng.integers(save + 1, STEPS))
  return [("after step", before), ("inside the save of step", save), ("after step", after)]


def _saving(checkpoints: pathlib.Path, step: int) -> bool:
  # Orbax writes a step into a temporary folder and renames it when complete.
  try:
    return any(e.name.startswith(f"{step}.") and "tmp" in e.name for e in os.scandir(checkpoints))
  except FileNotFoundError:
    return False


def _run(argv, env, checkpoints, moment=None):
  """Start the command; SIGKILL it at ``moment`` (or let it finish). Returns (killed, output)."""
  proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines, killed = [], threading.Event()

  def read():
    for line in proc.stdout:
      lines.append(line)
      if moment and moment[0] == "after step" and line.startswith(f"step {moment[1]:5d} "):
        proc.send_signal(signal.SIGKILL)
        killed.set()

  reader = threading.Thread(target=read)
  reader.start()
  if moment and moment[0] == "inside the save of step":
    while proc.poll() is None and not _saving(checkpoints, moment[1]):
      time.sleep(0.0005)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      killed.set()
  proc.wait(timeout=600)
  reader.join()
  return killed.is_set(), "".join(lines)


def _metrics(path):
  """{(name, step): value} of a metrics file; repeated entries must agree bit for bit."""
  out = {}
  for line in open(path):
    r = json.loads(line)
    key = (r["name"], r["step"])
    assert out.setdefault(key, r["value"]) == r["value"], (key, out[key], r["value"])
  return out


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_killed_at_random_resumes_bit_for_bit(module, tmp_path):
  tiny.write_all(tmp_path, "qwen2", n_pairs=48, layers=1)
  env = _env(None, 1)
  flags, exported, checkpoints = COMMANDS[module]
  command = lambda out: [
      sys.executable, "-m", module, f"--base={tmp_path}/base", f"--sft={tmp_path}/sft",
      *flags.format(root=tmp_path).split(), *COMMON,
      "--out", str(tmp_path / out), f"--export={tmp_path / out}/hf",
  ]
  plan = _kill_plan(np.random.default_rng(SEED))
  killed, output = _run(command("straight"), env, tmp_path / "straight" / checkpoints)
  assert not killed and output.count(exported) == 1, output[-3000:]

  record = []
  for moment in plan:
    killed, output = _run(command("killed"), env, tmp_path / "killed" / checkpoints, moment)
    record.append((moment, killed))
    assert killed, (f"kill plan {plan}: the run ended before {moment}", output[-3000:])
  killed, output = _run(command("killed"), env, tmp_path / "killed" / checkpoints)
  assert "resumed from step" in output, output[-3000:]
  assert not killed and exported in output, (plan, output[-3000:])

  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  straight = load_file(tmp_path / "straight" / "hf" / "model.safetensors")
  resumed = load_file(tmp_path / "killed" / "hf" / "model.safetensors")
  assert straight.keys() == resumed.keys()
  for key in straight:
    np.testing.assert_array_equal(resumed[key], straight[key], err_msg=f"{key}, kills {record}")
  want = _metrics(tmp_path / "straight" / "metrics.jsonl")
  got = _metrics(tmp_path / "killed" / "metrics.jsonl")
  assert {k: got.get(k) for k in want} == want, record
  # A resumed run also evaluates when it starts: the only entries the other lacks.
  assert all("/eval/" in name for name, _ in got.keys() - want.keys()), record
