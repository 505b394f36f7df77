"""Memory traffic of a compiled XLA executable, op by op, from its optimised HLO.

`compiled.cost_analysis()` gives one total of "bytes accessed". On TPU that
total is the sum, over the executable's top-level ops, of the bytes each op
reads and writes *in whatever memory they live in*: the compiler's
memory-space assignment moves many buffers into VMEM (the chip's on-chip
scratch, printed ``S(1)`` in a layout) and prefetches into it with
``copy-start`` / ``slice-start``, so a buffer read from HBM into VMEM and then
by a fusion is counted twice. This module reads `compiled.as_text()` and
splits every op's traffic by memory space, so that the HBM part, which is
what a memory-bound step pays, can be read on its own:

* every instruction of the entry computation and of the computations it runs
  (``while`` bodies and conditions, ``conditional`` branches, async starts),
  not the ops inside a fusion (a fusion is one pass over its operands);
* an op's bytes are its operands' and its outputs' array sizes (the tiled
  layout's padding is not counted), per memory space: ``hbm`` (no ``S(n)``
  or ``S(0)``), ``vmem`` (``S(1)``) and ``other`` (``S(2)`` and up: sync flags,
  SMEM scalars);
* a ``copy-start`` / ``slice-start`` counts its source and destination once;
  ``copy-done`` / ``slice-done`` and other bookkeeping ops (``bitcast``,
  ``get-tuple-element``, ``tuple``, ``parameter``, ``constant``) move nothing;
* a ``while`` body is weighted by the loop's ``known_trip_count``; a
  ``conditional`` is reported for its cheapest and its dearest branch;
* a gather or dynamic-slice fusion operand counts the whole operand, as the
  TPU compiler does (it stages the operand: `README` of the plan benchmark);
  ``moved`` counts only the gathered elements, as a lower bound.

The TPU backend also writes each op's ``estimated_cycles`` into its
``backend_config``; they are summed the same way (the compiler's own timing
model, not a measurement).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

_DTYPE_BYTES = {
  "pred": 1,
  "s4": 0.5,
  "u4": 0.5,
  "s8": 1,
  "u8": 1,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "token": 0,
}
# Ops that only rename, bundle or finish a buffer another op moved.
_FREE = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "copy-done",
  "slice-done",
  "after-all",
  "partition-id",
  "replica-id",
  "all-reduce-done",
  "all-gather-done",
  "collective-permute-done",
  "async-done",
  "opt-barrier",
  "add-dependency",
  "domain",
}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](?:\{([^}]*)\})?")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTR = re.compile(r"^\s*(ROOT )?%(\S+) = (.*)$")


@dataclasses.dataclass
class Op:
  name: str
  opcode: str
  computation: str
  weight: float  # how many times the op runs per step (while trip counts)
  read: dict  # memory space -> bytes read
  written: dict  # memory space -> bytes written
  moved: float  # bytes a gather / dynamic-slice really touches (else = its HBM traffic)
  cycles: float  # the TPU compiler's estimated_cycles, 0 when absent
  label: str  # op_name metadata, for the tables
  inner: frozenset = frozenset()  # opcodes inside a fusion (and the fusions it calls)


def _space(layout):
  m = re.search(r"S\((\d+)\)", layout or "")
  n = int(m.group(1)) if m else 0
  return "hbm" if n == 0 else "vmem" if n == 1 else "other"


def _arrays(shape_text):
  """(bytes, memory space) of every array in an HLO shape string."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape_text):
    if dtype not in _DTYPE_BYTES:
      continue
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    out.append((n * _DTYPE_BYTES[dtype], _space(layout)))
  return out


def _closing(text, depth):
  """Index in ``text`` of the ")" that brings ``depth`` open brackets to 0 (else the last index)."""
  for i, ch in enumerate(text):
    depth += ch == "("
    depth -= ch == ")"
    if depth == 0:
      return i
  return max(len(text) - 1, 0)


