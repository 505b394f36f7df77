"""The optimizer step and the DPO training step of the CPU benchmarks, on one GPU.

One command (planned for under 8 minutes on one H200; not yet run on a GPU):

    python benchmarks/bench_gpu.py [--out benchmarks/gpu.json]

1. The optimizer step of `step_time` (adamw, ondare, onties exact, onties
   sampled; `harness`'s optimizers, interleaved timing and trees) at 16.8M
   params (4 leaves of 4096x1024) and 1.07B params (16 leaves of 8192x8192),
   with float32 and with bfloat16 params (the reference delta, gradients and
   Adam's moments then bfloat16 too), each ratio to AdamW's step of the same
   run. The 1.07B float32 case holds about 82 GB at once (19 trees of 4.3 GB:
   params, reference delta and two gradients, and every optimizer's params
   and state, since the methods are timed interleaved).
2. The whole DPO training step of `bench_train_step` (`bench_train_step.run`).
3. The GPU's name, driver and CUDA version (nvidia-smi, when it is there),
   jax, jaxlib and the CUDA plugin's versions.

Writes the figures to ``--out`` (JSON, after each case, so that a run cut
short keeps what it measured) and the tables to ``GPU.md`` beside it;
`report.py` renders ``benchmarks/gpu.json`` into RESULTS.md's GPU section.

JAX needs its CUDA plugin: ``pip install "jax[cuda13]==<jax's version>"``
(the script prints the line for the jax it runs on; ``jax[cuda12]`` for a
driver older than CUDA 13). On the project's device machine (the device
tool's ``run``; its image holds jax with the CUDA 13 plugin, and nothing can
be installed there) the command is::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --out $OUT/gpu.json

then copy ``gpu.json`` and ``GPU.md`` from the files that come back into
``benchmarks/`` and run ``python benchmarks/bench_step.py --render``. That
image's jax is not the project's pinned one: the JSON records which ran.

``--quick`` runs small cases on whatever backend JAX has (under 2 minutes on
2 CPU cores) to check the script; its figures are no GPU figures, so with
``--quick`` or without a GPU nothing is written unless ``--out`` is given,
and the tables name the platform that ran.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time

# The 1.07B float32 case needs more than JAX's default 75% of the GPU's memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_train_step  # noqa: E402
from harness import HERE, REPEAT, RESERVE_P, WEIGHT_DECAY, last_run, machine, time_fresh_trees  # noqa: E402

JSON = os.path.join(HERE, "gpu.json")
NAMES = ("adamw", "ondare", "onties_exact", "onties_sampled")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# (params, leaves, columns): rows = params / (leaves * columns).
CASES = [(4 * 4096 * 1024, 4, 1024), (16 * 8192 * 8192, 16, 8192)]
QUICK_CASES = [(4 * 256 * 1024, 4, 1024), (4 * 256 * 256, 4, 256)]
NOT_MEASURED = (
  "not measured: no device was lent to the sessions so far; "
  "`python benchmarks/bench_gpu.py` is the prepared run"
)


def install_hint():
  v = jax.__version__
  return (
    f'pip install "jax[cuda13]=={v}"   (a driver for CUDA 13: nvidia-smi\'s "CUDA Version" '
    f'>= 13.0)\npip install "jax[cuda12]=={v}"   (an older driver)'
  )


def nvidia_smi():
  """Name, driver, memory and the driver's CUDA version of each GPU, or None without nvidia-smi."""
  if shutil.which("nvidia-smi") is None:
    return None
  query = subprocess.run(
    ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
    capture_output=True,
    text=True,
    timeout=60,
  )
  header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=60).stdout
  cuda = re.search(r"CUDA Version:\s*([0-9.]+)", header)
  return {
    "gpus": [line.strip() for line in query.stdout.splitlines() if line.strip()],
    "cuda_version": cuda.group(1) if cuda else None,
  }


def environment():
  """`harness.machine` plus the device JAX runs on and the versions of what drives it."""
  info = machine()
  device = jax.devices()[0]
  cuda = sorted(
    f"{d.metadata['Name']} {d.version}"
    for d in importlib.metadata.distributions()
    if re.match(r"jax[-_]cuda|nvidia[-_](cuda[-_]runtime|cudnn|nccl)", d.metadata["Name"] or "")
  )
  info.update(
    platform=device.platform,
    device=device.device_kind,
    device_count=jax.device_count(),
    jaxlib=jaxlib.__version__,
    cuda_packages=cuda,
    nvidia_smi=nvidia_smi(),
  )
  return info


