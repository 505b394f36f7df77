"""`benchmarks/RESULTS.md`: every benchmark's last figures, from their JSON files, in one page.

`render` lays out the CPU step benchmarks of `bench_step.py` (from
`results.json`: `step_time`, `step_scaling`, `state_memory`, `step_mesh`),
then the `section()` of each module in `SECTIONS` that is there (each reads
its own JSON and returns "" when it has none), then the notes. Nothing is
timed: `python benchmarks/report.py`, or `python benchmarks/bench_step.py
--render`, rewrites the page from the committed JSON. The benchmarks do not
import this module.
"""

from __future__ import annotations

import importlib
import json
import os

import state_memory
import step_mesh
import step_scaling
import step_time
from harness import HERE, RESERVE_P, REPEAT, WEIGHT_DECAY

RESULTS = os.path.join(HERE, "results.json")
PAGE = os.path.join(HERE, "RESULTS.md")
# Modules with a `section() -> str`, in page order; one that is missing is skipped.
SECTIONS = (
  "profile_ties",
  "trim_branches",
  "bench_train_step",
  "bench_plan",
  "plan_train_step",
  "bench_gpu",
  "bench_digest",
)


def header(raw):
  info = raw["machine"]
  return "\n".join(
    [
      "# Benchmark results",
      "",
      "Written by `python benchmarks/bench_step.py`" + (" --quick" if raw["quick"] else "") + ".",
      "",
      f"- machine: {info['cpu']}, {info['cores']} cores, backend `{info['backend']}`; "
      f"load average at start {tuple(round(x, 2) for x in info['load_average_at_start'])}",
      f"- jax {info['jax']}, optax {info['optax']}, Python {info['python']}",
      f"- date: {info['date_utc']} UTC",
      f"- method: `jax.jit`, params and state donated, methods timed interleaved "
      f"({raw['rounds']} rounds; in each, {REPEAT} steps in a row per method, the first untimed), "
      f"median; p = {RESERVE_P}, weight decay {WEIGHT_DECAY} for all.",
    ]
  )


def module_sections():
  """The non-empty `section()` of each module of `SECTIONS` that exists."""
  out = []
  for name in SECTIONS:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name != name:
        raise
      continue
    text = module.section().rstrip("\n")
    if text:
      out.append(text)
  return out


def render(raw):
  """The page, from `bench_step.py`'s figures as `results.json` holds them."""
  scaling = {int(n): v for n, v in raw["scaling"].items()}
  leaf_counts = {int(n): v for n, v in raw["leaf_counts"].items()}
  sizes = sorted(scaling)
  blocks = [
    header(raw),
    step_time.section(raw["step_times"], raw["ratios"], raw["temporaries"], raw["accuracy"]),
    step_scaling.leaves_section(leaf_counts),
    step_scaling.scaling_section(sizes, scaling, raw["slopes"]),
    state_memory.section(raw["memory"]),
    step_mesh.section(raw["mesh"], raw["mesh_rows"]),
    *module_sections(),
    NOTES,
  ]
  return "\n\n".join(blocks)


def write(raw):
  """Write the page of ``raw`` to `RESULTS.md` and return it."""
  page = render(raw)
  with open(PAGE, "w") as f:
    f.write(page)
  return page


def main():
  with open(RESULTS) as f:
    print(write(json.load(f)))