def _split_shape(rest):
  """``rest`` = 'SHAPE opcode(operands), attrs': the shape, the opcode and the rest."""
  if rest.startswith("("):
    i = _closing(rest, 0)
    shape, tail = rest[: i + 1], rest[i + 1 :].lstrip()
  else:
    shape, _, tail = rest.partition(" ")
  opcode, _, tail = tail.partition("(")
  j = _closing(tail, 1)
  return shape, opcode, tail[:j], tail[j + 1 :]


def parse(hlo_text):
  """Computations of an HLO module: name -> list of (name, shape, opcode, operands, attrs)."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    m = _INSTR.match(line)
    if m and current is not None:
      shape, opcode, operands, attrs = _split_shape(m.group(3))
      names = re.findall(r"%([\w.\-]+)", operands) if opcode != "parameter" else operands
      computations[current].append((m.group(2), shape, opcode, names, attrs))
  return computations, entry


def _fused_moved(computations, called, operand_bytes):
  """Bytes a fusion really reads of each operand: gathers/dynamic-slices read their output's size."""
  body = computations.get(called, [])
  index_of = {}
  for name, _shape, opcode, operands, _attrs in body:
    if opcode == "parameter":
      m = re.match(r"\s*(\d+)", operands)
      index_of[name] = int(m.group(1)) if m else None
  users = {}
  for _name, shape, opcode, operands, _attrs in body:
    for o in operands:
      users.setdefault(o, []).append((opcode, shape, operands))
  moved = list(operand_bytes)
  for pname, idx in index_of.items():
    if idx is None or idx >= len(moved):
      continue
    uses = users.get(pname, [])
    if uses and all(op in ("gather", "dynamic-slice") and ops[0] == pname for op, _, ops in uses):
      moved[idx] = sum(sum(b for b, _ in _arrays(shape)) for _, shape, _ in uses)
  return moved


def _inner_opcodes(computations, called, seen=None):
  seen = set() if seen is None else seen
  if called in seen:
    return frozenset()
  seen.add(called)
  found = set()
  for _, _, opcode, _, attrs in computations.get(called, []):
    found.add(opcode)
    for sub in re.findall(r"calls=%([\w.\-]+)", attrs):
      found |= _inner_opcodes(computations, sub, seen)
  return frozenset(found)


def _trip_count(attrs):
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
  return int(m.group(1)) if m else 1


def ops(hlo_text, branch="dearest"):
  """Every op the executable runs, weighted; ``branch`` picks conditional branches."""
  computations, entry = parse(hlo_text)
  shapes = {name: shape for comp in computations.values() for name, shape, *_ in comp}
  out = []

  def walk(comp, weight):
    for name, shape, opcode, operands, attrs in computations.get(comp, []):
      called = re.findall(r"(?:calls|body|condition|to_apply)=%([\w.\-]+)", attrs)
      if opcode == "while":
        trips = _trip_count(attrs)
        body = re.search(r"body=%([\w.\-]+)", attrs).group(1)
        cond = re.search(r"condition=%([\w.\-]+)", attrs).group(1)
        walk(body, weight * trips)
        walk(cond, weight * (trips + 1))
        continue
      if opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", attrs)
        names = re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
        if not names:
          names = re.findall(r"(?:true|false)_computation=%([\w.\-]+)", attrs)
        costs = []
        for b in names:
          sub = []
          walk_into(b, weight, sub)
          costs.append(
            (
              sum(o.read.get("hbm", 0) + o.written.get("hbm", 0) for o in sub)
              + 1e-9 * sum(o.cycles for o in sub),
              sub,
            )
          )
        costs.sort(key=lambda c: c[0])
        if costs:
          out.extend((costs[-1] if branch == "dearest" else costs[0])[1])
        continue
      if opcode in ("async-start", "call") and called:
        walk(called[0], weight)
        continue
      if opcode in _FREE:
        continue
      read, written = {}, {}
      operand_arrays = [_arrays(shapes.get(o, "")) for o in operands]
      if opcode in ("copy-start", "slice-start"):
        # Output tuple (destination, source, context): count destination and source once.
        arrays = _arrays(shape)
        dst = arrays[1] if opcode == "slice-start" and len(arrays) > 2 else arrays[0]
        src_bytes = dst[0]
        src_space = operand_arrays[0][0][1] if operand_arrays and operand_arrays[0] else "hbm"
        read[src_space] = src_bytes
        written[dst[1]] = dst[0]
        moved = src_bytes
      else:
        operand_bytes = [sum(b for b, _ in arrs) for arrs in operand_arrays]
        for arrs in operand_arrays:
          for b, space in arrs:
            read[space] = read.get(space, 0) + b
        for b, space in _arrays(shape):
          written[space] = written.get(space, 0) + b
        moved = sum(read.values()) + sum(written.values())
        if opcode in ("gather", "dynamic-slice"):
          moved = 2 * sum(written.values())
        elif opcode == "fusion" and called:
          moved = sum(_fused_moved(computations, called[0], operand_bytes)) + sum(written.values())
      cycles = re.search(r'"estimated_cycles":"(\d+)"', attrs)
      label = re.search(r'op_name="([^"]*)"', attrs)
      out.append(
        Op(
          name,
          opcode,
          comp,
          weight,
          read,
          written,
          moved * weight,
          float(cycles.group(1)) if cycles else 0.0,
          label.group(1) if label else "",
          _inner_opcodes(computations, called[0]) if opcode == "fusion" and called else frozenset(),
        )
      )

  def walk_into(comp, weight, sink):
    nonlocal out
    saved, out = out, sink
    walk(comp, weight)
    out = saved

  walk(entry, 1)
  return out


