"""The TPU compiler's plan of a whole Tunix DPO step on a pod slice, per optimizer.

    pip install "jax[tpu]==$(python -c 'import jax; print(jax.__version__)')"
    python benchmarks/plan_train_step.py           # Qwen2.5-7B and Llama-3-8B on v5p:4x4x4
    python benchmarks/plan_train_step.py --quick   # Qwen2.5-7B, AdamW and OnDARE only

A DPO step of `experiments.llm_dpo` is two programs, as Tunix's `DPOTrainer`
runs it: the frozen reference's log-probabilities of the chosen and rejected
answers (`dpo_trainer.compute_logps`, in ``_prepare_inputs``), then the
policy's forward and backward through `dpo_trainer.dpo_loss_fn` and the
optimizer's update (``PeftTrainer._train_step``, the policy and optimizer
state donated). Both are compiled ahead of time for the TPU topology
(`tpu_aot`, nothing runs) on abstract models (`models.abstract_model`: no
weights), with the experiment's own optimizer (`train._optimizer`) and
defaults (float32 policy and state, bfloat16 activations and reference, 128
pairs of 512 + 512 tokens per step), decoder layers rematerialised. Per chip:
the peak HBM the plan needs (buffers live across both programs plus the
larger program's temporaries) against the chip's HBM, and the HBM bytes of
each program (`hlo_traffic`); the merge's share is the optimizer's train-step
bytes minus AdamW's, over the optimizer's whole-step bytes. Writes
`benchmarks/plan_train_step.json`; `section()` renders it for
benchmarks/RESULTS.md. Every figure is the compiler's plan, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import harness  # noqa: E402
import hlo_traffic  # noqa: E402
import tpu_aot  # noqa: E402
from omerge_jax import checkpoint  # noqa: E402

OUT = os.path.join(HERE, "plan_train_step.json")
TOPOLOGY, AXES = "v5p:4x4x4", {"fsdp": 16, "tp": 4}
MODELS = ("Qwen2.5-7B", "Llama-3-8B")
METHODS = ("adamw", "ondare", "onties")


def experiment_args(optimizer, grad_accum=1):
  """`experiments.llm_dpo.train`'s flags at their defaults, ``--remat`` on."""
  from experiments.llm_dpo import train

  return train.parse_args(
    [
      "--data",
      "-",
      "--base",
      "-",
      "--sft",
      "-",
      "--out",
      "-",
      "--steps",
      "1000",
      "--optimizer",
      optimizer,
      "--remat",
      "--grad-accum",
      str(grad_accum),
    ]
  )


def example(args, mesh):
  """Abstract `dpo_trainer.TrainExample` of one step, split over ``fsdp`` as the trainer does."""
  from tunix.sft.dpo import dpo_trainer

  pairs = args.batch_size // args.grad_accum  # one micro-batch
  rows, prompt, answer = 2 * pairs, args.max_prompt_length, args.max_response_length
  t = prompt + answer
  spec = lambda *shape: NamedSharding(mesh, P("fsdp", *[None] * (len(shape) - 1)))
  arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=spec(*shape))
  return dpo_trainer.TrainExample(
    input_ids=arr((rows, t), jnp.int32),
    positions=arr((rows, t), jnp.int32),
    attention_mask=arr((rows, t, t), jnp.bool_),
    completion_mask=arr((rows, answer), jnp.int32),
    ref_chosen_logps=arr((pairs,), jnp.float32),
    ref_rejected_logps=arr((pairs,), jnp.float32),
    logits_to_keep=answer,
  )


def compile_reference(hf, args, mesh):
  """The reference's log-probabilities (``compute_logps``) of one step's pairs."""
  from experiments.llm_dpo import models
  from tunix.sft.dpo import dpo_trainer

  dtype = jnp.dtype(args.ref_dtype)
  _, _, graph, state, shardings = models.abstract_model(hf, mesh, param_dtype=dtype, dtype=dtype)
  state = tpu_aot.abstract(state.to_pure_dict(), shardings)
  ex = example(args, mesh)

  def reference(state, ex):
    model = nnx.merge(graph, nnx.State(state))
    return dpo_trainer.compute_logps(
      model, ex.input_ids, ex.positions, ex.attention_mask, ex.logits_to_keep, ex.completion_mask
    )

  with mesh:
    return jax.jit(reference).lower(state, ex).compile()


