"""Resuming a DPO run whose newest Orbax checkpoint is damaged or not this run's.

One subprocess (8 simulated CPU devices, the compilation cache of
``tests/test_llm_dpo.py``) trains a tiny OnDARE run for 3 steps, which keeps
steps 2 and 3 (``max_to_keep=2``), each saved with its digests. For each case
it copies that checkpoint folder, spoils step 3 and calls
`experiments.llm_dpo.checkpoints.resume` with this run's abstract state, as
the command does before building the trainer: truncated data files, a missing
data file, a corrupted OCDBT manifest, a corrupted tree file (``_METADATA``),
the checkpoint of AdamW (the same model) and of another model (2 layers, the
same optimizer), both as Tunix's checkpoint manager writes them; 16 bytes
flipped inside the array data of the params and of the optimizer state
(Orbax restores other numbers without an error: only the digests see it), the
params item of step 2 in step 3's place, a digest removed, the digests'
file damaged, and a step saved without digests (an older run: used,
reported as unverified). Last, it flips bytes in step 3 of the run itself and
runs the command again, which resumes from step 2 and exports a policy equal
byte for byte to the uninterrupted run's. This file is also the script the
subprocess runs (`_scenario`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import shutil

import pytest
import tunix  # noqa: F401  (the extra must be installed: fail, never skip)

from experiments.llm_dpo import tiny
from tests import ocdbt
from tests.test_llm_dpo import TRAIN_FLAGS
from tests.test_llm_dpo import compile_cache  # noqa: F401  (the session's fixture)
from tests.test_llm_dpo import run_on_8_devices

# The OCDBT data files of step 3's params.
PARAM_FILES = "3/model_params/ocdbt.process_0/d"


def _truncate(root):
  # Every data file of the item. An OCDBT step folder also holds files that a
  # restore never reads (the per-process index and its older versions; values
  # under 1 KB live inline in the top-level index): truncating "the largest
  # file" alone sometimes damaged nothing, and the test flaked.
  for path in (root / PARAM_FILES).iterdir():
    if path.is_file():
      path.write_bytes(path.read_bytes()[:64])


def _remove(root):
  files = collections.Counter()
  for _, file, _, length in ocdbt.values(root / "3" / "optimizer_state"):
    files[file] += length
  max(files, key=files.get).unlink()  # the file holding the most array bytes


def _flip_data(item):
  return lambda root: ocdbt.flip_largest_value(root / "3" / item)


def _older_params(root):
  shutil.rmtree(root / "3" / "model_params")
  shutil.copytree(root / "2" / "model_params", root / "3" / "model_params")


def _edit_digests(edit):
  def spoil(root):
    path = root / "3" / "_CHECKPOINT_METADATA"
    metadata = json.loads(path.read_text())
    edit(metadata["custom_metadata"])
    path.write_text(json.dumps(metadata))

  return spoil


def _drop_one_digest(custom):
  digests = custom["omerge_jax.digests"]["optimizer_state"]
  del digests[sorted(digests)[3]]


def _drop_all_digests(custom):
  del custom["omerge_jax.digests"]


def _corrupt(root):
  ocdbt.flip(root / "3" / "model_params" / "manifest.ocdbt")


def _corrupt_tree(root):
  ocdbt.flip(root / "3" / "optimizer_state" / "_METADATA")


def _replace_step_3(source):
  def replace(root):
    shutil.rmtree(root / "3")
    shutil.copytree(source, root / "3")

  return replace


def _hashes(folder: pathlib.Path) -> dict[str, str]:
  return {
    str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


def _scenario(tmp: str, common: list[str]) -> dict:
  """Train, spoil and resume every case (in the subprocess); returns what the tests assert."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from tunix.sft import checkpoint_manager  # pylint: disable=g-import-not-at-top

  from experiments.llm_dpo import checkpoints  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import distributed  # pylint: disable=g-import-not-at-top
  from experiments.llm_dpo import train  # pylint: disable=g-import-not-at-top

  tmp = pathlib.Path(tmp)
  run = ["--optimizer=ondare", "--steps=3", f"--out={tmp}/run"]
  first = train.main(common + run + [f"--export={tmp}/first_hf"])
  mesh = distributed.make_mesh("fsdp=4,tp=2")

  def state_of(argv):
    args = train.parse_args(argv)
    policy, tau = train.load_policy(args, mesh)
    return policy, train.build_optimizer(args, tau, mesh)

  def save_as_tunix(name, policy, tx):
    manager = checkpoint_manager.CheckpointManager(str(tmp / name))
    manager.save(3, policy, nnx.Optimizer(policy, tx, wrt=nnx.Param), force=True)
    manager.close()
    return tmp / name / "3"

  out = {"first": first, "cases": {}}
  with mesh:
    policy, tx = state_of(common + run)
    target = checkpoints.abstract_state(policy, tx)
    adamw = save_as_tunix(
      "saved_adamw", *state_of(common + ["--optimizer=adamw", "--steps=3", "--out=unused"])
    )
    other = [
      f"--base={tmp}/other/base",
      f"--sft={tmp}/other/sft",
      "--data=unused",
      "--optimizer=ondare",
      "--steps=3",
      "--out=unused",
      "--mesh=fsdp=4,tp=2",
    ]
    other_model = save_as_tunix("saved_other_model", *state_of(other))
    spoil = {
      "truncated": _truncate,
      "missing": _remove,
      "corrupted": _corrupt,
      "tree_file": _corrupt_tree,
      "adamw": _replace_step_3(adamw),
      "other_model": _replace_step_3(other_model),
      "flipped_params": _flip_data("model_params"),
      "flipped_optimizer": _flip_data("optimizer_state"),
      "older_params": _older_params,
      "missing_digest": _edit_digests(_drop_one_digest),
      "damaged_digests": lambda root: ocdbt.flip(root / "3" / "_CHECKPOINT_METADATA"),
      "no_digests": _edit_digests(_drop_all_digests),
    }
    for case, damage in spoil.items():
      root = tmp / case
      shutil.copytree(tmp / "run" / "checkpoints", root)
      damage(root)
      before = _hashes(root / "2")
      lines = []
      result = {"step": checkpoints.resume(root, target, lines.append), "lines": lines}
      result |= {"intact": _hashes(root / "2") == before, "after": sorted(os.listdir(root))}
      out["cases"][case] = result
    # Both steps bad: nothing is moved and the error names both.
    root = tmp / "none_intact"
    shutil.copytree(tmp / "run" / "checkpoints", root)
    _truncate(root)
    shutil.rmtree(root / "2")
    shutil.copytree(adamw, root / "2")
    try:
      out["none_intact"] = {"error": f"resumed from {checkpoints.resume(root, target, print)}"}
    except checkpoints.NoIntactCheckpoint as e:
      out["none_intact"] = {"error": str(e)}
    out["none_intact"]["after"] = sorted(os.listdir(root))
  _flip_data("model_params")(tmp / "run" / "checkpoints")
  try:
    out["rerun"] = train.main(common + run + [f"--export={tmp}/rerun_hf"])
  except Exception as e:  # pylint: disable=broad-except  (the test shows it)
    out["rerun"] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
  out["rerun_dir"] = sorted(os.listdir(tmp / "run" / "checkpoints"))
  out["exports"] = [_hashes(tmp / name) for name in ("first_hf", "rerun_hf")]
  return out


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, compile_cache):  # noqa: F811
  tmp = tmp_path_factory.mktemp("bad_checkpoints")
  tiny.write_all(tmp, "qwen2", n_pairs=64, layers=1)  # as test_llm_dpo's run: the same programs
  tiny.write_all(tmp / "other", "qwen2", n_pairs=2, layers=2)
  common = [f"--base={tmp}/base", f"--sft={tmp}/sft", f"--data={tmp}/prefs.jsonl", *TRAIN_FLAGS]
  return run_on_8_devices(
    f"""
      import json
      from tests.test_checkpoints_bad import _scenario
      print(json.dumps(_scenario({str(tmp)!r}, {common!r})))
  """,
    compile_cache,
  )


