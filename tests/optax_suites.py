"""Optax's own optimizer test suites, run against omerge_jax's optimizers.

Reads ``optax/contrib/_common_test.py`` (convergence, extra args,
inject_hyperparams, dtypes, MultiSteps, schedules) and
``optax/_src/sharding_test.py`` from the installed optax, puts our optimizers
in place of theirs and fixes the version skips, each by exact replacement of a
text that must be found (an optax release that changes it fails here, loudly,
rather than testing something else), and execs them, writing nothing: pytest
collects ``ContribTest`` and ``ShardingTest`` here. ``test_optax_suites.py``
runs this file in a child process with 8 CPU devices.
"""

import linecache
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import omerge_jax

RESERVE_P = 0.5  # TIES keeps floor(p n) = 1 entry of the targets' 2-entry leaves
ALPHA = 1e-3  # the reference's pull, ALPHA * 1e-6 a step, is nothing against the steps


def from_params(make):
  """``make(tau)``, with ``tau`` a reference delta shaped like the params it is given.

  Optax's tests give params only to ``init``/``update``; ours need a reference
  delta shaped like them when built. ``tau = 1e-6 cos(1..n)`` per leaf reads
  only shapes and dtypes (params may be tracers or ``jax.ShapeDtypeStruct``).
  Cached per structure, shapes and dtypes: ``init`` and ``update`` share one.
  """
  built = {}

  def transform(params):
    leaves, treedef = jax.tree.flatten(params)
    if not leaves:  # optax.tree.map_params's placeholder: the last params' state shape
      return built["last"]
    key = (treedef, tuple((tuple(l.shape), jnp.dtype(l.dtype)) for l in leaves))
    if key not in built:
      tau = [1e-6 * np.cos(np.arange(1, math.prod(l.shape) + 1)).reshape(l.shape) for l in leaves]
      tau = [np.asarray(t, dtype=jnp.dtype(l.dtype)) for t, l in zip(tau, leaves, strict=True)]
      built[key] = make(jax.tree.unflatten(treedef, tau))
    built["last"] = built[key]
    return built[key]

  def update(updates, state, params=None, **extra_args):
    # Extra args go through: an optimizer that refuses them must fail here.
    tx = transform(updates if params is None else params)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(lambda p: transform(p).init(p), update)


def _factory(build, **static):
  # learning_rate and alpha may be injected (inject_hyperparams) or a schedule;
  # reserve_p, merge_every, topk, seed are closed over: they must stay static.
  # No `from __future__ import annotations`: optax's schedule test reads the annotation.
  def factory(learning_rate: optax.ScalarOrSchedule, alpha: optax.ScalarOrSchedule = ALPHA):
    return from_params(lambda tau: build(learning_rate, tau, alpha=alpha, **static))

  return factory


def _sgd_online_merge(learning_rate, tau, **kwargs):
  return optax.chain(optax.sgd(learning_rate), omerge_jax.online_merge(tau, **kwargs))


# Name (the test id) -> (factory, learning rate of the contrib tests). Adam's
# 1e-2 as optax's adopt/madgrad; SGD's keeps lr / p * 1002 (DARE scales kept
# entries by 1/p; 1002: Rosenbrock's top Hessian eigenvalue at the optimum) < 2.
OPTIMIZERS = {
  "ondare": (_factory(omerge_jax.ondare, reserve_p=RESERVE_P, seed=0), 1e-2),
  "onties_exact": (_factory(omerge_jax.onties, reserve_p=RESERVE_P, topk="exact"), 1e-2),
  "onties_sampled": (_factory(omerge_jax.onties, reserve_p=RESERVE_P, topk="sampled"), 1e-2),
  "ondare_k3": (_factory(omerge_jax.ondare, reserve_p=RESERVE_P, merge_every=3), 1e-2),
  "sgd_online_merge": (_factory(_sgd_online_merge, reserve_p=RESERVE_P), 5e-4),
}
CONTRIB_LIST = [
  dict(
    opt_name=name,
    opt_kwargs=dict(learning_rate=lr, alpha=ALPHA),
    wrapper_name=None,
    wrapper_kwargs=None,
  )
  for name, (_, lr) in OPTIMIZERS.items()
]
SHARDING_DICT = {name: factory(learning_rate=1.0) for name, (factory, _) in OPTIMIZERS.items()}


