"""Sharded training on 8 simulated CPU devices: meshes, state sharding, pmap.

JAX fixes its device count when it first starts, and pytest runs every test
file in the same processes, so the multi-device part runs once, in a child
process (this file run as a script with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``). The child runs each
check and prints the measured numbers as JSON; the tests below assert them.
"""

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

# One worker runs this file (conftest.ONE_WORKER): its module fixture (a subprocess)
# then runs once, not once per worker.

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Leaves of a small model and their PartitionSpecs on the (fsdp, tp) mesh.
SHAPES = {"w": (64, 48), "e": (40, 16), "b": (48,), "s": ()}
SPECS = {"w": ("fsdp", "tp"), "e": ("fsdp", None), "b": ("tp",), "s": ()}
STEPS = 4
BIG = (640, 512)  # above the bracketed top-k's size cut


def _optimizers(tau):
  import omerge_jax

  common = dict(alpha=0.1, reserve_p=0.3, weight_decay=0.01)
  return {
    "ondare": lambda: omerge_jax.ondare(1e-2, tau, seed=5, **common),
    "onties_exact": lambda: omerge_jax.onties(1e-2, tau, **common),
    "onties_sampled": lambda: omerge_jax.onties(1e-2, tau, topk="sampled", **common),
    "ondare_k3": lambda: omerge_jax.ondare(1e-2, tau, merge_every=3, **common),
    "onties_k3": lambda: omerge_jax.onties(1e-2, tau, merge_every=3, **common),
  }


