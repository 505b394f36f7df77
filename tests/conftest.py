"""How `make test` spreads the tests over pytest-xdist's workers.

Each file of ONE_WORKER has a module fixture (mostly a subprocess) that
computes what all its tests assert: its tests run on one worker, so the
fixture runs once, not once per worker. The ``xdist_group`` mark did this
until pytest 9.2: xdist 3.8 still tags the group onto ``item._nodeid``, which
pytest no longer reads, and the tests were spread as if unmarked
(pytest-xdist issue 1386). Grouping by file name needs no collected item.

Tests marked ``slow`` are collected first, so each starts early and the two
workers end together rather than one running a long test alone at the end.
"""

import os

import pytest

# libtpu (the TPU compiler of test_tpu_compile.py) takes a lockfile that one
# process may hold at a time; every process of the suite that starts JAX
# with libtpu installed tries it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ONE_WORKER = {
  "test_checkpoint.py",
  "test_checkpoints_bad.py",
  "test_digests.py",
  "test_llm_export.py",
  "test_llm_merge.py",
  "test_multihost.py",
  "test_optax_suites.py",
  "test_real_lm.py",
  "test_sharding.py",
  "test_tpu_compile.py",
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadGroupScheduling  # pylint: disable=g-import-not-at-top

  class OneWorkerFiles(LoadGroupScheduling):
    def _split_scope(self, nodeid):
      path = nodeid.split("::", 1)[0]
      return path if os.path.basename(path) in ONE_WORKER else super()._split_scope(nodeid)

  return OneWorkerFiles(config, log)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
