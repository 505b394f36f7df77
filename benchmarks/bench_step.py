"""Step time and state memory of OnDARE / OnTIES against `optax.adamw`, on CPU.

Run `python benchmarks/bench_step.py` (about 10 minutes on 2 cores; `--quick`
for a 2-minute smoke run). It runs, in turn, `step_time` (16.8M params),
`state_memory`, `step_scaling` (more params, more leaves) and `step_mesh` (8
simulated devices), prints the figures, writes them to
`benchmarks/results.json` and rewrites `benchmarks/RESULTS.md` (`report`).
`--render` rewrites RESULTS.md from the JSON files alone, timing nothing.

How a step is timed: `harness`.
"""

from __future__ import annotations

import argparse
import json

import report
import state_memory
import step_mesh
import step_scaling
import step_time
from harness import machine, make_tree


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (smoke run)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, quick 7)")
  parser.add_argument("--no-write", action="store_true", help="print only, keep RESULTS.md")
  parser.add_argument(
    "--render", action="store_true", help="rewrite RESULTS.md from results.json, no timing"
  )
  args = parser.parse_args()
  if args.render:
    report.main()
    return
  rounds = args.rounds or (7 if args.quick else 9)
  sizes = [1 << 20, 1 << 22, 1 << 24] if args.quick else [1 << 20, 1 << 22, 1 << 24, 1 << 26]
  info = machine()
  print(json.dumps(info))

  params = make_tree(step_time.SIZE, 0)
  tau = make_tree(step_time.SIZE, 1, scale=0.01)
  grad_sets = [make_tree(step_time.SIZE, 10 + j) for j in range(3)]
  step = step_time.run(params, tau, grad_sets, rounds)
  memory = state_memory.table(params, tau)
  del params, tau, grad_sets

  scaling = step_scaling.scaling(sizes, max(5, rounds - 2))
  leaf_counts = step_scaling.leaf_counts(
    step_time.SIZE, [16] if args.quick else [16, 64], max(5, rounds - 2)
  )
  slopes = step_scaling.slopes(sizes, scaling)

  mesh_rows = 256 if args.quick else 1024
  mesh = step_mesh.run(mesh_rows, rounds)
  print("8-device mesh:", mesh)

  raw = dict(
    machine=info,
    **step,
    leaf_counts={str(n): v for n, v in leaf_counts.items()},
    memory=memory,
    scaling={str(n): v for n, v in scaling.items()},
    slopes=slopes,
    mesh=mesh,
    rounds=rounds,
    mesh_rows=mesh_rows,
    quick=args.quick,
  )
  if args.no_write:
    print(report.render(raw))
    return
  with open(report.RESULTS, "w") as f:
    json.dump(raw, f, indent=1)
  print(report.write(raw))


if __name__ == "__main__":
  main()
