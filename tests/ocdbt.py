"""Where an Orbax item's array values lie in its OCDBT files, and a flip inside one.

Tests that spoil checkpoint bytes on purpose share these: a restore reads
only the values the item's index refers to, and where a data file's middle
falls depends on the order Orbax wrote the values in, so a flip aimed at a
file's middle sometimes lands in a small zstd stream that then fails to
decode (an error, where these tests want bytes that decode to other numbers)
or in bytes a restore never reads.
"""

from __future__ import annotations

import pathlib


def values(item_dir: pathlib.Path) -> list[tuple[bytes, pathlib.Path, int, int]]:
  """``(key, data file, offset, length)`` of each value the item's top-level OCDBT index refers to.

  From TensorStore's dump of the index: a restore reads these, and only
  these (values under 1 KB live inline in the index itself).
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  base = ts.KvStore.open(f"file://{item_dir}/").result()
  pending = [ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]]
  found = []
  while pending:
    for entry in ts.ocdbt.dump(base, pending.pop()).result()["entries"]:
      if "indirect_value" in entry:  # "value:<prefix>:<file>:<offset>:<length>"
        _, prefix, file, offset, length = entry["indirect_value"].split(":")
        found.append((entry["key"], item_dir / prefix / file, int(offset), int(length)))
      elif str(entry.get("location", "")).startswith("btreenode:"):  # an interior node
        pending.append(entry["location"])
  return found


def flip_largest_value(item_dir: pathlib.Path, process: int | None = None) -> bytes:
  """Flip 16 bytes in the middle of the item's largest value (of ``process``'s data, if given).

  The value (a chunk of the largest array, ties by key) is chosen from the
  index, so the same bytes are flipped in every run whatever order Orbax
  wrote the values in. Returns the value's key.
  """
  found = values(item_dir)
  if process is not None:
    found = [v for v in found if f"ocdbt.process_{process}/" in str(v[1])]
  key, path, offset, length = max(found, key=lambda v: (v[3], v[0]))
  flip(path, offset + length // 2)
  return key


def flip(path: pathlib.Path, at: int | None = None):
  """Flip (invert) 16 bytes of the file at ``path`` from byte ``at`` (its middle if None)."""
  data = bytearray(path.read_bytes())
  at = len(data) // 2 if at is None else at
  data[at : at + 16] = bytes(255 - b for b in data[at : at + 16])
  path.write_bytes(bytes(data))
