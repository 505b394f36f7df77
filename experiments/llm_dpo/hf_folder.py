"""Hugging Face model folders: read the tensor list, write sharded ``*.safetensors`` and config.

Shared by the export of a trained policy (`experiments.llm_dpo.export`) and
the offline merge of checkpoints (`experiments.llm_merge`). Files are written
as ``save_pretrained`` writes them: ``model.safetensors``, or shards
``model-0000i-of-0000n.safetensors`` of at most ``max_shard_size`` bytes
with a ``model.safetensors.index.json``. Each file is streamed one tensor at
a time (the safetensors header is known from shapes and dtypes alone), so a
host holds one tensor, not a shard.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import shutil
import struct
from typing import Callable

import ml_dtypes
import numpy as np

# The dtypes written (config.json names): safetensors header codes and NumPy types.
DTYPES = {
  "float32": ("F32", np.float32),
  "bfloat16": ("BF16", ml_dtypes.bfloat16),
  "float16": ("F16", np.float16),
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
_UNITS = {
  "": 1,
  "B": 1,
  "KB": 10**3,
  "MB": 10**6,
  "GB": 10**9,
  "TB": 10**12,
  "KIB": 2**10,
  "MIB": 2**20,
  "GIB": 2**30,
  "TIB": 2**40,
}


def parse_size(text: int | str) -> int:
  """``"5GB"``, ``"500MiB"``, ``"2000"`` -> bytes (Hugging Face's ``max_shard_size``)."""
  match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
  if not match or match.group(2).upper() not in _UNITS:
    raise ValueError(f"size {text!r} must look like 5GB, 500MiB or a number of bytes")
  return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def read_header(folder) -> dict[str, tuple[tuple[int, ...], str]]:
  """Every tensor of the folder's ``*.safetensors``: name -> (shape, dtype code), file order."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  tensors = {}
  for path in sorted(pathlib.Path(folder).glob("*.safetensors")):
    with safe_open(path, framework="numpy") as f:
      for name in f.keys():
        block = f.get_slice(name)
        tensors[name] = (tuple(block.get_shape()), block.get_dtype())
  return tensors


def default_dtype(config: dict, header: dict) -> str:
  """A checkpoint's dtype: its ``config.json``'s, else that of its first tensor."""
  name = config.get("torch_dtype") or config.get("dtype")
  if name in DTYPES:
    return name
  code = next(iter(header.values()))[1]
  for name, (c, _) in DTYPES.items():
    if c == code:
      return name
  raise ValueError(f"tensors of dtype {code} are not supported; expected one of {sorted(DTYPES)}")


def plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
  """Tensors in order, a new shard whenever the next would pass ``max_shard_size``.

  As Hugging Face splits: a tensor larger than the bound gets a shard of its own.
  """
  shards, current, total = [], [], 0
  for name, size in sizes.items():
    if current and total + size > max_shard_size:
      shards.append(current)
      current, total = [], 0
    current.append(name)
    total += size
  return shards + [current] if current else shards


def write_safetensors(
  out,
  shapes: dict[str, tuple[int, ...]],
  dtype: str,
  produce: Callable[[str], np.ndarray],
  *,
  max_shard_size: int | str = "5GB",
  write: bool = True,
) -> dict[str, int]:
  """Write tensors ``produce(name)`` for each of ``shapes``, in that order, as ``dtype``.

  Args:
    out: the folder (created).
    shapes: name -> shape of every tensor, in the order written.
    dtype: a key of `DTYPES`; each tensor is cast to it.
    produce: returns one tensor; called once per name, in order, even when
      ``write`` is false (it may be a collective every process takes part in).
    max_shard_size: bound of one file (bytes or ``"5GB"``).
    write: whether this process writes (process 0 of a multi-host job).

  Returns:
    file name -> size in bytes of each file written.
  """
  code, np_dtype = DTYPES[dtype]
  itemsize = np.dtype(np_dtype).itemsize
  sizes = {n: math.prod(s) * itemsize for n, s in shapes.items()}
  shards = plan_shards(sizes, parse_size(max_shard_size))
  out = pathlib.Path(out)
  if write:
    out.mkdir(parents=True, exist_ok=True)
  files, weight_map = {}, {}
  for i, shard in enumerate(shards):
    file = (
      "model.safetensors"
      if len(shards) == 1
      else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    )
    header, start = {"__metadata__": {"format": "pt"}}, 0
    for name in shard:
      header[name] = {
        "dtype": code,
        "shape": list(shapes[name]),
        "data_offsets": [start, start + sizes[name]],
      }
      start += sizes[name]
      weight_map[name] = file
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(out / file, "wb") if write else _Discard() as f:
      f.write(struct.pack("<Q", len(text)) + text)
      for name in shard:
        value = np.asarray(produce(name))
        if value.shape != tuple(shapes[name]):
          raise ValueError(f"{name}: got shape {value.shape}, expected {tuple(shapes[name])}")
        value = np.ascontiguousarray(value.astype(np_dtype, copy=False))
        # The array's own bytes, not a copy (a uint8 view has a buffer for any dtype).
        f.write(value.reshape(-1).view(np.uint8).data)
    if write:
      files[file] = (out / file).stat().st_size
  if write and len(shards) > 1:
    index = {
      "metadata": {"total_size": sum(sizes.values())},
      "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
  return files


class _Discard:
  """A file that writes nothing (processes other than the writer)."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    del exc

  def write(self, data):
    del data


def copy_config_and_tokenizer(source, out, dtype: str) -> None:
  """``source``'s ``config.json`` (``torch_dtype`` set to ``dtype``) and its other non-weight files."""
  source, out = pathlib.Path(source), pathlib.Path(out)
  config = json.loads((source / "config.json").read_text())
  config["torch_dtype"] = dtype
  if "dtype" in config:  # transformers >= 4.56 writes `dtype`
    config["dtype"] = dtype
  out.mkdir(parents=True, exist_ok=True)
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  for path in source.iterdir():
    if (
      path.is_file()
      and path.name != "config.json"
      and not path.name.endswith(".index.json")
      and not path.name.endswith(_WEIGHT_SUFFIXES)
    ):
      shutil.copyfile(path, out / path.name)