# case -> (what the message names, the reason in the moved step's name, what it says).
# TensorStore names the OCDBT database and the value it could not read, not the
# data file holding it.
CASES = {
  "truncated": ("3/model_params (value ", "arrays", "cannot be read"),
  "missing": ("3/optimizer_state (value ", "arrays", "cannot be read"),
  "corrupted": ("3/model_params/manifest.ocdbt:", "metadata", "checksum verification failed"),
  "tree_file": ("3/optimizer_state/_METADATA:", "metadata", "unreadable"),
  "adamw": ("3/optimizer_state/_METADATA:", "tree", "saved by another optimizer"),
  "other_model": ("3/model_params/_METADATA:", "tree", "saved by another model"),
  "flipped_params": ("3/model_params: ['", "digest", "the restored values differ from the digest"),
  "flipped_optimizer": (
    "3/optimizer_state: ['opt_state']",
    "digest",
    "the restored values differ from the digest",
  ),
  "older_params": ("3/model_params: ['", "digest", "the restored values differ from the digest"),
  "missing_digest": ("3/optimizer_state: ['opt_state']", "digest", ": no digest was saved for it"),
  "damaged_digests": ("3/_CHECKPOINT_METADATA: ", "digest", "unreadable"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_newest_step_is_named_and_moved_aside_and_the_intact_one_resumed(resumed, case):
  names, reason, says = CASES[case]
  got = resumed["cases"][case]
  assert got["step"] == 2
  (line,) = got["lines"]
  assert line.startswith(f"checkpoint step 3: {names}"), line
  assert says in line, line
  assert line.endswith(f"3.bad-{reason}, resuming from step 2"), line
  assert got["after"] == ["2", f"3.bad-{reason}"]
  assert got["intact"], "step 2's files changed"


@pytest.mark.slow
def test_a_step_saved_without_digests_is_used_and_reported_unverified(resumed):
  got = resumed["cases"]["no_digests"]
  assert got["step"] == 3
  assert got["lines"] == [
    "checkpoint step 3: saved without digests (by an older run); its values are not verified"
  ]
  assert got["after"] == ["2", "3"]


@pytest.mark.slow
def test_no_intact_step_fails_naming_each_and_moves_nothing(resumed):
  got = resumed["none_intact"]
  assert "checkpoint step 3: 3/model_params (value " in got["error"]
  assert (
    "checkpoint step 2: 2/optimizer_state/_METADATA: saved by another optimizer" in got["error"]
  )
  assert "Nothing was moved" in got["error"]
  assert got["after"] == ["2", "3"]


@pytest.mark.slow
def test_the_command_resumes_from_the_intact_step_exactly(resumed):
  first, rerun = resumed["first"], resumed["rerun"]
  assert "error" not in rerun, rerun
  assert (rerun["resumed_from"], rerun["steps"]) == (2, 3)
  assert rerun["train_loss"] == first["train_loss"][2:]
  # Step 3 is saved again; the damaged one stays aside.
  assert resumed["rerun_dir"] == ["2", "3", "3.bad-digest"]
  # The policy after the fallback is the uninterrupted run's, byte for byte.
  first_files, rerun_files = resumed["exports"]
  assert any(name.endswith(".safetensors") for name in first_files)
  assert rerun_files == first_files