NOTES = """## What limits these figures

- The machine has 2 cores shared with other processes (see the load average
  above). Interleaving makes every method pay the same load, but ratios still
  move by 10-20% from run to run.
- **Method** (changed 2026-11-29): each method takes 3 steps in a row per
  round and the first is not timed. Timing single steps in turn let a
  method pay for its predecessor's freed temporaries: OnTIES sampled ran
  about 10 ms slower right after the exact step than after OnDARE's, and
  AdamW's step, the denominator of every ratio, followed the chain's (75 MB
  of temporaries freed). AdamW's step (same code) took 35.6 ms in the last
  run with the old method and 28-29 ms with this one, so ratios across the
  change (sampled 1.80x, exact 6.43x, OnDARE 1.05x before) are not like
  for like.
- **OnDARE** adds a counter-based hash per entry and one more read (the
  reference delta); the hash, the `1/p` scale, the merge, weight decay and
  the parameter update fuse into the loop that finishes Adam's update, so
  what it costs over AdamW is the reference delta's read (the hash is
  arithmetic, not memory traffic).
- **OnTIES, sampled** (`onties(topk="sampled")`) adds a gather of 2**16
  entries of each of Adam's two new moments per leaf (written out by Adam
  anyway), Adam's last formula and three short scatter-add histograms
  (2**11 and 2**10 bins) on that sample, and the sign consensus, which
  reads the reference delta; the comparison with the threshold and the
  consensus fuse into the final loop, so no parameter-sized temporary is
  left (the temporaries column). The gathers are scattered reads (one
  entry in each run of n/2**16, at a position that moves along a Weyl
  sequence so that no column period is aliased): on XLA:CPU about 12 ns per
  entry, latency rather than bandwidth. Until 2026-11-29 the sample had
  2**18 entries (bound 1.9 % at p = 0.01 instead of 3.9 %) and two 2**16-bin
  histograms: the gather then read every cache line of both moments of a
  4M-entry leaf, and a 2**16-bin histogram costs about 0.2 ms to clear and
  scan whatever the sample's size, so a leaf of at most 2**18 entries (its
  own sample) cost two such passes over all of it. That made 1.80x AdamW
  on 4 leaves (the old timing method: see Method above) and, in a throwaway run of the
  same kind, 2.7x on 16 leaves and 5.9x on 64.
- **Goals, and what limits them**: OnDARE and OnTIES read the
  reference delta, one word per param more than AdamW's seven, so the
  memory roofline is 8/7 = 1.14x. OnDARE (1.14x) and OnTIES sampled
  (1.46x) meet their goals in this run but not in the one before it, with
  the same library code (1.20x and 1.57x, 2026-11-29 15:38): the goals sit
  inside the run-to-run spread, and OnDARE's is at the roofline. OnTIES
  sampled pays on top of OnDARE its per-leaf cost (next bullet): about 2 ms a
  leaf on 4 leaves. OnTIES exact (6.3x) does not meet its goal (<= 3x):
  see its bullet below.
- **Leaves**: TIES selects per leaf, so OnTIES pays per leaf a sample of
  fixed size (its scattered gathers, the radix passes) and a few dozen small
  XLA kernels (histograms, prefix sums over 256 blocks), whatever the
  leaf's size; spreading the same parameters over
  more leaves raises its ratio (the leaf table). A leaf of at most 2**16
  entries is its own sample (exact, three short radix passes). On GPU and
  TPU each small kernel is a launch: many small leaves cost more there too;
  measure before trusting a figure from this CPU.
- **OnTIES, sampled as a chain** (`online_merge(method="ties",
  topk="sampled")` after Adam, as after any optimizer): the trim samples the
  incoming update, which gives the update a second consumer, so XLA writes
  it out: a parameter-sized temporary per leaf, allocated and page-faulted
  at every step (XLA:CPU does not reuse the block between executions). This
  is what the aliases avoid by sampling the moments; it is the path of
  `online_merge` after another optimizer, unchanged.
- **OnTIES, exact** adds one scatter-add pass over every leaf (a histogram
  of the entries inside a bracket placed by a sample, plus the count above
  it), and Adam's update is written out because the sample, that pass and
  the final loop all read it. XLA:CPU writes a scatter's index array and
  its array of ones to memory before running it, in buffers allocated (and
  page-faulted) afresh at every execution, which over a whole leaf costs
  more than the scatter itself. Since 2026-11-29 (this run) a one-device CPU process walks each leaf's
  leading axis in such slices (`trim._leaf_histogram`; meshes and other
  platforms keep one scatter, since slicing a sharded leaf at a loop
  index would gather it): the exact selection alone went from 94 to 35 ms
  on 4 leaves, the step from 8.6x to 6.3x AdamW (9.5x to 8.9x on 64
  leaves, whose plain radix select makes two passes). What is left over
  AdamW, in the profile below: the written-out update (Adam's update, and
  the update scaled by the learning rate as a second buffer, because XLA
  fuses the cheap scaling into the sample and the final loop but the
  histogram loop needs it in memory; 2.5x AdamW's step for one written-out
  update alone), and the scatter itself, about 2 ns an entry. The goal
  (<= 3x) is not met on CPU; on GPU a scatter-add histogram runs on
  atomics, and the chunking does not apply there.
- **Many leaves** (2026-12-07): on 64 leaves of 256x1024 what OnTIES pays
  per leaf is a few dozen small XLA:CPU kernels, and the kind of kernel
  matters more than its size: an integer reduction (a count) runs near
  1.5 ns an entry, as slow as a pass of AdamW's whole step per entry, and
  a scatter-add into a histogram that stays in L2 near 0.5-1 ns. So the
  sampled threshold now takes its counts (entries above and at the k-th
  largest) from the radix select's last histogram instead of two
  reductions over the sample (sampled step 47.9 -> 39.8 ms in one
  interleaved run), the exact bracket is placed by a 2**14-entry sample
  (2**16 before: exact 126 -> 108 ms; 99 -> 93 ms on 4 leaves), and the
  histogram pass walks slices of 2**14 entries (1.9 -> 1.1 ns an entry on
  a 256x1024 leaf). Still short of the goals at 64 leaves (sampled <= 1.6x,
  exact <= 4x): the sample's gathers (about 1.7 ns an entry, two moments)
  and three radix passes are themselves 1.5-2x AdamW's step there, and the
  exact step writes Adam's update out (two buffers) before its pass.
- **Exact brackets ranked together** (2026-12-07, evening): the exact
  route's 2**14-entry bracket samples of all unstacked leaves are ranked
  in one sort on GPU and TPU (`trim.ties_select_many`), as the sampled
  route's samples already were. TPU plan: Qwen2.5-0.5B 2.19x -> 2.09x
  AdamW's bytes, 3.33x -> 3.20x cycles; the bench tree 2.63x -> 2.54x
  cycles, the same bytes. Qwen2.5-7B, recompiled with both routes
  batched (its plan of 07:08 had neither): exact 2.46x -> 2.47x bytes,
  7.11x -> 6.61x cycles; sampled 1.59x -> 1.63x bytes, 2.22x -> 1.52x
  cycles. On CPU, where each sample keeps its own radix select, the
  64-leaf exact step went 108.9 and 108.3 ms -> 117.4 and 112.3 ms (two
  processes each, alternating; AdamW 13.4-15.0 ms), the same temporaries
  (184.65 MB): about 5 % slower, presumably because every leaf's pass
  now waits for all brackets (one conditional with every sample as
  operand), not measured further. Kept for the pods it is for; masks
  unchanged (exact).
- **Small exact leaves ranked together** (2026-12-07, night): a leaf or
  stacked slice of at most 2**16 entries is its own sample, and the sampled
  route's tie rule then keeps exactly k; the exact route now selects such
  leaves that way (`trim.ties_select_many`, `trim.keep_mask`): all of one
  length in one sort on GPU and TPU, where each ran a three-pass radix
  select of about ninety small ops. Qwen2.5-0.5B has 121 (biases, norms):
  TPU plan 3.20x -> 2.28x AdamW's estimated cycles, 2.09x bytes unchanged;
  Qwen2.5-7B (v5p-64) 6.61x -> 3.78x cycles, 2.47x bytes unchanged. On
  CPU each sample is still ranked alone: 121 leaves of 896 and 128 entries, 5.2-6.5 ms -> 4.6-6.1 ms for the selections
  (three alternating processes each), once a one-row radix select ran
  without `lax.map`'s one-trip loop (8.2-10.6 ms with it); the 64-leaf
  step, which has no small leaf, within noise (sampled 42.5 and 42.6 ms ->
  39.0 and 42.6 ms, exact 115.8 and 112.2 -> 107.9 and 109.1 ms).
  Sampling Adam's inputs (gradient and old moments) instead of the new
  moments, so that the moments, the update and the merge fuse into one
  loop, was tried and dropped: XLA:CPU then copies both donated moments
  (the gather reads them while the moment update overwrites them in place:
  two parameter-sized temporaries), and the TPU plan of Qwen2.5-0.5B grew
  from 1.55x to 1.77x AdamW's bytes (three gathers per leaf instead of one).
- **A leaf's digit selection in fewer ops** (2026-12-08): in the TPU plan
  every small op of a leaf's histogram selection costs about 2,000
  estimated cycles whatever its size, and on Qwen2.5-7B (198 leaves above
  the sample size) those ops were some 40 % of the exact step's cycles
  (14.07M of them, 3.78x AdamW's, in a recompile of the previous library).
  The bracketed histogram now holds the count above the bracket in its own
  bin (2**15 bins inside the bracket, 2**16 counters: whole blocks), and
  `_select_digit` takes the digit and its counts from one variadic
  reduction over each level's suffix counts: no slice, concatenate or
  dynamic slice of the histogram. Qwen2.5-7B's exact step: 11.13M cycles
  (2.99x), 8,238 -> 8,134 MB. Batching the selection across leaves (every
  leaf's first pass, then one selection of all histograms) was tried and
  dropped: 12.61M cycles but 9,877 MB, as each leaf's update was staged
  from HBM again between its passes. On CPU, alternating processes with
  the previous library, 64 leaves: exact 127.6 and 111.1 -> 113.3 and
  129.9 ms, sampled 49.2 and 44.0 -> 42.0 and 47.9 ms (within noise).
- **One exact method** (2026-12-07, late): when the sample's bracket
  misses, and on a leaf too small for a sample, the exact route runs its
  bracketed passes over the whole range of magnitudes, [0, 2**31), where
  it ran a separate two-pass radix select of the leaf; the radix select
  now ranks samples only (CPU's route, `benchmarks/trim_branches.py`). The
  plans above were compiled with this change's first form, whose miss
  branch ran the whole selection again (its own split conditional
  included): the usual branch planned as before on the bench tree and
  Qwen2.5-0.5B (7,220.6 MB, 19,353,016 cycles), Qwen2.5-7B moved a little
  (8,237.9 -> 8,218.9 MB, 3.78x -> 3.73x AdamW's cycles), the miss branch
  (the dearest, in brackets) a little dearer (6.46x -> 6.68x cycles on
  Qwen2.5-0.5B, 15.91x -> 16.54x on Qwen2.5-7B), and the 8-device
  test_sharding child took 8-13 % more CPU time to compile. The final form
  runs the miss branch's two passes without a conditional between them:
  Qwen2.5-0.5B's usual branch again plans 7,220.6 MB and 19,353,016
  cycles, and test_sharding compiles in the time it took before (85.8 and
  87.0 s of CPU against 86.3 and 85.1); its dearest branch was not
  recompiled. XLA:CPU's programs of the exact step on
  4 and 64 leaves keep the same scatters and temporaries (within 4 KB),
  and the steps time alike within the noise (two processes each,
  alternating with the previous library): exact on 4 leaves 104.1 and
  121.6 ms -> 108.9 and 97.5 ms, on 64 leaves 137.2 and 110.4 -> 134.7 and
  117.5 ms; sampled on 64 leaves 54.3 and 45.2 -> 48.0 and 47.1 ms (AdamW
  14.8-19.7 ms).
- **The TPU plan's drift** (bisected 2026-12-07): the plans of 2026-12-06
  read more than those of 12-03 because of one commit (9ae9271), in two
  parts. DARE's key XORed its leaf word into every axis's coordinate hash,
  so XLA built each axis's hash vector once per leaf and the leaves' update
  fusions stopped merging: OnDARE 1.347x -> 1.375x AdamW's cycles on the
  bench tree, 1.28x -> 1.49x on Qwen2.5-7B, same bytes. The leaf word now
  enters the first axis only, by addition (XOR also made leaves whose words
  share their high bits draw the same entries): 1.347x again on the bench
  tree and 1.278x on Qwen2.5-7B (the tables above); Qwen2.5-0.5B moves the other way,
  1.04x -> 1.11x cycles, same bytes (the cost model's fusion choices). The
  sampled tie cut (the rule that keeps the bound when many entries tie)
  costs OnTIES sampled 0.05x bytes and 0.24x cycles on the bench tree: a
  per-leaf chain of small ops, and a per-entry row-major compare in the
  fused update, now one flat position (uint32) instead of a compare per
  axis: sampled 2.02x -> 1.85x cycles and exact 2.82x -> 2.65x on the bench
  tree, 1.65x -> 1.52x and 3.53x -> 3.34x on Qwen2.5-0.5B.
- **Page faults** (profiled 2026-11-25, before the aliases sampled the
  moments): XLA:CPU allocates a step's temporaries afresh at every
  execution and the kernel maps them page by page (then about 18,000 minor
  faults per step for the sampled path, 53,000 for exact, none for AdamW;
  roughly 0.7-1 ms per MB on this VM). With Adam's update materialised per
  leaf that was most of the sampled path's cost.
  `XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` or
  `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` cut those faults; neither is
  applied in the tables here.
- **Tried and rejected for exact top-k**: reading Adam's moments instead
  of the update, as the sampled alias does, so that the update is never
  written out (the sample, the sliced histogram and the rare branches
  apply Adam's last formula to the moments; 4.3x against 5.4x without it,
  in two throwaway runs on a loaded machine): XLA's algebraic simplifier rewrites the same
  formula differently in different fusions (optax's
  `m / bc1 / (sqrt(v / bc2) + eps)` became `m / (bc1 * (sqrt(v / bc2) +
  eps))` in one and `m * (1 / bc1) / (sqrt(v * (1 / bc2)) + eps)` in the
  other; about a third of a 512-entry leaf's entries then differed by an
  ulp), so the trim would rank other magnitudes than the final loop
  applies and "exactly k kept" would fail (it did, on a test of OnTIES
  with p = 1). `lax.optimization_barrier` on the update did not change
  XLA:CPU's buffers. Also rejected: counting passes instead of the
  scatter; per-row `lax.top_k` of the entries inside the bracket (to
  histogram a few candidates per row instead of the whole leaf), which cost
  more than the scatter pass on XLA:CPU. One fused compare-and-count over a 4M-entry leaf takes 3-6 ms
  (about 1.2 ns per entry), so a bisection on the bits inside the sample's
  bracket (about 18 passes) would cost more than the scatter pass; 16
  thresholds counted in one broadcast reduction took 250 ms per leaf, and
  XLA:CPU emits sibling reductions about 10x slower than a single one.
  Also rejected earlier: `jnp.sort` or `lax.top_k` of the leaf (about 100x
  AdamW), sorting the sample (about 45 ns per entry, slower than two
  histograms). The implementation before the bracket (two scatter-add
  passes over the leaf, plus a prefix sum over the leaf when ties must be
  cut) measured about 10x AdamW. The per-entry row-major tie-break is not a
  cost: replacing sampled's keep mask by `bits >= threshold` changed
  nothing measurable.
- **Scaling**: every method is a fixed number of passes over the
  parameters plus, for TIES, work on per-leaf samples of bounded size, so
  time is linear in the parameter count. On this loaded machine single
  figures are noisy (compare the 16.8M row of the scaling table with the
  16.8M table above, timed in the same run); the marginal slope between
  the two largest sizes is the most robust figure.
- **Mesh**: the 8 simulated devices share the same 2 cores, so the mesh
  column measures overhead (8 programs, collectives on histograms and
  scalars), not a speed-up. Rounding differs between the one-device and the
  8-device compiled programs (AdamW differs too, by an ulp); TIES's choice
  among near-equal magnitudes can follow that rounding (Adam's first step
  has every magnitude equal to lr up to rounding), which is what the
  "entries differing" column counts. OnTIES sampled gathers two samples
  per leaf (one of each moment), each all-reduced over the 8 programs that
  share the 2 cores: that is its mesh overhead here. Sampling the update
  on sharded leaves instead (one all-reduced sample, the update written
  out per shard) ran the mesh at 3.3x its one-device time in the same
  session, and then differed from the one-device run at Adam's tied first
  steps; it was not kept. The sharded tests in
  `tests/test_sharding.py` compare bit-identical inputs and find the same
  result on 1 and on 8 devices.
"""


if __name__ == "__main__":
  main()
