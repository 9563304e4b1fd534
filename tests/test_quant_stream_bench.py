"""benchmarks/quant_stream.py end to end on CPU: a tiny synthetic model quantized through the
streamed path, saved tensor by tensor; the saved base equals the in-memory quantization of the same
synthetic weights, and the table's bits are the report's. Bad input is one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from lowra_jax.models.weights_source import SyntheticSource
from lowra_jax.quantize import QuantConfig, bits_per_param, quantize_params
from lowra_jax.quantize.pipeline import nest
from lowra_jax.quantize.serialize import load_quantized

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from quant_stream import CPU_SHAPES  # noqa: E402


def _start(*args: str) -> subprocess.Popen:
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  cmd = [sys.executable, "benchmarks/quant_stream.py", *args]
  pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
  return subprocess.Popen(cmd, cwd=ROOT, env=env, **pipes)


def test_tiny_shape_end_to_end(tmp_path):
  proc = _start("--shape=tiny", "--seed=2", "--no_progress", f"--save={tmp_path / 'base'}")
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  header, _, row = stdout.strip().splitlines()[-3:]
  cells = dict(zip(header.split("|")[1:-1], row.split("|")[1:-1]))
  cells = {k.strip(): v.strip() for k, v in cells.items()}
  assert cells["model"] == "tiny (2 layers)" and cells["method"] == "lowra 1.5"
  passes = float(cells["pass 1 s"]) + float(cells["pass 2 s"])
  # total >= pass 1 + pass 2, each of the three printed to 0.1 s: off by up to 0.05 s apiece
  assert float(cells["total s"]) >= passes - 0.15 - 1e-9

  reference, report = quantize_params(
    nest(SyntheticSource(CPU_SHAPES["tiny"], seed=2)), QuantConfig(budget=1.5), progress=False
  )
  saved, extra = load_quantized(tmp_path / "base")
  assert extra["source"] == "tiny (2 layers)"
  assert jax.tree.structure(saved) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(jax.device_get(saved)), jax.tree.leaves(reference)):
    assert np.asarray(a).tobytes() == np.asarray(jax.device_get(b)).tobytes()
  assert float(cells["code bits"]) == round(report.code_bits, 3) <= 1.5
  assert float(cells["total bits"]) == round(bits_per_param(saved).total, 3)


def test_bad_input_is_one_line_and_writes_nothing(tmp_path):
  (tmp_path / "base").mkdir()
  cases = [
    (["--shape=tiny", "--layers=-2"], "-2"),
    (["--shape=tiny", "--budget=0.5"], "0.5"),
    ([f"--checkpoint={tmp_path / 'none'}"], "none"),
    (["--shape=tiny", f"--save={tmp_path / 'base'}"], "base"),
    (["--shape=tiny", "--loftq=-1"], "-1"),
    (["--shape=tiny", "--calibrate=2", "--method=nf"], "--calibrate"),
    (["--shape=tiny", "--gptq"], "--calibrate=N"),
    (["--shape=tiny", "--fisher"], "add --calibrate=N"),
    (["--shape=tiny", "--calibrate=2", "--refit"], "add --gptq"),
    (["--shape=tiny", "--calibrate=2", "--sequential"], "--sequential orders GPTQ's"),
    (["--shape=tiny", "--loftq=1", f"--save={tmp_path / 'new'}"], "--save"),
  ]
  procs = [(_start(*args), named) for args, named in cases]  # concurrently
  for proc, named in procs:
    stderr = proc.communicate(timeout=300)[1]
    lines = stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("error: ") and named in lines[0], lines[0]
  assert [p.name for p in tmp_path.iterdir()] == ["base"]


def test_loftq_rounds_report_the_in_memory_errors():
  """`--loftq=2 --method=nf`: the streamed rounds' errors equal `loftq.loftq` on the same
  synthetic weights held in memory (printed to 4 decimals)."""
  from lowra_jax import loftq, lora

  proc = _start("--shape=tiny", "--seed=1", "--method=nf", "--loftq=2", "--no_progress")
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  line = next(l for l in stdout.splitlines() if l.startswith("loftq: "))
  params = nest(SyntheticSource(CPU_SHAPES["tiny"], seed=1))
  config = lora.LoraConfig(init="loftq", loftq_iters=2)
  _, _, report = loftq.loftq(
    params, QuantConfig(method="nf", bits=4), targets=list(lora.target_paths(params, config)),
    rank=config.rank, scale=config.scale, iters=2, progress=False,
  )
  assert f"{report.quant_error:.4f} (quantized) -> {[round(e, 4) for e in report.errors]}" in line


def test_gptq_rounding_runs_on_calibration_covariances():
  """`--calibrate=2 --gptq --refit --fisher --sequential`: covariances (through the quantized
  layers) and output gradients of 2 blocks, then LowRA weighted by both with GPTQ rounding and
  refitted levels, end to end (each tested against float64 numpy or the whole model's gradient in
  test_gptq.py and test_calibration.py)."""
  proc = _start(
    "--shape=tiny", "--calibrate=2", "--gptq", "--refit", "--fisher", "--sequential",
    "--no_progress",
  )
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert "calibration: 2 x 512 tokens in" in stdout and "output gradients" in stdout
  assert "(through the quantized layers)" in stdout
  header, _, row = stdout.strip().splitlines()[-3:]
  cells = {k.strip(): v.strip() for k, v in zip(header.split("|")[1:-1], row.split("|")[1:-1])}
  assert cells["method"] == "lowra 1.5 gptq fisher + refit sequential" and float(cells["code bits"]) <= 1.5
