"""Fail when a public name of omerge_jax is missing from the API reference.

Run after the HTML build (``make docs`` does)::

    python docs/check_api.py [docs/_build/html/objects.inv]

The documented names are read from the build's object inventory (every
``autofunction``, ``autoclass``, ``autodata`` and ``automodule`` of the API
pages is there). The public names are:

* ``omerge_jax.__all__``: each function or class as ``omerge_jax.<name>``,
  each module as a documented module;
* every name that a public module (`PUBLIC_MODULES`) defines at top level
  (``def``, ``class`` or an assignment) and that does not start with ``_``.

It also fails when the pages document an ``omerge_jax`` name that is no longer
public (removed, renamed or made private), when a function or class of an
implementation module (`IMPLEMENTATION_MODULES`) is neither private nor
exported in ``__all__``, and when a new submodule is neither private nor listed
here (decide whether it is public, then document it).
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import sys
import types
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

PACKAGE = "omerge_jax"
# Documented module by module (docs/api/<module>.rst).
PUBLIC_MODULES = ("sparsify", "consensus", "trim", "offline", "checkpoint")
# Their public functions and classes are exported in omerge_jax.__all__ and
# documented there (docs/api/omerge_jax.rst).
IMPLEMENTATION_MODULES = ("alias", "delta", "transform")
# Roles of objects documented at module level (not class members).
_TOP_LEVEL_ROLES = {"py:module", "py:function", "py:class", "py:data", "py:exception"}
_LINE = re.compile(r"(?x)(.+?)\s+(\S+:\S+)\s+(-?\d+)\s+(\S*)\s+(.*)")


def documented(inventory: Path) -> dict[str, tuple[str, str]]:
  """``{name: (role, uri)}`` of the Python objects in a Sphinx inventory (objects.inv, v2)."""
  data = inventory.read_bytes()
  header_end = 0
  for _ in range(4):  # "# Sphinx inventory version 2", project, version, compression note
    header_end = data.index(b"\n", header_end) + 1
  if not data.startswith(b"# Sphinx inventory version 2"):
    raise SystemExit(f"{inventory}: not a Sphinx inventory of version 2")
  objects = {}
  for line in zlib.decompress(data[header_end:]).decode("utf-8").splitlines():
    match = _LINE.match(line)
    if match and match.group(2).startswith("py:"):
      name, role, uri = match.group(1), match.group(2), match.group(4)
      objects[name] = (role, uri.replace("$", name) if uri.endswith("$") else uri)
  return objects


def defined_names(module_name: str) -> dict[str, str]:
  """Top-level public names of a module's source: ``{name: "function"|"class"|"data"}``."""
  module = importlib.import_module(f"{PACKAGE}.{module_name}")
  tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
  names = {}
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      names[node.name] = "function"
    elif isinstance(node, ast.ClassDef):
      names[node.name] = "class"
    elif isinstance(node, ast.Assign):
      for target in node.targets:
        if isinstance(target, ast.Name):
          names[target.id] = "data"
    elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      names[node.target.id] = "data"
  return {name: kind for name, kind in names.items() if not name.startswith("_")}


def problems(objects: dict[str, tuple[str, str]]) -> list[str]:
  package = importlib.import_module(PACKAGE)
  found = []
  expected = {PACKAGE}

  submodules = sorted(m.name for m in pkgutil.iter_modules(package.__path__))
  for name in submodules:
    if not name.startswith("_") and name not in PUBLIC_MODULES + IMPLEMENTATION_MODULES:
      found.append(
        f"{PACKAGE}.{name}: a new submodule; add it to PUBLIC_MODULES (and document it in "
        f"docs/api/{name}.rst) or to IMPLEMENTATION_MODULES in docs/check_api.py, or make "
        "it private (_name)"
      )

  for name in package.__all__:
    value = getattr(package, name)
    if isinstance(value, types.ModuleType):
      if name not in PUBLIC_MODULES:
        found.append(f"{PACKAGE}.__all__ lists the module {name!r}, which is not in PUBLIC_MODULES")
      continue
    expected.add(f"{PACKAGE}.{name}")

  for module_name in IMPLEMENTATION_MODULES:
    for name, kind in defined_names(module_name).items():
      if kind != "data" and name not in package.__all__:
        found.append(
          f"{PACKAGE}.{module_name}.{name}: public but neither exported in "
          f"{PACKAGE}.__all__ nor private"
        )

  for module_name in PUBLIC_MODULES:
    expected.add(f"{PACKAGE}.{module_name}")
    expected.update(f"{PACKAGE}.{module_name}.{name}" for name in defined_names(module_name))

  for name in sorted(expected):
    if name not in objects:
      parts = name.split(".")
      page = parts[1] if len(parts) > 1 and parts[1] in PUBLIC_MODULES else PACKAGE
      found.append(f"{name}: not documented (add it to docs/api/{page}.rst)")
    elif name.count(".") == 1 and name.split(".")[1] in PUBLIC_MODULES:
      if objects[name][0] != "py:module":
        found.append(f"{name}: documented as {objects[name][0]}, expected a module (automodule)")

  # A class documented as omerge_jax.X also has its canonical name (where it
  # is defined, omerge_jax.transform.X) in the inventory, at the same address.
  addresses = {objects[name][1] for name in expected if name in objects}
  for name, (role, uri) in sorted(objects.items()):
    if role not in _TOP_LEVEL_ROLES or name.split(".")[0] != PACKAGE or name in expected:
      continue
    if uri not in addresses:
      found.append(f"{name}: documented ({role}) but not public (removed, renamed or private?)")
  return found


def main(argv: list[str]) -> int:
  inventory = Path(argv[1]) if len(argv) > 1 else ROOT / "docs" / "_build" / "html" / "objects.inv"
  if not inventory.is_file():
    print(f"{inventory} not found: build the HTML first (make docs)", file=sys.stderr)
    return 2
  objects = documented(inventory)
  found = problems(objects)
  if found:
    print(f"API reference check FAILED ({len(found)}):", file=sys.stderr)
    for line in found:
      print(f"  {line}", file=sys.stderr)
    return 1
  print(
    f"API reference check passed: the {len(objects)} Python objects documented cover "
    f"{PACKAGE}.__all__ and the public names of {', '.join(PUBLIC_MODULES)}."
  )
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