def compile_train(hf, args, mesh):
  """``PeftTrainer._train_step`` of `dpo_trainer.dpo_loss_fn` with the experiment's optimizer.

  With ``--grad-accum G`` Tunix wraps the optimizer in ``optax.MultiSteps``:
  the program is one micro-batch's step, accumulating (the cheapest branch of
  its conditional) or accumulating and updating (the dearest).
  """
  from experiments.llm_dpo import models, train
  from tunix.sft.dpo import dpo_trainer

  _, _, graph, state, shardings = models.abstract_model(
    hf,
    mesh,
    param_dtype=jnp.dtype(args.param_dtype),
    dtype=jnp.dtype(args.compute_dtype),
    remat=args.remat,
  )
  params = tpu_aot.abstract(state.to_pure_dict(), shardings)

  def tx(tau):
    inner = train._optimizer(args, tau)
    return optax.MultiSteps(inner, args.grad_accum) if args.grad_accum > 1 else inner

  # Any tree shaped like the params serves as tau for the state's shapes.
  init = lambda p: tx(p).init(p)
  opt_state = checkpoint.abstract_state(optax.GradientTransformation(init, None), params)

  def step(params, opt_state, ex):
    def loss_fn(params):
      return dpo_trainer.dpo_loss_fn(nnx.merge(graph, nnx.State(params)), ex, beta=args.beta)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    grad_norm = optax.global_norm(grads)
    # The transform closes over tau only for init; update reads the state.
    updates, opt_state = tx(params).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux, grad_norm

  with mesh:
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, example(args, mesh))
    return lowered.compile()


