"""TPU devices without a TPU: ahead-of-time compilation for a named topology.

With ``libtpu`` installed (``pip install "jax[tpu]==<jax's version>"``), the
TPU compiler runs on a CPU machine: `devices` gives the devices of a
topology such as ``"v5e:2x2"`` and ``jax.jit(f).lower(abstract args).compile()``
compiles for them (the mechanism MaxText's ``train_compile.py`` uses). The
result is the compiler's plan (buffer assignment, HLO, cost model), not a
measurement: nothing runs.
"""

from __future__ import annotations

import dataclasses
import functools
import os

# libtpu takes a lockfile that one process at a time may hold: let several
# compiling processes (and the test suite) share the compiler.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Chip:
  """Public per-chip figures of a TPU generation (Google Cloud's TPU pages)."""

  name: str
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s
  bf16_flops: float  # peak, per second
  clock_hz: float  # to turn the compiler's estimated_cycles into seconds


CHIPS = {
  "v5e": Chip("TPU v5e", 16 * 2**30, 819e9, 197e12, 1.5e9),
  "v5p": Chip("TPU v5p", 95 * 2**30, 2765e9, 459e12, 1.75e9),
}


def available() -> bool:
  """Whether libtpu (the TPU compiler) is installed."""
  try:
    import libtpu  # noqa: F401
  except ImportError:
    return False
  return True


def chip(topology: str) -> Chip:
  return CHIPS[topology.split(":")[0]]


@functools.cache
def devices(topology: str):
  """The devices of ``topology`` (e.g. ``"v5e:2x2"``, ``"v5p:4x4x4"``), for AOT compilation."""
  from jax.experimental import topologies

  dims = [int(d) for d in topology.split(":")[1].split("x")]
  # A host holds up to 2x2 chips on both generations.
  per_host = (min(2, dims[0]), min(2, dims[1]), 1)
  desc = topologies.get_topology_desc(
    platform="tpu",
    topology_name=topology,
    chip_config_name="default",
    chips_per_host_bounds=per_host,
    num_slices=1,
  )
  return tuple(desc.devices)


def mesh(topology: str, axes: dict) -> Mesh:
  """A mesh over the topology's chips, ``axes`` = {name: size} (sizes multiply to the chip count)."""
  devs = devices(topology)
  sizes = tuple(axes.values())
  if int(np.prod(sizes)) != len(devs):
    raise ValueError(f"mesh {axes} does not cover the {len(devs)} chips of {topology}")
  return Mesh(np.array(devs).reshape(sizes), tuple(axes))


def abstract(tree, shardings):
  """``tree`` (arrays or ShapeDtypeStructs) as ShapeDtypeStructs carrying ``shardings``."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )
