"""experiments/train_sharded.py: one host with 8 devices vs two hosts with 4 each.

Both run in subprocesses on CPU (device counts are fixed at jax import);
the two-host run uses jax.distributed over gloo on localhost, as a SLURM job
would over the network.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "experiments", "train_sharded.py")
ARGS = ["--parallelism", "fsdp", "--mesh", "2,4", "--steps", "30",
        "--hidden", "256"]


def cpu_env(devices, **extra):
  return dict(os.environ, JAX_PLATFORMS="cpu",
              # Fake CPU devices on few cores: run one program at a time.
              JAX_CPU_ENABLE_ASYNC_DISPATCH="false",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              **extra)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
  out = tmp_path_factory.mktemp("one") / "r.json"
  subprocess.run([sys.executable, SCRIPT, *ARGS, "--json", str(out)],
                 env=cpu_env(8), check=True, capture_output=True, timeout=300)
  return json.loads(out.read_text())


def test_two_hosts_train_like_one(one_host, tmp_path):
  out = tmp_path / "r.json"
  common = dict(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
                JAX_NUM_PROCESSES="2")
  procs = [subprocess.Popen(
      [sys.executable, SCRIPT, *ARGS, "--distributed", "--json", str(out)],
      env=cpu_env(4, JAX_PROCESS_ID=str(i), **common),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
  two_hosts = json.loads(out.read_text())  # written by process 0 only
  assert two_hosts["processes"] == 2 and one_host["processes"] == 1
  assert two_hosts["devices"] == one_host["devices"] == 8
  np.testing.assert_allclose(two_hosts["losses"], one_host["losses"],
                             rtol=2e-3)
  assert two_hosts["skipped_steps"] == one_host["skipped_steps"]
  assert two_hosts["final_loss_scale"] == one_host["final_loss_scale"]
  assert two_hosts["losses"][-1] < 0.7 * two_hosts["losses"][0]