def _replace(source, old, new, count=1):
  if source.count(old) != count:
    raise RuntimeError(f"optax's test file changed: expected {count} x {old!r}")
  return source.replace(old, new)


def _between(source, start, end, new):
  """``source`` with the text from ``start`` up to ``end`` (kept) replaced by ``new``."""
  i, j = source.find(start), source.find(end)
  if not 0 <= i < j:
    raise RuntimeError(f"optax's test file changed: no {start!r} ... {end!r}")
  return _replace(source, source[i:j], new)


def _load(relpath, edit, **names):
  """Exec optax's ``relpath``, edited by ``edit(source)``, with ``names`` as globals."""
  path = os.path.join(os.path.dirname(optax.__file__), relpath)
  with open(path, encoding="utf-8") as f:
    source = edit(f.read())
  filename = f"<{path}, adapted by {__name__}>"
  # Tracebacks then show the edited text, not the file's lines at those numbers.
  linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
  namespace = dict(names, __name__=f"{__name__}.{os.path.basename(relpath)[:-3]}")
  exec(compile(source, filename, "exec"), namespace)  # pylint: disable=exec-used
  return namespace


def _edit_contrib(source):
  # Their lists (main, wrappers, base optimizers under mechanize) -> ours, unwrapped.
  source = _between(
    source,
    "_MAIN_OPTIMIZERS_UNDER_TEST = [",
    "_ALL_OPTIMIZERS_UNDER_TEST = ",
    "_MAIN_OPTIMIZERS_UNDER_TEST = list(_OURS)\n_OTHER_OPTIMIZERS_UNDER_TEST = []\n\n",
  )
  head = 'def _get_opt_factory(opt_name):\n  """Get optimizer factory."""\n'
  return _replace(
    source, head, head + "  if opt_name in _OUR_FACTORIES:\n    return _OUR_FACTORIES[opt_name]\n"
  )


def _edit_sharding(source):
  source = _between(source, "OPTIMIZERS = {", "class ShardingTest(", "OPTIMIZERS = _OURS\n\n\n")
  # The originals compare strings: '0.10.2' < '0.7.2', so they skip on jax 0.10.
  source = _replace(source, "jax.__version__ < '0.7.2'", "jax.__version_info__ < (0, 7, 2)", 2)
  return _replace(source, "jax.__version__ < '0.8.1'", "jax.__version_info__ < (0, 8, 1)", 1)


ContribTest = _load(
  "contrib/_common_test.py",
  _edit_contrib,
  _OURS=CONTRIB_LIST,
  _OUR_FACTORIES={name: f for name, (f, _) in OPTIMIZERS.items()},
)["ContribTest"]
ShardingTest = _load("_src/sharding_test.py", _edit_sharding, _OURS=SHARDING_DICT)["ShardingTest"]


def _exclude():
  """Cases excluded from the run (not failed), each for the reason given."""
  # TIES ranks magnitudes by their float32 bits and refuses float64 leaves
  # with a TypeError naming them (_validation.check_ties_dtypes), by design.
  for name, test in list(vars(ContribTest).items()):
    args = (getattr(test, "__doc__", None) or "").split("\n")[0]  # absl's argument list
    if (
      name.startswith("test_state_shape_dtype_shard_stability")
      and "float64" in args
      and "opt_name='onties_" in args
    ):
      delattr(ContribTest, name)
  # Optimizer-free, and optax 0.2.8 against jax 0.10: optax.microbatching's
  # reshape(order='F') of an Explicit-sharded int32[2,8@x] raises ShardingTypeError
  # ("This reshape is not supported"). The replicated case runs (and passes).
  delattr(ShardingTest, "test_microbatch_with_explicit_sharding_sharded")


_exclude()


@pytest.fixture(autouse=True)
def _case_in_report(request):
  # absl numbers product() cases (test_optimizers7): JUnit XML gets each one's arguments.
  request.node.user_properties.append(("case", (request.function.__doc__ or "").split("\n")[0]))
