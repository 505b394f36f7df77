"""Exact resume: ``(params, opt_state)`` saved with Orbax mid-run, restored in a fresh process.

A first subprocess (8 simulated devices) runs each optimizer for ``TOTAL``
steps, saving at ``SAVE_AT`` (between two merges of step-K, so the accumulator
is not zero), once on an 8-device mesh and once on a 4-device mesh. A second,
fresh subprocess (4 simulated devices) restores both onto a 4-device mesh laid
out as `_param_shardings` says and runs to ``TOTAL``. Restored from the same
layout, every leaf of the params and of the optimizer state must equal the
uninterrupted run's bit for bit; from the other layout, to rounding.

The gradient is elementwise in the params, so it is bitwise the same on any
mesh: what is under test is the optimizer state, not the model's reductions.
This file is also the script the subprocesses run.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# One worker runs this file (conftest.ONE_WORKER): its module fixture (a subprocess)
# then runs once, not once per worker.

SAVE_AT = 5
TOTAL = 11
CONFIGS = ("ondare", "onties")
# (mesh the run was saved from, mesh it is restored onto, bitwise?)
RESUMES = (("mesh4", "mesh4", True), ("mesh8", "mesh4", False))


def _build(config):
  import jax
  import jax.numpy as jnp
  import optax

  import omerge_jax

  params = {
    "w": jnp.linspace(-1.0, 1.0, 16 * 8).reshape(16, 8),
    "emb": jnp.cos(jnp.arange(32 * 4, dtype=jnp.float32)).reshape(32, 4).astype(jnp.bfloat16),
    "scale": jnp.float32(1.5),
  }
  base = jax.tree.map(lambda x: (x * 0.8 - 0.05).astype(x.dtype), params)
  tau = omerge_jax.reference_delta(params, base)
  lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 3, TOTAL)
  if config == "ondare":
    tx = omerge_jax.ondare(
      lr,
      tau,
      alpha=0.2,
      reserve_p=0.3,
      weight_decay=0.01,
      merge_every=3,
      resample_reference=True,
      reference_dtype=jnp.bfloat16,
      seed=7,
      track_stats=True,
    )
  else:
    tx = omerge_jax.onties(
      lr,
      tau,
      alpha=0.2,
      reserve_p=0.3,
      weight_decay=0.01,
      merge_every=3,
      track_stats=True,
    )
  return params, tx


def _param_shardings(mesh_name):
  import jax
  import numpy as np_
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  if mesh_name == "mesh8":
    mesh = Mesh(np_.array(jax.devices()[:8]), ("d",))
    specs = {"w": P("d", None), "emb": P("d"), "scale": P()}
  else:
    mesh = Mesh(np_.array(jax.devices()[:4]), ("d",))
    specs = {"w": P(None, "d"), "emb": P("d"), "scale": P()}
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)


def _abstract(tx, params, mesh_name):
  """Abstract ``(params, opt_state)`` laid out on ``mesh_name``."""
  import jax

  from omerge_jax import checkpoint

  params = jax.tree.map(
    lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
    params,
    _param_shardings(mesh_name),
  )
  return {"params": params, "opt_state": checkpoint.abstract_state(tx, params)}


def _step_fn(tx, abstract):
  import jax
  import jax.numpy as jnp
  import optax

  shardings = jax.tree.map(lambda x: x.sharding, abstract)

  @functools.partial(jax.jit, out_shardings=shardings)
  def step(state, t):
    params = state["params"]
    # Elementwise in the params, so the gradient is the same on every mesh.
    grads = jax.tree.map(
      lambda p: (jnp.sin(3.0 * p.astype(jnp.float32) + 0.37 * t) + 0.1 * p).astype(p.dtype),
      params,
    )
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}

  return step


def _run(step, state, start, stop):
  import jax.numpy as jnp

  for t in range(start, stop):
    state = step(state, jnp.float32(t))
  return state


def _dump(path, tree):
  import jax

  import jax.numpy as jnp

  # numpy files have no bfloat16: widen it (losslessly) to float32.
  widen = lambda x: np.asarray(x, np.float32) if x.dtype == jnp.bfloat16 else np.asarray(x)
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  np.savez(path, **{jax.tree_util.keystr(p): widen(x) for p, x in leaves})


def _save(directory):
  import jax
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  for config in CONFIGS:
    for mesh_name in sorted({saved for saved, _, _ in RESUMES}):
      params, tx = _build(config)
      abstract = _abstract(tx, params, mesh_name)
      shardings = jax.tree.map(lambda x: x.sharding, abstract)
      state = jax.device_put({"params": params, "opt_state": tx.init(params)}, shardings)
      step = _step_fn(tx, abstract)
      state = _run(step, state, 0, SAVE_AT)
      checkpointer.save(directory / f"{config}-{mesh_name}", state)
      checkpointer.wait_until_finished()
      _dump(directory / f"{config}-{mesh_name}-saved.npz", state)
      _dump(
        directory / f"{config}-{mesh_name}-uninterrupted.npz", _run(step, state, SAVE_AT, TOTAL)
      )
  checkpointer.close()


def _restore(directory):
  import jax
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  for config in CONFIGS:
    for saved, target, _ in RESUMES:
      params, tx = _build(config)
      abstract = _abstract(tx, params, target)
      # Adam's moments, the reference delta and the accumulator are laid out
      # like the params, the counters and statistics replicated.
      w_sharding = abstract["params"]["w"].sharding
      for path, leaf in jax.tree_util.tree_leaves_with_path(abstract["opt_state"]):
        like_w = jax.tree_util.keystr(path).endswith("['w']")
        assert like_w == (leaf.sharding == w_sharding), path
      state = checkpointer.restore(directory / f"{config}-{saved}", abstract)
      for want, got in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), strict=True):
        assert got.dtype == want.dtype, (want, got)
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (want, got)
      _dump(directory / f"{config}-{saved}-restored-{target}.npz", state)
      final = _run(_step_fn(tx, abstract), state, SAVE_AT, TOTAL)
      _dump(directory / f"{config}-{saved}-to-{target}.npz", final)
  checkpointer.close()


def _subprocess(mode, directory, devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_ENABLE_X64", None)
  result = subprocess.run(
    [sys.executable, __file__, mode, str(directory)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  directory = tmp_path_factory.mktemp("checkpoints")
  _subprocess("save", directory, devices=8)
  _subprocess("restore", directory, devices=4)
  return directory


def _load(directory, name):
  return np.load(directory / f"{name}.npz")


@pytest.mark.parametrize("saved,target,bitwise", RESUMES)
@pytest.mark.parametrize("config", CONFIGS)
def test_restore_is_lossless(checkpoints, config, saved, target, bitwise):
  del bitwise
  want = _load(checkpoints, f"{config}-{saved}-saved")
  got = _load(checkpoints, f"{config}-{saved}-restored-{target}")
  assert sorted(want.files) == sorted(got.files)
  # The reference delta, the step-K accumulator, the counters and the
  # statistics are all there (the run was saved between two merges).
  assert np.any(got["['opt_state'][2].accumulator['w']"] != 0)
  assert int(got["['opt_state'][2].count"]) == SAVE_AT
  for key in want.files:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key, strict=True)


@pytest.mark.parametrize("saved,target,bitwise", RESUMES)
@pytest.mark.parametrize("config", CONFIGS)
def test_restored_run_continues_like_the_uninterrupted_one(
  checkpoints, config, saved, target, bitwise
):
  uninterrupted = _load(checkpoints, f"{config}-{saved}-uninterrupted")
  resumed = _load(checkpoints, f"{config}-{saved}-to-{target}")
  assert int(resumed["['opt_state'][2].count"]) == TOTAL
  for key in uninterrupted.files:
    want, got = uninterrupted[key], resumed[key]
    assert want.dtype == got.dtype, key
    if bitwise or not np.issubdtype(want.dtype, np.floating):
      np.testing.assert_array_equal(got, want, err_msg=key, strict=True)
    else:
      # Another per-device shape lets XLA round Adam's arithmetic differently
      # (a few ulp); every discrete choice (masks, top-k, step-K) is the same.
      np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9, err_msg=key)


def _check_abstract_state():
  """`checkpoint.abstract_state` on a real 8-device mesh: param copies sharded like the param."""
  import jax
  import jax.numpy as jnp
  import numpy as np_
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import omerge_jax
  from omerge_jax import checkpoint

  assert jax.device_count() == 8, jax.devices()
  mesh = Mesh(np_.array(jax.devices()).reshape(4, 2), ("fsdp", "tp"))
  specs = {"w": P("fsdp", "tp"), "b": P("tp"), "e": P(None, "fsdp"), "s": P()}
  values = {
    "w": jnp.ones((8, 6)),
    "b": jnp.zeros(6, jnp.bfloat16),
    "e": jnp.ones((6, 8)),
    "s": jnp.float32(1.0),
  }
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
  tx = omerge_jax.ondare(1e-3, params, merge_every=2, weight_decay=0.1, track_stats=True)
  abstract = checkpoint.abstract_state(tx, params)
  state = jax.jit(tx.init)(params)
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  replicated = NamedSharding(mesh, P())
  copies = 0
  for (path, a), s in zip(
    jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(state), strict=True
  ):
    assert (a.shape, a.dtype) == (s.shape, s.dtype), path
    key = jax.tree_util.keystr(path)
    name = next((k for k in ("w", "b", "e") if key.endswith(f"['{k}']")), None)
    want = replicated if name is None else params[name].sharding
    assert a.sharding.is_equivalent_to(want, a.ndim), (key, a.sharding, want)
    copies += name is not None
  # mu, nu, the reference delta and the accumulator of each of w, b and e.
  assert copies == 4 * 3, copies
  print("ok")


def test_abstract_state_matches_init_and_shards_param_copies(tmp_path):
  _subprocess("abstract", tmp_path, devices=8)


def main():
  mode, directory = sys.argv[1], pathlib.Path(sys.argv[2])
  if mode == "save":
    _save(directory)
  elif mode == "abstract":
    _check_abstract_state()
  else:
    _restore(directory)


if __name__ == "__main__":
  main()
