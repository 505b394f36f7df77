"""What the checkpoint digests cost: seconds per GB, and their share of an Orbax save.

    python benchmarks/bench_digest.py            # 1 GiB of state (about 2 minutes on 2 cores)
    python benchmarks/bench_digest.py --quick    # 64 MiB

The state is `omerge_jax.ondare`'s on a (4, 2) mesh of 8 simulated CPU
devices (params, Adam's two moments, the reference delta: four float32
copies of the params, 4 leaves each). Timed, each the median of ``--rounds``
after one untimed call: `omerge_jax.checkpoint.digests` (at save),
`omerge_jax.checkpoint.verify` of the same arrays (at resume), and Orbax's
`StandardCheckpointer` save (to the end of its commit) and restore of the same
state into a folder under ``--dir``. Writes `benchmarks/digest.json`;
`section()` renders it for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
from harness import last_run, machine, tree_bytes  # noqa: E402
import omerge_jax  # noqa: E402
from omerge_jax import checkpoint  # noqa: E402

JSON = os.path.join(HERE, "digest.json")


def state(total_bytes: int):
  """ondare's params and state, ``total_bytes`` in all, on a (4, 2) mesh."""
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rows = total_bytes // 4 // 4 // 4 // 1024  # 4 copies, 4 leaves, float32, 1024 columns
  sharding = NamedSharding(mesh, P("fsdp", "tp"))
  make = jax.jit(
    lambda seed: jax.random.normal(jax.random.key(seed), (rows, 1024)), out_shardings=sharding
  )
  params = {f"w{i}": make(i) for i in range(4)}
  tau = {k: v * 0.01 for k, v in params.items()}
  tx = omerge_jax.ondare(1e-5, tau, reserve_p=0.1)
  return {"params": params, "opt_state": tx.init(params)}


def timed(fn, rounds):
  fn()  # compiles
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv=None):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="64 MiB of state instead of 1 GiB")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--dir", default=tempfile.gettempdir(), help="where the checkpoints are written")
  args = p.parse_args(argv)
  info = machine()
  tree = state((64 if args.quick else 1024) * 2**20)
  jax.block_until_ready(tree)
  gigabytes = tree_bytes(tree) / 1e9
  saved = checkpoint.digests(tree)
  folder = tempfile.mkdtemp(dir=args.dir)
  checkpointer = ocp.StandardCheckpointer()
  n = iter(range(10**6))
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

  def save():
    checkpointer.save(os.path.join(folder, str(next(n))), tree)
    checkpointer.wait_until_finished()

  def restore():
    jax.block_until_ready(checkpointer.restore(os.path.join(folder, "0"), target))

  try:
    seconds = {
      "digests": timed(lambda: checkpoint.digests(tree), args.rounds),
      "verify": timed(lambda: checkpoint.verify(tree, saved), args.rounds),
      "orbax_save": timed(save, args.rounds),
      "orbax_restore": timed(restore, args.rounds),
    }
  finally:
    shutil.rmtree(folder, ignore_errors=True)
  out = {
    "machine": info,
    "devices": jax.device_count(),
    "gigabytes": gigabytes,
    "leaves": len(jax.tree.leaves(tree)),
    "rounds": args.rounds,
    "seconds": seconds,
  }
  with open(JSON, "w") as f:
    json.dump(out, f, indent=1)
  print(render(out))


def render(out) -> str:
  s, gb, info = out["seconds"], out["gigabytes"], out["machine"]
  per_gb = lambda name: s[name] / gb
  return "\n".join(
    [
      f"## Checkpoint digests ({gb:.2f} GB of state, {out['leaves']} arrays)",
      "",
      f"Written by `python benchmarks/bench_digest.py`: {info['cpu']}, {info['cores']} cores, "
      f"{out['devices']} simulated devices (a (4, 2) mesh), load average at start "
      f"{tuple(round(x, 2) for x in info['load_average_at_start'])}, jax {info['jax']}, "
      f"{info['date_utc']} UTC; median of {out['rounds']}. One program digests every shard "
      "of every array; verify compares the shards each process holds.",
      "",
      "| | seconds | s/GB | share of the Orbax save |",
      "|---|---:|---:|---:|",
      *(
        f"| {name} | {s[name]:.3f} | {per_gb(name):.2f} | {s[name] / s['orbax_save']:.0%} |"
        for name in ("digests", "verify", "orbax_save", "orbax_restore")
      ),
      "",
    ]
  )


def section():
  """`render` of the last run (`digest.json`), or "" when there is none."""
  out = last_run(JSON)
  return render(out) if out else ""


if __name__ == "__main__":
  main()