def _child():
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

  import omerge_jax
  from omerge_jax import sparsify

  assert jax.device_count() == 8, jax.devices()
  rng = np.random.default_rng(0)

  def normal(scale):
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}

  params0, tau0 = normal(1.0), normal(0.01)
  grads0 = [normal(1.0) for _ in range(STEPS)]
  out = {}

  def steps(tx, params, state, grads, out_shardings=None):
    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    step = jax.jit(step, out_shardings=out_shardings)

    for g in grads:
      params, state = step(params, state, g)
    return params, state, step

  def on_mesh(mesh, names):
    shardings = {k: NamedSharding(mesh, P(*SPECS[k])) for k in SHAPES}
    put = lambda tree: {k: jax.device_put(v, shardings[k]) for k, v in tree.items()}
    results = {}

    def param_shaped_specs(state):
      # Every state leaf shaped like a param (moments, reference, accumulator).
      specs = set()
      for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        key = getattr(path[-1], "key", None)
        if key in SHAPES and leaf.shape == SHAPES[key] and leaf.ndim:
          specs.add((key, str(tuple(leaf.sharding.spec))))
      return sorted(specs)

    def init_captures(init, params):
      # JAX warns when a program captures more constants than this (tau's leaves are larger).
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = init(params)
      return state, sum("constants were captured" in str(w.message) for w in caught)

    jax.config.update("jax_captured_constants_warn_bytes", 1024)
    with jax.set_mesh(mesh):
      params, tau = put(params0), put(tau0)
      makers, host_makers = _optimizers(tau), _optimizers(tau0)
      for name in names:
        tx = makers[name]()
        # The recipe of docs/pod.md: an eager init on the sharded params.
        state, captured = init_captures(tx.init, params)
        merge = [
          s
          for s in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, omerge_jax.OnlineMergeState)
          )
          if isinstance(s, omerge_jax.OnlineMergeState)
        ][0]
        host_state, host_captured = init_captures(host_makers[name]().init, params)
        jit_state, jit_captured = init_captures(jax.jit(tx.init), params)
        # The one-program recipe: the transform built inside jit, tau an argument.
        build_init = jax.jit(lambda p, t, name=name: _optimizers(t)[name]().init(p))
        arg_state, arg_captured = init_captures(lambda p, f=build_init: f(p, tau), params)
        _, updated = jax.jit(tx.update)(params, state, params)
        types = lambda tree: str(jax.tree.map(jax.typeof, tree))
        # Auto axes: the compiler picks output shardings unless told.
        state_shardings = jax.tree.map(lambda x: x.sharding, state)
        outs = (shardings, state_shardings) if mesh.axis_types[0] == AxisType.Auto else None
        final, _, step = steps(tx, params, state, [put(g) for g in grads0], outs)
        hlo = step.lower(final, state, put(grads0[0])).compile().as_text()
        results[name] = {
          "params": {k: np.asarray(v).tolist() for k, v in final.items()},
          "param_specs_kept": all(final[k].sharding.spec == P(*SPECS[k]) for k in SHAPES),
          "reference_specs": {k: str(tuple(merge.reference[k].sharding.spec)) for k in SHAPES},
          "state_specs": param_shaped_specs(state),
          "host_tau_state_specs": param_shaped_specs(host_state),
          "captured": [captured, host_captured, arg_captured, jit_captured],
          "same_types": [
            types(jit_state) == types(state),
            types(updated) == types(state),
            types(arg_state) == types(state),
          ],
          "accumulator": merge.accumulator is not None,
          "all_gathers": hlo.count(" all-gather("),
        }
    return results

  # One device, no mesh.
  single = {}
  makers = _optimizers({k: jnp.asarray(v) for k, v in tau0.items()})
  for name, make in makers.items():
    tx = make()
    params = {k: jnp.asarray(v) for k, v in params0.items()}
    grads = [{k: jnp.asarray(v) for k, v in g.items()} for g in grads0]
    final, _, _ = steps(tx, params, tx.init(params), grads)
    single[name] = {k: np.asarray(v).tolist() for k, v in final.items()}
  out["single"] = single

  auto = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Auto,) * 2)
  explicit = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)
  out["auto"] = on_mesh(auto, list(makers))
  out["explicit"] = on_mesh(explicit, list(makers))

  # Top-k and DARE on a large leaf sharded over both mesh axes.
  x = (rng.standard_normal(BIG) * np.logspace(-2, 2, BIG[1])[None, :]).astype(np.float32)
  x[::7, ::3] = 1.5  # ties, so the position tie-break runs as well
  big = {}
  funcs = {
    "exact": lambda v: sparsify.ties(v, 0.013),
    "sampled": lambda v: sparsify.ties(v, 0.013, "sampled"),
    "dare": lambda v: sparsify.dare(v, 0.3, seed=1, stream=0, step=2, leaf_index=4),
    # Each row a tensor of its own (a stacked leaf whose layer axis is sharded).
    "stacked_exact": lambda v: sparsify.ties(v, 0.013, "exact", 1),
    "stacked_sampled": lambda v: sparsify.ties(v, 0.013, "sampled", 1),
  }
  for name, f in funcs.items():
    want = np.asarray(jax.jit(f)(jnp.asarray(x)))
    for kind, mesh in (("auto", auto), ("explicit", explicit)):
      with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("fsdp", "tp")))
        compiled = jax.jit(f).lower(xs).compile()
        got = compiled(xs)
        gathered = 0
        for line in compiled.as_text().splitlines():
          if " all-gather(" in line:
            dims = line.split("=", 1)[1].split("[", 1)[1].split("]", 1)[0]
            gathered += math.prod(int(d) for d in dims.split(",") if d)
        big[f"{name}/{kind}"] = {
          "equal": bool(np.array_equal(np.asarray(got), want)),
          "kept": int(np.sum(np.asarray(got) != 0)),
          "spec": str(tuple(got.sharding.spec)),
          "gathered_elements": gathered,
        }
  out["big"] = big

  # pmap data parallelism: per-device grads, pmean, replicas must agree.
  pm = {}
  for name in ("ondare", "onties_exact"):
    tx = makers[name]()
    # Dyadic grads, fresh each step: their mean is exact in any summation
    # order, so the single-device run sees bit-identical grads (TIES's choice
    # among near-equal magnitudes would otherwise follow rounding).
    batches = [
      {k: (rng.integers(-64, 64, (8,) + s) / 64).astype(np.float32) for k, s in SHAPES.items()}
      for _ in range(3)
    ]

    def pstep(p, s, g, tx=tx):
      g = jax.lax.pmean(g, "data")
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    params = {k: jnp.asarray(v) for k, v in params0.items()}
    rep = jax.tree.map(lambda v: jnp.stack([v] * 8), params)
    state = jax.pmap(tx.init)(rep)
    f = jax.pmap(pstep, axis_name="data")
    for batch in batches:
      rep, state = f(rep, state, batch)
    means = [{k: jnp.asarray(v.mean(0)) for k, v in b.items()} for b in batches]
    ref, _, _ = steps(tx, params, tx.init(params), means)
    pm[name] = {
      "replicas_identical": all(
        bool(np.all(np.asarray(rep[k]) == np.asarray(rep[k])[0])) for k in SHAPES
      ),
      "max_diff_to_single": max(
        float(np.max(np.abs(np.asarray(rep[k])[0] - np.asarray(ref[k])))) for k in SHAPES
      ),
    }
  out["pmap"] = pm
  print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def child():
  # Every check compares runs of this one child: LLVM's optimisation passes
  # (a quarter of its time, mostly compiling) change nothing they assert.
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
  )
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT ") :])