def category(op):
  """A coarse name for the tables: what kind of work the op is."""
  kinds = {op.opcode} | set(op.inner)
  for key in (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "collective-permute",
    "scatter",
    "gather",
    "sort",
    "reduce-window",
    "dynamic-slice",
    "dynamic-update-slice",
    "reduce",
    "copy-start",
    "slice-start",
  ):
    if key in kinds or f"{key}-start" in kinds:
      return key if op.opcode != "fusion" else f"{key} fusion"
  return "elementwise fusion" if op.opcode == "fusion" else op.opcode


def summary(compiled, branch="dearest"):
  """Per-chip totals of one compiled executable, plus the compiler's own figures."""
  listing = ops(compiled.as_text(), branch)
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  mem = compiled.memory_analysis()
  total = lambda key, space: sum(getattr(o, key).get(space, 0) * o.weight for o in listing)
  by_category = {}
  for o in listing:
    c = by_category.setdefault(category(o), {"count": 0, "hbm": 0.0, "all": 0.0, "cycles": 0.0})
    c["count"] += o.weight
    c["hbm"] += (o.read.get("hbm", 0) + o.written.get("hbm", 0)) * o.weight
    c["all"] += (sum(o.read.values()) + sum(o.written.values())) * o.weight
    c["cycles"] += o.cycles * o.weight
  return {
    "hbm_read": total("read", "hbm"),
    "hbm_written": total("written", "hbm"),
    "hbm_bytes": total("read", "hbm") + total("written", "hbm"),
    "all_spaces_bytes": sum(
      (sum(o.read.values()) + sum(o.written.values())) * o.weight for o in listing
    ),
    "estimated_cycles": sum(o.cycles * o.weight for o in listing),
    "cost_model_bytes": float(cost.get("bytes accessed", 0.0)),
    "cost_model_seconds": float(cost.get("optimal_seconds", 0.0)),
    "flops": float(cost.get("flops", 0.0)),
    "argument_bytes": mem.argument_size_in_bytes,
    "output_bytes": mem.output_size_in_bytes,
    "alias_bytes": mem.alias_size_in_bytes,
    "temp_bytes": mem.temp_size_in_bytes,
    "ops": len(listing),
    "by_category": by_category,
  }


if __name__ == "__main__":  # python benchmarks/hlo_traffic.py FILE.hlo: the op table of a dump
  import sys

  listing = ops(open(sys.argv[1]).read())
  rows = sorted(listing, key=lambda o: -(o.read.get("hbm", 0) + o.written.get("hbm", 0)) * o.weight)
  for o in rows[:40]:
    print(
      json.dumps(
        {
          "op": o.name,
          "kind": category(o),
          "x": o.weight,
          "read": o.read,
          "written": o.written,
          "cycles": o.cycles,
          "label": o.label[:60],
        }
      )
    )
