"""Preemption: a run SIGKILLed at random moments and restarted ends as if never stopped.

`experiments.llm_dpo` and `experiments.llm_grpo` on a tiny Qwen2 checkpoint: the command is killed
(SIGKILL, nothing runs at exit) at moments drawn from a seeded generator,
one of them while a checkpoint is being written, and started again with the
same command line until it finishes. Its final policy (every tensor of the
exported Hugging Face folder, byte for byte) and every metric it logged
equal an uninterrupted run's. Restarted steps log their metrics again: each
repeat must equal the first, bit for bit.

The killed run's processes share a persistent compilation cache (under the
test's ``tmp_path``): the first compiles, its restarts load its executables,
so a test compiles its programs twice, not five times. The uninterrupted run
compiles on its own, without the cache, so the comparison still holds a
restart to a run that compiled everything afresh, as a preempted job on a
machine without a cache does. A cached entry serves only the same program
(its key hashes the HLO and the compile options); a kill while an entry is
written leaves a torn file, which JAX reads as a miss, with a warning, and
compiles again.
"""

import pathlib
import sys

import numpy as np
import pytest
import tunix  # noqa: F401  (the extra must be installed: fail, never skip)

from experiments.llm_dpo import preemption
from experiments.llm_dpo import tiny
from test_llm_dpo import _env

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 6, 2  # saves at 2, 4 (and 6, the end)
COMMON = (
  f"--optimizer ondare --steps {STEPS} --save-every {SAVE_EVERY} --warmup 0 --alpha 0.01 "
  "--reserve-p 0.5 --max-prompt-length 32 --export-dtype float32"
).split()
COMMANDS = {  # module: (its flags, what it prints once it has exported, its checkpoints under --out)
  "experiments.llm_dpo": (
    "--data={root}/prefs.jsonl --lr 1e-2 --batch-size 4 "
    "--max-response-length 24 --eval-fraction 0.25 --eval-every 3",
    "exported the policy",
    "checkpoints",
  ),
  "experiments.llm_grpo": (
    "--prompts={root}/prompts.jsonl --reward experiments.llm_dpo.tiny:letters "
    "--lr 3e-2 --batch-size 4 --num-generations 4 --max-response-length 16",
    "exported the actor",
    "checkpoints/actor",
  ),
}
SEED = 20261203


def _kill_plan(rng):
  """Three kill moments, in order: after a step, inside a later checkpoint save, after a later step.

  Each comes after the one before, so the restarted run (back at the last
  complete checkpoint) still has it ahead.
  """
  save = int(rng.choice(np.arange(2 * SAVE_EVERY, STEPS, SAVE_EVERY)))
  before, after = int(rng.integers(1, save)), int(rng.integers(save + 1, STEPS))
  return [
    (preemption.AFTER_STEP, before),
    (preemption.IN_SAVE, save),
    (preemption.AFTER_STEP, after),
  ]


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_killed_at_random_resumes_bit_for_bit(module, tmp_path):
  tiny.write_all(tmp_path, "qwen2", n_pairs=48, layers=1)
  envs = {"straight": _env(None, 1), "killed": _env(tmp_path / "jax_cache", 1)}
  flags, exported, checkpoints = COMMANDS[module]
  command = lambda out: [
    sys.executable,
    "-m",
    module,
    f"--base={tmp_path}/base",
    f"--sft={tmp_path}/sft",
    *flags.format(root=tmp_path).split(),
    *COMMON,
    "--out",
    str(tmp_path / out),
    f"--export={tmp_path / out}/hf",
  ]
  plan = _kill_plan(np.random.default_rng(SEED))
  run = lambda out, moment=None: preemption.run(
    command(out), tmp_path / out / checkpoints, moment, env=envs[out], cwd=ROOT
  )
  killed, code, output = run("straight")
  assert not killed and code == 0 and output.count(exported) == 1, output[-3000:]

  record = []
  for moment in plan:
    killed, _, output = run("killed", moment)
    record.append((moment, killed))
    assert killed, (f"kill plan {plan}: the run ended before {moment}", output[-3000:])
  killed, code, output = run("killed")
  assert "resumed from step" in output, output[-3000:]
  assert not killed and code == 0 and exported in output, (plan, output[-3000:])

  got = preemption.compare(tmp_path / "straight", tmp_path / "killed")
  assert got["tensors"] > 0 and got["metrics"] > 0, got
  assert not (
    got["tensors_differing"] or got["metrics_differing"] or got["extra_metrics_not_eval"]
  ), (record, got)


def _without_timing(results: dict) -> dict:
  return {
    k: v for k, v in results.items() if k not in ("wall_time_s", "cached_stages", "cached_runs")
  }


@pytest.mark.slow
def test_testbed_killed_at_random_resumes_bit_for_bit(tmp_path):
  """The testbed's smoke preset, killed in its SFT stage and twice among its preference runs.

  Each preference run's params (and AdamW's frontier checkpoints) are cached
  under ``OUT/cache/pref`` as the run ends, so a restart trains only what
  was not finished; the results equal an uninterrupted run's, bit for bit.
  """
  import json  # pylint: disable=g-import-not-at-top

  # The testbed keeps an XLA cache per --out (OUT/cache/xla), so the killed run's
  # restarts reuse its first process's executables (the uninterrupted run compiles
  # on its own); JAX's thresholds would leave out the programs that compile in
  # under a second, most of them here.
  env = _env(None, 1) | dict(
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1"
  )
  command = lambda out: [
    sys.executable,
    "-m",
    "experiments.alignment_tax",
    "--preset",
    "smoke",
    "--quiet",
    "--out",
    str(tmp_path / out),
  ]
  killed, code, output = preemption.run(command("straight"), None, env=env, cwd=ROOT)
  assert not killed and code == 0, output[-3000:]
  straight = json.loads((tmp_path / "straight" / "results.json").read_text())
  runs = len(list((tmp_path / "straight" / "cache" / "pref").glob("*.npz")))
  assert runs >= 4, runs

  cache = tmp_path / "killed" / "cache"
  count = lambda pattern: len(list(cache.glob(pattern)))
  rng = np.random.default_rng(SEED)
  first = int(rng.integers(1, runs // 2))
  second = int(rng.integers(first + 1, runs))
  plan = [
    ("in the SFT stage", lambda: count("base_*.npz") == 1),
    (f"after {first} preference runs", lambda: count("pref/*.npz") >= first),
    (f"after {second} preference runs", lambda: count("pref/*.npz") >= second),
  ]
  for name, moment in plan:
    killed, _, output = preemption.run(command("killed"), None, moment, env=env, cwd=ROOT)
    assert killed, (f"the run ended before {name}", output[-3000:])
  killed, code, output = preemption.run(command("killed"), None, env=env, cwd=ROOT)
  assert not killed and code == 0, output[-3000:]
  resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
  assert resumed["cached_runs"] >= second and resumed["cached_stages"] == 2, resumed["cached_runs"]
  assert _without_timing(resumed) == _without_timing(straight)
