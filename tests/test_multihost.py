"""Multi-host: 2 local processes joined by `jax.distributed.initialize` = one run.

Each process is started with 4 simulated CPU devices and a loopback
coordinator; together they hold one (fsdp=4, tp=2) mesh of 8 devices and run
a few sharded OnDARE / OnTIES steps (`multihost_worker.py`). The gathered
params must equal those of the same steps run here, in one process on one
device.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_worker as worker  # noqa: E402

# One worker runs this file (conftest.ONE_WORKER): its module fixture (a subprocess)
# then runs once, not once per worker.


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("multihost") / "params.npz")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  procs = [
    subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port), out],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs, strict=True):
    assert p.returncode == 0, log[-3000:]
  with np.load(out) as f:
    return dict(f)


@pytest.mark.parametrize("method", worker.METHODS)
def test_two_processes_equal_one_process(two_process_result, method):
  single = worker.run_steps(method, lambda tree: jax.tree.map(jnp.asarray, tree))
  initial = worker.inputs()[0]
  for name, value in single.items():
    got = two_process_result[f"{method}/{name}"]
    assert got.shape == worker.SHAPES[name]
    # The steps moved the params, and both runs moved them alike.
    assert np.abs(np.asarray(value) - initial[name]).max() > 1e-3
    np.testing.assert_allclose(got, np.asarray(value), rtol=1e-6, atol=1e-6, err_msg=name)
