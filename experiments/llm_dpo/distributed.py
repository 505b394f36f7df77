"""The processes of a (multi-host) job and the mesh over their devices.

Shared by the LLM scripts (`experiments.llm_dpo.train`, `.export`,
`experiments.llm_grpo`): ``--distributed`` and its coordinates, and
``--mesh fsdp=N,tp=M``.
"""

from __future__ import annotations

import argparse

import jax


def add_args(p: argparse.ArgumentParser) -> None:
  """``--distributed`` and, where JAX cannot detect them, the coordinates of this process."""
  p.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() (multi-host pods and clusters)",
  )
  p.add_argument("--coordinator", help="host:port of process 0 (GPU clusters without SLURM)")
  p.add_argument("--num-processes", type=int)
  p.add_argument("--process-id", type=int)


def start(args) -> None:
  """Join the processes of a multi-host job when ``--distributed`` is given."""
  if args.distributed:
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def make_mesh(spec: str | None) -> jax.sharding.Mesh:
  """``"fsdp=N,tp=M"`` -> a mesh of all devices (N*M of them) with those axes."""
  sizes = {"fsdp": jax.device_count(), "tp": 1}
  if spec:
    sizes = {"fsdp": 1, "tp": 1}
    for part in spec.split(","):
      name, _, value = part.partition("=")
      if name not in sizes or not value.isdigit():
        raise ValueError(f"--mesh must look like fsdp=N,tp=M, got {spec!r}")
      sizes[name] = int(value)
  if sizes["fsdp"] * sizes["tp"] != jax.device_count():
    raise ValueError(
      f"--mesh {sizes} needs {sizes['fsdp'] * sizes['tp']} devices, there are {jax.device_count()}"
    )
  # Auto axes: Tunix's models place their activations with sharding constraints.
  return jax.make_mesh(
    (sizes["fsdp"], sizes["tp"]), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
