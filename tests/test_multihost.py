"""train.py on 2 processes x 2 CPU devices (localhost, gloo collectives through
`jax.distributed.initialize` from JAX_* environment variables, as README "Multiple GPUs / hosts"
runs it) against the same run on one device; eval.py then restores that 4-device checkpoint on 1
device. A batch the mesh cannot split fails with one line before anything is written."""

import json
import os
import random
import socket
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_train import ROOT, STORIES, args, assert_perplexity

STEPS = 4
EXTRA = (
  f"--config.optim.total_steps={STEPS}",
  "--config.data.batch_size=4",
  "--config.train.eval_blocks=8",
  f"--config.train.checkpoint_every={STEPS}",
)


def env(devices: int, **extra) -> dict:
  return {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), **extra}


def free_port() -> int:
  """A port free now; where the kernel's ephemeral range leaves room, one below it, so that between
  this check and the coordinator's bind no outgoing connection (of the suite's other workers, say)
  can be handed it."""
  try:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
      ephemeral = int(f.read().split()[0])
  except OSError:
    ephemeral = 0
  rng = random.Random()  # its own seed: not the one a test may have set
  candidates = [rng.randrange(10_000, ephemeral) for _ in range(100)] if ephemeral > 11_000 else []
  for port in [*candidates, 0]:
    with socket.socket() as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
      return s.getsockname()[1]
  raise OSError("no port of localhost could be bound")


def records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").open()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(one-device workdir, 2-process workdir), run concurrently."""
  if not STORIES.exists():
    pytest.skip("../shared/data not present")
  single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("multi")
  port = free_port()
  mesh = (
    "--config.mesh.distributed=True",
    "--config.mesh.fsdp=2",
    "--config.mesh.min_shard_bytes=0",
  )
  procs = [subprocess.Popen(args(single, *EXTRA), cwd=ROOT, env=env(1), stderr=subprocess.PIPE)]
  for rank in range(2):
    distributed = env(
      2,
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(rank),
    )
    procs.append(
      subprocess.Popen(
        args(multi, *EXTRA, *mesh), cwd=ROOT, env=distributed, stderr=subprocess.PIPE
      )
    )
  try:
    errors = [p.communicate(timeout=600)[1].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-3000:]
  return single, multi


def test_two_processes_train_like_one_device(runs):
  single, multi = runs
  want, got = records(single), records(multi)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for key in ("loss", "grad_norm", "eval_loss"):
    a = [r[key] for r in got if key in r]
    b = [r[key] for r in want if key in r]
    np.testing.assert_allclose(a, b, rtol=1e-4, err_msg=key)
  a = load_file(multi / f"adapter-step{STEPS}" / "adapter_model.safetensors")
  b = load_file(single / f"adapter-step{STEPS}" / "adapter_model.safetensors")
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_checkpoint_of_4_devices_evaluates_on_1(runs):
  _, multi = runs
  cmd = args(multi, *EXTRA)
  cmd[1] = str(ROOT / "eval.py")
  out = subprocess.run(
    cmd, check=False, cwd=ROOT, env=env(1), capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")][1:]
  ppl = {r[1].strip(): float(r[4]) for r in rows}
  final = records(multi)[-1]["eval_loss"]
  assert_perplexity(ppl[f"+ adapters (step {STEPS})"], final)


def test_batch_the_mesh_cannot_split_fails_before_writing(tmp_path):
  if not STORIES.exists():
    pytest.skip("../shared/data not present")
  cmd = args(tmp_path / "w", "--config.data.batch_size=3")
  out = subprocess.run(
    cmd, check=False, cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=600
  )
  assert out.returncode != 0
  assert "config.data.batch_size=3 does not split over data x fsdp = 2 devices" in out.stderr
  assert not (tmp_path / "w").exists()
