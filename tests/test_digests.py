"""Digests of a checkpoint's arrays: wrong numbers are named, never restored silently.

In this process (one device): every dtype round-trips, any changed word or
swapped pair is named with its shard, a missing digest is named. In a
subprocess with 8 simulated devices (`_scenario`, also this file's script):
a state saved with Orbax from a (4, 2) mesh, with its digests as the step's
custom metadata, restores and verifies on the same mesh, on another mesh and
on one device; 16 bytes flipped in the middle of the largest array value
(a chunk, found from the OCDBT index: a data file's middle landed in a zstd
stream that failed to decode in one run of four) restore without an error
from Orbax (the values differ) and are named by `verify`, with the shard of
that chunk; a shard of the newer step replaced by the older step's is named
with its index.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omerge_jax import checkpoint
from tests import ocdbt

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _tree():
  rng = np.random.default_rng(0)
  return {
    "f32": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32),
    "bf16": jnp.asarray(rng.standard_normal((4, 3, 2)), jnp.bfloat16),
    "i8": jnp.asarray(rng.integers(-128, 127, (9,)), jnp.int8),
    "mask": jnp.asarray(rng.random(6) < 0.5),
    "count": jnp.int32(12),
    "host": np.float32(0.25),
  }


def test_digests_are_16_hex_digits_per_shard_and_verify_equal_values():
  tree = _tree()
  saved = checkpoint.digests(tree)
  assert set(saved) == {f"['{k}']" for k in tree}
  assert saved["['bf16']"].keys() == {"[0:4, 0:3, 0:2]"}
  assert saved["['count']"].keys() == {"[]"}
  for shards in saved.values():
    for digest in shards.values():
      assert len(digest) == 16 and int(digest, 16) >= 0
  assert json.loads(json.dumps(saved)) == saved
  checkpoint.verify(tree, saved)
  checkpoint.verify(jax.tree.map(np.asarray, tree), saved)  # the same values on the host
  assert checkpoint.digests(jax.tree.map(lambda x: x, tree)) == saved


@pytest.mark.parametrize(
  "leaf, change",
  [
    ("f32", lambda x: x.at[4, 6].set(np.nextafter(x[4, 6], np.inf))),  # one ulp
    ("f32", lambda x: x.at[0, 0].set(-x[0, 0])),  # the sign bit
    ("bf16", lambda x: x.at[1, 2, 1].set(-x[1, 2, 1])),
    ("i8", lambda x: x.at[3].add(1)),
    ("mask", lambda x: x.at[5].set(~x[5])),
    ("count", lambda x: x + 1),
    ("f32", lambda x: x.at[jnp.array([1, 2])].set(x[jnp.array([2, 1])])),  # two rows swapped
    ("f32", lambda x: x.at[0, 1].set(jnp.nan)),
  ],
)
def test_a_changed_value_is_named_with_its_shard(leaf, change):
  tree = _tree()
  saved = checkpoint.digests(tree)
  with pytest.raises(checkpoint.DigestMismatch, match=r"differ from the digest") as e:
    checkpoint.verify({**tree, leaf: change(tree[leaf])}, saved)
  assert e.value.path == f"['{leaf}']"
  assert e.value.shard == next(iter(saved[f"['{leaf}']"]))


def test_zero_and_negative_zero_differ():
  zero = {"x": jnp.zeros(3)}
  with pytest.raises(checkpoint.DigestMismatch):
    checkpoint.verify({"x": -jnp.zeros(3)}, checkpoint.digests(zero))


def test_a_missing_digest_is_named():
  tree = _tree()
  saved = checkpoint.digests(tree)
  del saved["['i8']"]
  with pytest.raises(checkpoint.DigestMismatch, match=r"^\['i8'\]: no digest was saved") as e:
    checkpoint.verify(tree, saved)
  assert e.value.shard is None


@pytest.mark.parametrize("dtype", [jnp.int4, jnp.complex64])
def test_an_unsupported_dtype_is_refused_naming_the_leaf(dtype):
  with pytest.raises(TypeError, match=r"^\['bad'\]: no digest for dtype"):
    checkpoint.digests({"ok": jnp.ones(2), "bad": jnp.ones(2, dtype)})


# -- 8 devices, Orbax ----------------------------------------------------------


MOMENT = "['opt_state'][0].mu['emb']"  # Adam's first moment of the param "emb"


def _scenario(tmp: str) -> dict:
  """Save, spoil, restore and verify (in the subprocess); returns what the tests assert."""
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  import omerge_jax  # pylint: disable=g-import-not-at-top

  tmp = pathlib.Path(tmp)
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  specs = {"emb": P("fsdp", "tp"), "w": P(None, "fsdp"), "b": P()}
  rng = np.random.default_rng(1)
  host = {
    "emb": rng.standard_normal((512, 16)).astype(np.float32),
    "w": rng.standard_normal((64, 96)).astype(jnp.bfloat16),
    "b": rng.standard_normal(96).astype(np.float32),
  }
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in host.items()}
  tau = jax.tree.map(lambda x: x * 0.01, params)
  tx = omerge_jax.ondare(1e-2, tau, reserve_p=0.5, merge_every=2)
  state = {"params": params, "opt_state": tx.init(params)}

  @jax.jit
  def step(state):
    grads = jax.tree.map(jnp.sin, state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

  # Synchronous saves: the test is about what is restored, not Orbax's threads.
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
  manager = ocp.CheckpointManager(tmp / "run", item_names=("state",), options=options)
  saved = {}
  for n in (1, 2):
    state = step(state)
    saved[n] = checkpoint.digests(state)
    manager.save(n, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)),
                 custom_metadata={"digests": saved[n]})  # fmt: skip
  manager.wait_until_finished()
  manager.close()

  def target(sharding_of):
    return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), state
    )

  other = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  targets = {
    "same": target(lambda x: x.sharding),
    "other_mesh": target(lambda x: NamedSharding(other, P("x") if x.ndim else P())),
    "one_device": target(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[3])),
  }

  def restore(root, step, layout):
    t = targets[layout]
    restored = ocp.PyTreeCheckpointer().restore(
      root / str(step) / "state",
      args=ocp.args.PyTreeRestore(
        item=t, restore_args=ocp.checkpoint_utils.construct_restore_args(t)
      ),
    )
    metadata = json.loads((root / str(step) / "_CHECKPOINT_METADATA").read_text())
    return restored, metadata["custom_metadata"]["digests"]

  def outcome(restored, digests):
    try:
      checkpoint.verify(restored, digests)
      return None
    except checkpoint.DigestMismatch as e:
      return [e.path, e.shard, str(e)]

  out = {"intact": {}, "flipped": {}}
  for layout in targets:
    out["intact"][layout] = outcome(*restore(tmp / "run", 2, layout))
  flipped = tmp / "flipped"
  shutil.copytree(tmp / "run", flipped)
  out["flipped_key"] = ocdbt.flip_largest_value(flipped / "2" / "state").decode()
  for layout in targets:
    restored, digests = restore(flipped, 2, layout)  # Orbax reads them without an error
    out["flipped"][layout] = outcome(restored, digests)
  restored, _ = restore(flipped, 2, "same")
  out["changed_entries"] = sum(
    int(np.sum(np.asarray(a) != np.asarray(b)))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True)
  )
  # One shard of the Adam moment of "emb" taken from step 1: the rest is step 2's.
  older, _ = restore(tmp / "run", 1, "same")
  newer, digests = restore(tmp / "run", 2, "same")
  leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(newer)}
  moment = leaves[MOMENT]
  swapped_index = moment.addressable_shards[5].index
  mixed = np.asarray(moment).copy()
  mixed[swapped_index] = np.asarray(older["opt_state"][0].mu["emb"])[swapped_index]
  spoilt = jax.tree_util.tree_map_with_path(
    lambda p, x: jax.device_put(mixed, x.sharding) if jax.tree_util.keystr(p) == MOMENT else x,
    newer,
  )
  out["swapped"] = outcome(spoilt, digests)
  out["swapped_index"] = [[s.start, s.stop] for s in swapped_index]
  return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("digests")
  script = f"import json, sys; sys.path.insert(0, {str(ROOT)!r})\n"
  script += "from tests.test_digests import _scenario\n"
  script += f"print(json.dumps(_scenario({str(tmp)!r})))"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
    [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-8000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_an_intact_step_verifies_on_any_layout(scenario):
  assert scenario["intact"] == {"same": None, "other_mesh": None, "one_device": None}


def test_flipped_bytes_restore_silently_but_are_named(scenario):
  assert scenario["changed_entries"] > 0  # Orbax restored other numbers without an error
  path, shard, message = scenario["flipped"]["same"]
  assert f"{path} shard {shard}" in message
  # The flipped chunk ("params.emb/0.1": the array's name, its chunk index) is
  # the shard named: Orbax writes one chunk per shard.
  name, chunk = scenario["flipped_key"].split("/")
  assert path == "".join(f"['{part}']" for part in name.split("."))
  start_stop = [[int(v) for v in part.split(":")] for part in shard.strip("[]").split(", ")]
  assert [start // (stop - start) for start, stop in start_stop] == [
    int(i) for i in chunk.split(".")
  ]
  for layout in ("other_mesh", "one_device"):  # the whole array's digest
    path, shard, message = scenario["flipped"][layout]
    assert shard is None and "the restored array differs" in message, layout


def test_a_shard_from_the_older_step_is_named_with_its_index(scenario):
  path, shard, _ = scenario["swapped"]
  assert path == MOMENT
  start_stop = [[int(v) for v in part.split(":")] for part in shard.strip("[]").split(", ")]
  assert start_stop == scenario["swapped_index"]