def figures(compiled):
  """Per-chip figures of one program: HBM bytes and cycles of both branches, memory."""
  out = {}
  for branch in ("cheapest", "dearest"):
    s = hlo_traffic.summary(compiled, branch)
    out[branch] = {"hbm_bytes": s["hbm_bytes"], "estimated_cycles": s["estimated_cycles"]}
  out.update({k: s[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")})
  return out


def timed(compile_fn, *args):
  """``(figures, seconds, None)``, or ``(None, seconds, the compiler's message)`` when it does not fit."""
  start = time.perf_counter()
  try:
    compiled = compile_fn(*args)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return None, round(time.perf_counter() - start, 1), str(e).split("\n")[0]
  return figures(compiled), round(time.perf_counter() - start, 1), None


def whole_step(row):
  """One optimizer step of G micro-batches: G reference programs and G train programs.

  Each program at its usual branches (the exact top-k's bracket hit): the
  TPU compiler leaves no conditional of ``MultiSteps`` in the train program,
  so every micro-batch's program is the same.
  """
  g, ref, train = row["grad_accum"], row["reference"], row["train"]
  total = lambda key: g * (ref["cheapest"][key] + train["cheapest"][key])
  # Resident through both programs: the policy, its optimizer state and the
  # reference (each program's arguments; the example, a few MB, counted twice),
  # plus the larger program's temporaries and un-aliased outputs.
  peak = (
    train["argument_bytes"]
    + ref["argument_bytes"]
    + max(ref["temp_bytes"], train["temp_bytes"] + train["output_bytes"] - train["alias_bytes"])
  )
  return {
    "hbm_bytes": total("hbm_bytes"),
    "estimated_cycles": total("estimated_cycles"),
    "peak_bytes": peak,
  }


def run(models_, methods, done=lambda rows, tried: None, rows=(), tried=()):
  """Every model and optimizer at the smallest ``--grad-accum`` (1, 2, 4, 8) at which AdamW fits.

  ``rows`` and ``tried`` of an earlier run (``--resume``) are kept: a model
  whose AdamW row is there keeps its G and reference, and a row already
  there is not compiled again.
  """
  from experiments.llm_dpo import memory

  mesh = tpu_aot.mesh(TOPOLOGY, AXES)
  rows, tried = list(rows), list(tried)
  for name in models_:
    hf = memory.CONFIGS[name]
    done_here = {r["method"]: r for r in rows if r["model"] == name}
    if "adamw" in done_here:
      g, ref = done_here["adamw"]["grad_accum"], done_here["adamw"]["reference"]
    else:
      for g in (1, 2, 4, 8):
        args = experiment_args("adamw", g)
        adamw, seconds, error = timed(compile_train, hf, args, mesh)
        tried.append(dict(model=name, method="adamw", grad_accum=g, compile_s=seconds, error=error))
        print(f"{name} adamw, grad_accum {g}: {error or 'fits'} ({seconds:.0f} s)", flush=True)
        if adamw is not None:
          adamw["compile_s"] = seconds
          break
      ref, seconds, error = timed(compile_reference, hf, args, mesh)
      if error:
        raise RuntimeError(f"{name}: the reference does not fit: {error}")
      ref["compile_s"] = seconds
    for method in methods:
      if method in done_here:
        continue
      if method == "adamw":
        train = adamw
      else:
        jax.clear_caches()  # the compiler's host memory: a 7B exact step needs most of 24 GB
        train, seconds, error = timed(compile_train, hf, experiment_args(method, g), mesh)
        if error:
          tried.append(
            dict(model=name, method=method, grad_accum=g, compile_s=seconds, error=error)
          )
          print(f"{name} {method}: {error}", flush=True)
          continue
        train["compile_s"] = seconds
      row = dict(
        model=name,
        params=memory.parameter_count(hf),
        method=method,
        grad_accum=g,
        reference=ref,
        train=train,
      )
      rows.append(row)
      done(rows, tried)
      total = whole_step(row)
      print(
        f"{name} {method}: step HBM {total['hbm_bytes'] / 1e9:,.1f} GB, peak "
        f"{total['peak_bytes'] / 2**30:.1f} GiB ({train['compile_s']:.0f} s)",
        flush=True,
      )
  done(rows, tried)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--no-write", action="store_true")
  parser.add_argument(
    "--resume",
    action="store_true",
    help=f"keep the rows of {os.path.basename(OUT)} and compile the rest",
  )
  args = parser.parse_args(argv)
  if not tpu_aot.available():
    sys.exit('libtpu is not installed: pip install "jax[tpu]==%s"' % jax.__version__)
  a = experiment_args("adamw")
  header = {
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "jax": jax.__version__,
    "libtpu": importlib.metadata.version("libtpu"),
    "topology": TOPOLOGY,
    "mesh": AXES,
    "quick": args.quick,
    "step": dict(
      pairs=a.batch_size,
      prompt=a.max_prompt_length,
      answer=a.max_response_length,
      param_dtype=a.param_dtype,
      compute_dtype=a.compute_dtype,
      ref_dtype=a.ref_dtype,
      remat=a.remat,
      reserve_p=a.reserve_p,
    ),
  }

  def write(rows, tried):
    if not args.no_write:
      with open(OUT, "w") as f:
        json.dump({**header, "rows": rows, "tried": tried}, f, indent=1)

  before = {}
  if args.resume and os.path.exists(OUT):
    with open(OUT) as f:
      before = json.load(f)
    header["date"] = before["date"] + " and " + header["date"]
  run(
    MODELS[:1] if args.quick else MODELS,
    METHODS[:2] if args.quick else METHODS,
    write,
    before.get("rows", ()),
    before.get("tried", ()),
  )
  if not args.no_write:
    print(section())


def optimizer_steps(topology):
  """{(model, method): the optimizer step's HBM bytes and cycles over AdamW's}, from `bench_plan`."""
  import bench_plan

  plan = harness.last_run(bench_plan.OUT)
  rows = [r for r in plan["rows"] if r["topology"] == topology] if plan else []
  names = {"onties_exact": "onties", "ondare": "ondare"}
  out = {}
  for r in rows:
    b = next(x for x in rows if x["tree"] == r["tree"] and x["method"] == "adamw")["cheapest"]
    if r["method"] in names:
      out[r["tree"], names[r["method"]]] = {
        k: r["cheapest"][k] - b[k] for k in ("hbm_bytes", "estimated_cycles")
      }
  return out


def section(result=None) -> str:
  """The markdown section of benchmarks/RESULTS.md ('' without plan_train_step.json)."""
  result = result or harness.last_run(OUT)
  if result is None:
    return ""
  chip = tpu_aot.chip(result["topology"])
  st = result["step"]
  lines = [
    "## A whole DPO step on a pod slice, the TPU compiler's plan "
    "(`python benchmarks/plan_train_step.py`)",
    "",
    f"`experiments.llm_dpo`'s step as Tunix runs it (the reference's log-probabilities, then "
    f"the policy's forward, backward and update, params and state donated), compiled ahead of "
    f"time for {result['topology']} ({chip.name}, {chip.hbm_bytes / 2**30:.0f} GiB HBM per chip), "
    f"mesh {json.dumps(result['mesh'])}, on abstract models: {st['pairs']} pairs of "
    f"{st['prompt']} + {st['answer']} tokens per step, {st['param_dtype']} policy and state, "
    f"{st['compute_dtype']} activations, {st['ref_dtype']} reference, decoder layers "
    f"rematerialised, p = {st['reserve_p']}; jax {result['jax']}, libtpu {result['libtpu']}, "
    f"{result['date']}. Per chip. **A plan, not a timing**: no TPU ran. G = micro-batches "
    "(`--grad-accum`, Tunix's `optax.MultiSteps`), the smallest of 1, 2, 4, 8 at which AdamW's "
    "step compiles within HBM; a step is G reference programs and G train programs. Peak = "
    "both programs' arguments (policy, optimizer state, reference) + the larger program's "
    "temporaries, as the compiler planned them. Whole-step difference = (step - AdamW's "
    "step) / step; optimizer's own = G x (its optimizer step - AdamW's, in the plan of the "
    "step alone above) / step.",
    "",
    "| model | optimizer | G | peak GiB | train temporaries GiB | step HBM GB | HBM time (ms) "
    "| est. cycles (M) | whole-step difference, bytes / cycles | optimizer's own, bytes / cycles |",
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  base = {r["model"]: r for r in result["rows"] if r["method"] == "adamw"}
  alone = optimizer_steps(result["topology"])
  for r in result["rows"]:
    s, b = whole_step(r), whole_step(base[r["model"]])
    share = lambda key, s=s, b=b: f"{(s[key] - b[key]) / s[key] * 100:+.2f} %"
    own = (
      ""
      if r["method"] == "adamw"
      else " / ".join(
        f"{r['grad_accum'] * alone[r['model'], r['method']][key] / s[key] * 100:+.2f} %"
        for key in ("hbm_bytes", "estimated_cycles")
      )
      if (r["model"], r["method"]) in alone
      else ""
    )
    diff = "" if r["method"] == "adamw" else f"{share('hbm_bytes')} / {share('estimated_cycles')}"
    lines.append(
      f"| {r['model']} | {r['method']} | {r['grad_accum']} | {s['peak_bytes'] / 2**30:.1f} | "
      f"{r['train']['temp_bytes'] / 2**30:.1f} | {s['hbm_bytes'] / 1e9:,.0f} | "
      f"{s['hbm_bytes'] / chip.hbm_bandwidth * 1e3:,.0f} | {s['estimated_cycles'] / 1e6:,.0f} | "
      f"{diff} | {own} |"
    )
  failed = [t for t in result["tried"] if t["error"]]
  if failed:
    lines += ["", "Did not fit (the compiler's message):", ""]
    lines += [f"- {t['model']} {t['method']}, G = {t['grad_accum']}: {t['error']}" for t in failed]
  temps = ", ".join(
    f"{r['method']} {r['train']['temp_bytes'] / 2**30:.1f}"
    for r in result["rows"]
    if r["model"] == result["rows"][0]["model"]
  )
  lines += ["", TRAIN_NOTES.format(model=result["rows"][0]["model"], temps=temps)]
  return "\n".join(lines) + "\n"


TRAIN_NOTES = """How to read it:

- The TPU compiler turns `optax.MultiSteps`' `lax.cond` into a select (a
  tiny model's compiled train program has no conditional left; AdamW's and
  OnDARE's 7-8B programs plan one cost for every branch), so every
  micro-batch's program computes the optimizer's update, for AdamW as for
  the merges; hence G x in the last column. The exact top-k's own
  conditionals stay, at their usual (bracket-hit) branches here.
- The planned peak is not a minimum. The same model and batch get very
  different temporaries from one program to the next ({model}, GiB: {temps}):
  the compiler's scheduler plans with the HBM it has. The buffers the merge
  adds are F(tau), 4 bytes per param over the 64 chips (0.4-0.5 GiB per
  chip), and the exact top-k's temporaries (about 1 GiB, in the plan of the
  step alone). "Fits" means the compiler placed the program within the
  chip's HBM; where AdamW's step does not fit at G = 1, the message says by
  how much.
- Between two compiled programs the whole step's bytes and cycles differ by
  about a percent for reasons that are not the merge (OnDARE's step can
  plan fewer cycles than AdamW's); the optimizer's own difference, from the
  plan of the optimizer step alone, is the share the merge adds. OnTIES
  exact's whole-step cycles exceed AdamW's by about three times its own
  difference on both models: inside the whole step its selection plans
  dearer than alone."""


if __name__ == "__main__":
  main()
