"""One process of the 2-process test in `test_multihost.py`.

Usage: python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process owns 4 CPU devices (the parent sets XLA_FLAGS); together they
form one global (fsdp=4, tp=2) mesh through `jax.distributed.initialize`.
Both build the same global arrays from a seeded NumPy generator, run a few
sharded OnDARE / OnTIES steps, gather the final params and process 0 writes
them to OUT.npz. `run_steps` is also what the parent runs on one device.
"""

import os
import sys

import numpy as np

SHAPES = {"w": (64, 96), "v": (256, 32), "b": (96,)}
SPECS = {"w": ("fsdp", "tp"), "v": ("fsdp", None), "b": ("tp",)}
STEPS = 3
METHODS = ("ondare", "onties_exact")


def inputs():
  rng = np.random.default_rng(0)

  def normal(scale):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}

  params, tau = normal(1.0), normal(0.01)
  grads = [normal(1.0) for _ in range(STEPS)]
  return params, tau, grads


def optimizer(method, tau):
  import omerge_jax

  common = dict(alpha=0.1, reserve_p=0.2, weight_decay=0.01)
  if method == "ondare":
    return omerge_jax.ondare(1e-2, tau, seed=3, **common)
  return omerge_jax.onties(1e-2, tau, topk=method.split("_")[1], **common)


def run_steps(method, put):
  """Final params of `STEPS` jitted steps; ``put`` places a host tree on devices."""
  import jax
  import optax

  params, tau, grads = inputs()
  params, tau = put(params), put(tau)
  tx = optimizer(method, tau)
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  for g in grads:
    params, state = step(params, state, put(g))
  return params


def main():
  process_id, num_processes, port, out = sys.argv[1:5]
  import jax

  jax.distributed.initialize(
    coordinator_address=f"127.0.0.1:{port}",
    num_processes=int(num_processes),
    process_id=int(process_id),
    initialization_timeout=60,
  )
  from jax.experimental import multihost_utils
  from jax.sharding import NamedSharding, PartitionSpec as P

  assert jax.device_count() == 4 * int(num_processes), jax.devices()
  assert jax.local_device_count() == 4
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))

  def put(tree):
    return {
      k: jax.make_array_from_callback(
        v.shape, NamedSharding(mesh, P(*SPECS[k])), lambda index, v=v: v[index]
      )
      for k, v in tree.items()
    }

  results = {}
  with jax.set_mesh(mesh):
    for method in METHODS:
      params = run_steps(method, put)
      assert all(not x.is_fully_addressable for x in params.values())
      assert all(x.sharding.spec == P(*SPECS[k]) for k, x in params.items())
      gathered = multihost_utils.process_allgather(params, tiled=True)
      results.update({f"{method}/{k}": np.asarray(v) for k, v in gathered.items()})
  if jax.process_index() == 0:
    np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  main()
