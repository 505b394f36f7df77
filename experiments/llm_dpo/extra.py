"""The ``tunix`` extra of the LLM commands, checked once their flags are parsed.

``--help`` needs only the ``experiments`` extra; a command run without the
``tunix`` extra exits with one line naming what to install, not a traceback
from the first import that needs it.
"""

from __future__ import annotations

import importlib

# What the `tunix` extra brings that the commands import (transformers comes with google-tunix).
MODULES = ("tunix", "transformers", "safetensors")
INSTALL = "pip install -e '.[tunix]'"


def require(command: str, modules=MODULES) -> None:
  """Exit with one line naming `INSTALL` when one of ``modules`` cannot be imported.

  Args:
    command: the command, as its user typed it (``experiments.llm_dpo``).
    modules: the modules of the extra that ``command`` needs.

  Raises:
    SystemExit: a module is missing (Python prints the message, exit status 1).
  """
  missing = []
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError:
      missing.append(name)
  if missing:
    raise SystemExit(
      f"{command} needs the tunix extra ({', '.join(missing)} cannot be imported): {INSTALL}"
    )
