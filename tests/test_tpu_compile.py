"""Every optimizer compiles for TPU: ahead of time, for a v5e 2x2 topology, on this CPU.

Parts of the selection run a different route on TPU (`lax.platform_dependent`
in `trim` and `alias`), and nothing else in the suite lowers them; the TPU
compiler (libtpu, in the ``test`` extra) compiles without a TPU attached.
"""

import pytest

pytest.importorskip("libtpu", reason="the TPU compiler: pip install -e '.[test]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import omerge_jax  # noqa: E402
from omerge_jax import checkpoint  # noqa: E402

# One leaf large enough for the exact top-k's bracket (over 2**18 entries),
# one stacked (two layers), one tiny (its own sample), one scalar.
SHAPES = {"big": (1024, 512), "layers": (2, 256, 128), "bias": (64,), "scale": ()}
SPECS = {"big": P("fsdp"), "layers": P(None, "fsdp"), "bias": P(), "scale": P()}


def _stacked(path, leaf):
  return 1 if any(getattr(k, "key", None) == "layers" for k in path) else 0


OPTIMIZERS = {
  "ondare_step_k": lambda tau: omerge_jax.ondare(1e-3, tau, merge_every=3, weight_decay=1e-4),
  "onties_exact": lambda tau: omerge_jax.onties(1e-3, tau, stacked_axes=_stacked),
  "onties_sampled": lambda tau: omerge_jax.onties(
    1e-3, tau, topk="sampled", stacked_axes=_stacked, weight_decay=1e-4
  ),
  "onties_exact_step_k": lambda tau: omerge_jax.onties(
    1e-3, tau, merge_every=2, sign_election="weighted", track_stats=True
  ),
  "online_merge_sampled": lambda tau: optax.chain(
    optax.adam(1e-3), omerge_jax.online_merge(tau, method="ties", topk="sampled")
  ),
}


@pytest.fixture(scope="module")
def mesh():
  topology = topologies.get_topology_desc(
    platform="tpu",
    topology_name="v5e:2x2",
    chip_config_name="default",
    chips_per_host_bounds=(2, 2, 1),
    num_slices=1,
  )
  return Mesh(np.array(topology.devices).reshape(4), ("fsdp",))


def _compile(name, mesh):
  params = {
    k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, SPECS[k]))
    for k, s in SHAPES.items()
  }
  build = OPTIMIZERS[name]
  # Any tree shaped like the params serves as tau for the state's shapes.
  init = lambda p: build(p).init(p)
  state = checkpoint.abstract_state(optax.GradientTransformation(init, None), params)

  def step(params, state, grads):
    # update reads the state; the reference delta is only init's.
    updates, state = build(params).update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_step_compiles_for_tpu(name, mesh):
  compiled = _compile(name, mesh)
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  # Sharded over 4 chips: the 2.1 MB of params and their state arrive split.
  assert memory.argument_size_in_bytes < 6 * 2**20, memory
  assert {d.platform for d in compiled.input_shardings[0][0]["big"].device_set} == {"tpu"}
  if "sampled" in name:
    # TPU's route: the sample's threshold from one sort, no scatter-add histogram.
    assert " sort(" in hlo
    assert "scatter" not in hlo


def test_plan_accounting_matches_the_hand_counts():
  # benchmarks/bench_plan.py reports HBM bytes read op by op from the
  # optimised TPU HLO (benchmarks/hlo_traffic.py); two ops whose traffic is
  # known by hand must come out exact: AdamW's fused update of one leaf
  # (4 reads + 3 writes of its shard) and the all-reduce of the samples.
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
  import bench_plan

  checks = bench_plan.hand_checks()
  assert len(checks) == 2
  for check in checks:
    assert check["equal"], check