def _assert_params_close(got, want):
  for k in SHAPES:
    np.testing.assert_allclose(
      np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-6, err_msg=k
    )


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_mesh_equals_one_device(child, kind):
  assert child[kind], "no method ran"
  for name, res in child[kind].items():
    _assert_params_close(res["params"], child["single"][name])
    assert res["param_specs_kept"], name


def test_steps_changed_params(child):
  # Guard against a vacuous comparison: every method moved every leaf.
  start = np.random.default_rng(0)
  params0 = {k: start.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
  for name, params in child["single"].items():
    for k in SHAPES:
      assert np.max(np.abs(np.asarray(params[k]) - params0[k])) > 1e-3, (name, k)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_state_sharded_like_params(child, kind):
  for name, res in child[kind].items():
    want = {k: str(tuple(SPECS[k])) for k in SHAPES}
    assert res["reference_specs"] == want, name
    assert res["accumulator"] == name.endswith("_k3"), name
    # Adam's moments, the reference and the accumulator, from a sharded or a host tau.
    leaves = [k for k in SHAPES if SHAPES[k]]
    assert len(res["state_specs"]) == len(leaves), (name, res["state_specs"])
    assert all(spec == str(tuple(SPECS[k])) for k, spec in res["state_specs"]), name
    assert res["host_tau_state_specs"] == res["state_specs"], name


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_eager_init_embeds_no_reference_delta_and_types_are_stable(child, kind):
  for name, res in child[kind].items():
    eager, host, argument, jitted = res["captured"]
    # tau is an argument of every program, never a constant.
    assert eager == host == argument == 0, name
    assert jitted > 0, name  # jax.jit(tx.init) captures it: the check can fail
    # jit(init), init, update and the one-program init give the same types (shardings too).
    assert res["same_types"] == [True, True, True], name


def test_small_leaves_not_gathered(child):
  for kind in ("auto", "explicit"):
    for name, res in child[kind].items():
      if name.startswith("ondare"):
        assert res["all_gathers"] == 0, (kind, name)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("name", ["exact", "sampled", "dare", "stacked_exact", "stacked_sampled"])
def test_large_sharded_leaf(child, kind, name):
  res = child["big"][f"{name}/{kind}"]
  assert res["equal"], res  # same kept set (and DARE mask) as on one device
  assert res["spec"] == "('fsdp', 'tp')"
  # k = floor(0.013 n), written out: 4259 of the 640 x 512 leaf, 6 of each 512-entry row.
  if name == "exact":
    assert res["kept"] == 4259
  if name == "stacked_exact":
    assert res["kept"] == BIG[0] * 6
  # Only samples and histograms move between devices, never the leaf.
  assert res["gathered_elements"] < 0.3 * math.prod(BIG), res


@pytest.mark.parametrize("name", ["ondare", "onties_exact"])
def test_pmap_replicas_identical(child, name):
  res = child["pmap"][name]
  assert res["replicas_identical"]
  assert res["max_diff_to_single"] <= 1e-6


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  _child()
