"""The LLM commands (and the real-LM protocol) without the ``tunix`` extra: usage for ``--help``, else one install line.

One subprocess, where the modules the extra brings (`experiments.llm_dpo.extra.MODULES`)
cannot be imported (``sys.modules[name] = None``), runs each command as
``python -m`` would (``runpy``), once with ``--help`` and once with flags that
would start work. An uncaught exception there fails the test with its traceback.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

from experiments.llm_dpo import extra

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = {
  "experiments.llm_dpo": "--base b --sft s --data d.jsonl --out o --steps 1",
  "experiments.llm_grpo": "--base b --sft s --prompts p.jsonl --reward exact_answer "
  "--out o --steps 1",
  "experiments.llm_merge": "--base b --models m --method linear --weights 1 --out o",
  "experiments.real_lm": "--preset smoke --out o",
}


def test_commands_print_usage_or_the_install_line_without_the_extra(tmp_path):
  script = f"""
      import contextlib, io, json, runpy, sys
      for name in {extra.MODULES!r}:
        sys.modules[name] = None
      results = {{}}
      for module, flags in {COMMANDS!r}.items():
        for case, argv in (("help", ["--help"]), ("run", flags.split())):
          sys.argv = [module, *argv]
          stdout = io.StringIO()
          with contextlib.redirect_stdout(stdout):
            try:
              runpy.run_module(module, run_name="__main__", alter_sys=True)
              code = None
            except SystemExit as e:
              code = e.code
          results[module + " " + case] = dict(code=code, stdout=stdout.getvalue())
      print(json.dumps(results))
  """
  proc = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(script)],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    ),
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for module in COMMANDS:
    shown = results[module + " help"]
    assert shown["code"] == 0 and shown["stdout"].startswith("usage: "), (module, shown)
    ran = results[module + " run"]
    # SystemExit with a message: Python prints it, alone, and exits with status 1.
    assert isinstance(ran["code"], str) and "\n" not in ran["code"], (module, ran)
    assert ran["code"].startswith(f"{module} needs the tunix extra"), ran["code"]
    assert ran["code"].endswith("pip install -e '.[tunix]'"), ran["code"]