def step_case(num_params, leaves, columns, dtype, rounds):
  """One row of the step table: seconds per step and ratios to AdamW, or the error."""
  row = {
    "params": num_params,
    "leaves": leaves,
    "shape": f"{num_params // (leaves * columns)}x{columns}",
    "dtype": dtype,
  }
  start = time.perf_counter()
  try:
    seconds = time_fresh_trees(
      num_params, leaves, rounds, columns=columns, dtype=DTYPES[dtype], names=NAMES
    )
  except Exception as e:  # an out-of-memory case leaves the others to run
    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  else:
    row["seconds"] = seconds
    row["ratios"] = {k: v / seconds["adamw"] for k, v in seconds.items()}
  row["wall_s"] = time.perf_counter() - start
  print(json.dumps(row), flush=True)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small cases, few rounds (a check)")
  parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, quick 3)")
  parser.add_argument("--out", default=None, help=f"JSON path (default {JSON}); GPU.md beside it")
  args = parser.parse_args()
  rounds = args.rounds or (3 if args.quick else 9)
  info = environment()
  print(json.dumps(info), flush=True)
  gpu = info["platform"] == "gpu"
  print(
    f"JAX runs on {info['platform']}"
    + ("" if gpu else ", not a GPU")
    + f". JAX's CUDA plugin, for this jax:\n{install_hint()}",
    flush=True,
  )
  out_path = args.out
  if out_path is None and gpu and not args.quick:
    out_path = JSON
  if out_path is None:
    print("nothing will be written: --quick or no GPU, and no --out", flush=True)

  run = {
    "machine": info,
    "quick": args.quick,
    "rounds": rounds,
    "repeat": REPEAT,
    "reserve_p": RESERVE_P,
    "weight_decay": WEIGHT_DECAY,
    "steps": [],
    "train_step": None,
  }
  for num_params, leaves, columns in QUICK_CASES if args.quick else CASES:
    for dtype in DTYPES:
      run["steps"].append(step_case(num_params, leaves, columns, dtype, rounds))
      write(run, out_path)

  start = time.perf_counter()
  if args.quick:
    run["train_step"] = bench_train_step.run(rounds, sizes=("small",), batches=(4,))
  else:
    run["train_step"] = bench_train_step.run(bench_train_step.ROUNDS)
  run["train_step"]["wall_s"] = time.perf_counter() - start
  print(f"training steps: {run['train_step']['wall_s']:.0f} s", flush=True)
  run["machine"]["load_average_at_end"] = os.getloadavg()
  write(run, out_path)
  print(render(run))


def write(run, path):
  if path is None:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(run, f, indent=1)
  with open(os.path.join(os.path.dirname(os.path.abspath(path)), "GPU.md"), "w") as f:
    f.write(render(run))


def where(info):
  """The device and the software, in a sentence."""
  smi = info.get("nvidia_smi") or {}
  driver = "; ".join(smi.get("gpus", [])) or "no nvidia-smi"
  cuda = ", ".join(info["cuda_packages"]) or "no CUDA packages"
  text = (
    f"{info['device']} ({info['platform']}, {info['device_count']} device(s); {driver}"
    + (f", CUDA {smi['cuda_version']}" if smi.get("cuda_version") else "")
    + "), "
    f"jax {info['jax']}, jaxlib {info['jaxlib']}, {cuda}, {info['date_utc']} UTC"
  )
  if info["platform"] != "gpu":
    text += f". Platform {info['platform']}: not GPU figures (a check of the script)"
  return text


def render(run):
  """Markdown section of a run: the optimizer steps, then the training steps."""
  lines = [
    "## GPU (`python benchmarks/bench_gpu.py" + (" --quick" if run["quick"] else "") + "`)",
    "",
    f"{where(run['machine'])}.",
    "",
    f"Optimizer step as in the CPU tables (`jax.jit`, params and state donated, "
    f"interleaved: {run['rounds']} rounds of {run['repeat']} steps per method, the first "
    f"untimed; median; p = {run['reserve_p']}, weight decay {run['weight_decay']}); the "
    "reference delta, gradients and Adam's moments in the params' dtype. AdamW GB/s counts "
    "its 7 words per param (read params, gradient, two moments; write params, two moments).",
    "",
    "| params | leaves | dtype | "
    + " | ".join(f"{n} ms (x AdamW)" for n in NAMES)
    + " | AdamW GB/s |",
    "|---:|---|---|" + "---:|" * (len(NAMES) + 1),
  ]
  for row in run["steps"]:
    head = f"| {row['params'] / 1e6:.1f}M | {row['leaves']} x {row['shape']} | {row['dtype']} |"
    if "error" in row:
      lines.append(head + f" {row['error'][:120].replace('|', '/')} |" + " |" * len(NAMES))
      continue
    s, r = row["seconds"], row["ratios"]
    cells = " | ".join(f"{s[n] * 1e3:.2f} ({r[n]:.2f})" for n in NAMES)
    words = 7 * row["params"] * jnp.dtype(row["dtype"]).itemsize
    lines.append(f"{head} {cells} | {words / s['adamw'] / 1e9:.0f} |")
  train = run.get("train_step")
  if train:
    lines += [
      "",
      f"{bench_train_step.method(train)}. Share = (step - AdamW's step) / step.",
      "",
      bench_train_step.table(train),
    ]
  return "\n".join(lines) + "\n"


def section():
  """`render` of `gpu.json`, or the line that says no GPU run exists yet."""
  run = last_run(JSON)
  return render(run) if run else f"## GPU\n\n{NOT_MEASURED}\n"


if __name__ == "__main__":
  main()
