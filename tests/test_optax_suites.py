"""Optax's own test suites (contrib common tests, sharding tests) on our optimizers.

``tests/optax_suites.py`` execs optax's ``contrib/_common_test.py`` and
``_src/sharding_test.py`` from the installed wheel with our optimizers in
place of theirs. The sharding tests need 8 devices, and JAX fixes its device
count when it first starts (in this process: one), so pytest runs the adapter
in a child process with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
and writes a JUnit XML report; the tests below read it, one line per
failing case with its arguments.
"""

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

# One worker runs this file (conftest.ONE_WORKER): its module fixture (a subprocess)
# then runs once, not once per worker.

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Cases, for the 5 optimizers of optax_suites.OPTIMIZERS. ContribTest (78):
# accept_extra_args x wrap (2) 10, optimizers x target (4) 20, inject_hyperparams 5,
# preserve_dtype x dtype (2) 10, gradient_accumulation x dtype (2) 10,
# state_shape_dtype_shard_stability x dtype (4) 20 less the 2 TIES float64
# cases optax_suites.py excludes (TIES refuses float64 leaves by design),
# learning_rate_schedule 5. ShardingTest (16): 3 tests x 5 optimizers, and the
# optimizer-free microbatch_with_explicit_sharding_replicated (its sharded case,
# an optax-vs-jax failure, is excluded there too).
EXPECTED_CASES = 94

# Skips allowed, by test name (none). The skips in optax's files cannot apply:
# inject_hyperparams skips reduce_on_plateau (not ours); the schedule test skips
# an optimizer whose learning_rate is not annotated ScalarOrSchedule (ours is:
# a skip would mean the annotation got lost); complex128 on TPU (runs on CPU);
# the jax version skips (optax_suites.py compares versions, jax here is newer).
ALLOWED_SKIPS = {}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  xml = tmp_path_factory.mktemp("optax_suites") / "junit.xml"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  start = time.monotonic()
  # -o addopts=: not the repo's --dist loadgroup; -p no:cacheprovider: leave no cache.
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-o",
      "addopts=",
      "-p",
      "no:cacheprovider",
      f"--junitxml={xml}",
      os.path.join(HERE, "optax_suites.py"),
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  print(f"optax suites: {time.monotonic() - start:.0f} s, exit {proc.returncode}")
  assert xml.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
  cases = {}
  for case in ET.parse(xml).iter("testcase"):
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    outcomes = [
      (o.tag, o.get("message", ""), o.text or "")
      for o in case
      if o.tag in ("failure", "error", "skipped")
    ]
    cases[f"{case.get('classname')}::{case.get('name')}"] = (props.get("case", ""), outcomes)
  return cases, proc


def _describe(cases, tags):
  """One entry per outcome in ``tags``: node, arguments, message, where it was raised."""
  entries = []
  for node, (args, outcomes) in sorted(cases.items()):
    for tag, message, text in outcomes:
      # JAX's note on its filtered frames ends most messages: noise here.
      message = message.split("\n--------------------")[0][:500]
      entry = "\n  ".join([f"{tag.upper()} {node}", args[:300], message, *text.splitlines()[-1:]])
      if tag in tags and entry not in entries:  # subtests of one case may fail alike
        entries.append(entry)
  return entries


@pytest.mark.slow
def test_all_cases_ran(report):
  cases, proc = report
  assert len(cases) == EXPECTED_CASES, (sorted(cases), proc.stdout[-3000:], proc.stderr[-3000:])


@pytest.mark.slow
def test_no_failures(report):
  cases, _ = report
  failed = _describe(cases, ("failure", "error"))
  assert not failed, f"{len(failed)} failures:\n" + "\n".join(failed)


@pytest.mark.slow
def test_skips_are_allowed(report):
  cases, _ = report
  skipped = {
    n.split("::")[-1] for n, (_, o) in cases.items() if any(t == "skipped" for t, _, _ in o)
  }
  assert skipped == set(ALLOWED_SKIPS), "\n".join(_describe(cases, ("skipped",)))
