"""train.py end to end (subprocesses, CPU): SIGKILL + resume equals an uninterrupted run and the
eval loss falls (bad input: test_user_errors.py)."""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from tolerances import (
  assert_close_at_scale,
  f32_sum,
  f32_sum_random,
  llama_grad_terms,
  llama_terms,
)

from lowra_jax.models import llama

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"
TINYSTORIES = DATA / "tinystories" / "tinystories_val.txt"
STEPS = 12

# This module's train.py / eval.py children share a persistent XLA compilation cache, in a fresh
# temporary directory (each session starts cold, nothing is left behind): the killed, resumed and
# eval.py runs compile the straight run's programs again, and a hit returns the executable XLA
# would compile. Only here: where each program is compiled once (make demo), keying every program
# costs more than it saves.
_CACHE = tempfile.mkdtemp(prefix="lowra-jax-test-train-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
ENV = {
  **os.environ,
  "JAX_COMPILATION_CACHE_DIR": _CACHE,
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def args(workdir: Path, *extra: str) -> list[str]:
  text = {"name": "text", "path": str(TINYSTORIES), "max_documents": 300, "seq_len": 64}
  overrides = [
    f"--config.workdir={workdir}",
    f"--config.model.path={STORIES}",
    "--config.model.dtype=float32",
    "--config.quant.method=nf",
    "--config.quant.calibration=none",  # NF has no fit to calibrate
    "--config.quant.rounding=nearest",  # nor GPTQ's covariances to round and refit with
    "--config.quant.refit=False",
    "--config.lora.loftq_weighting=none",  # nor input moments to weigh LoftQ's fit by
    "--config.quant.bits=2",
    "--config.lora.rank=4",
    "--config.lora.loftq_iters=1",
    f"--config.optim.total_steps={STEPS}",
    "--config.optim.learning_rate=0.01",
    "--config.optim.warmup_steps=2",
    "--config.train.log_every=2",
    "--config.train.checkpoint_every=2",
    "--config.train.eval_blocks=16",
  ]
  for section in ("data", "eval_data"):
    overrides += [f"--config.{section}.{k}={v}" for k, v in text.items()]
  return [sys.executable, str(ROOT / "train.py"), "--config=configs/demo.py", *overrides, *extra]


def run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    args(workdir, *extra), cwd=ROOT, env=ENV, check=False, capture_output=True, text=True,
    timeout=600,
  )


def assert_perplexity(printed: float, loss: float) -> None:
  """eval.py prints exp(loss) to 3 decimals, within 5e-4: log(printed) is within
  log(printed / (printed - 5e-4)) of the loss, plus the loss's float32 error, `f32_sum_random` of
  the terms along the stories260K forward pass at seq_len 64, at the loss's scale."""
  config = llama.load_pretrained(STORIES)[0].config
  bound = np.log(printed / (printed - 5e-4)) + f32_sum_random(llama_terms(config, 64)) * loss
  assert abs(np.log(printed) - loss) <= bound, (printed, loss, bound)


def adapters(workdir: Path) -> dict:
  return load_file(workdir / f"adapter-step{STEPS}" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def need_data():
  if not STORIES.exists():
    pytest.skip("../shared/data not present")


@pytest.fixture(scope="module")
def straight(need_data, tmp_path_factory):
  """An uninterrupted run's workdir."""
  workdir = tmp_path_factory.mktemp("straight")
  out = run(workdir)
  assert out.returncode == 0, out.stderr[-2000:]
  return workdir


def test_training_lowers_eval_loss_and_eval_reports_it(straight):
  records = [json.loads(line) for line in (straight / "metrics.jsonl").open()]
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  assert evals[-1] < evals[0] - 0.05  # fine-tuning lowers the held-out loss
  assert (straight / "loss.png").stat().st_size > 1000
  cmd = args(straight)
  cmd[1] = str(ROOT / "eval.py")
  out = subprocess.run(
    cmd, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")][1:]
  ppl = {r[1].strip(): float(r[4]) for r in rows}
  assert list(ppl) == [
    "fp32 base",
    "quantized base",
    "+ LoftQ adapters (step 0)",
    f"+ adapters (step {STEPS})",
  ]
  assert ppl[f"+ adapters (step {STEPS})"] < ppl["quantized base"]
  assert_perplexity(ppl[f"+ adapters (step {STEPS})"], evals[-1])
  summary = json.loads((straight / "summary.json").read_text())
  assert summary["code_bits"] == 2.0 and summary["steps"] == STEPS
  assert summary["init_eval_loss"] == evals[0] and summary["final_eval_loss"] == evals[-1]
  # LoftQ init: the quantized base alone is logged too; eval.py measures it independently.
  assert_perplexity(ppl["quantized base"], summary["base_eval_loss"])
  assert summary["base_eval_loss"] > summary["init_eval_loss"]
  # eval.py's LoftQ row scores the saved initial adapters: train.py's step-0 eval.
  assert_perplexity(ppl["+ LoftQ adapters (step 0)"], summary["init_eval_loss"])
  assert (straight / "base" / "tree.json").exists()  # eval.py loaded this base, not a new one
  out = subprocess.run(
    [*cmd, "--config.quant.bits=4"], check=False, cwd=ROOT, env=ENV, capture_output=True,
    text=True,
  )
  assert out.returncode != 0 and "other model/quant/calib/lora/seed settings" in out.stderr
  out = subprocess.run(
    [*cmd, "--config.train.eval_dense=False"], check=False, cwd=ROOT, env=ENV,
    capture_output=True, text=True,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")][1:]
  without_dense = {k: v for k, v in ppl.items() if k != "fp32 base"}
  assert {r[1].strip(): float(r[4]) for r in rows} == without_dense


def test_kill_and_resume_equals_uninterrupted_run(straight, tmp_path):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    args(workdir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "6").exists() and time.time() < deadline:
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / f"adapter-step{STEPS}").exists()
  resumed = run(workdir, "--config.train.resume=True")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resumed from step" in resumed.stderr + resumed.stdout
  a, b = adapters(straight), adapters(workdir)
  assert a.keys() == b.keys()
  for key in a:  # bit for bit: the same program resumed from the saved state
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_dense_lora_reference_runs_end_to_end(need_data, tmp_path):
  """quant.method='none' (configs/lora_bf16.py): nothing quantized, bits reported as 32 (fp32)."""
  workdir = tmp_path / "dense"
  out = run(workdir, "--config.quant.method=none", "--config.lora.init=qlora")
  assert out.returncode == 0, out.stderr[-2000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["code_bits"] == summary["total_bits"] == 32.0
  assert summary["base_eval_loss"] == summary["init_eval_loss"]  # B = 0: starts as the base
  assert np.isfinite(summary["final_eval_loss"])
  assert summary["final_eval_loss"] != summary["init_eval_loss"]
  cmd = args(workdir, "--config.quant.method=none", "--config.lora.init=qlora")
  cmd[1] = str(ROOT / "eval.py")
  out = subprocess.run(
    cmd, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")][1:]
  ppl = {r[1].strip(): float(r[4]) for r in rows}
  assert list(ppl) == ["fp32 base", f"+ adapters (step {STEPS})"]
  assert_perplexity(ppl["fp32 base"], summary["init_eval_loss"])


def _expected_moments(sequences: int, batch_size: int, full: bool) -> dict:
  """What train.py's calibration of the default data (stories260K) must cache."""
  from lowra_jax import calibration, data
  from lowra_jax.models.tokenizer import load_tokenizer
  from lowra_jax.models.weights_source import CheckpointSource

  text = data.DataConfig(name="text", path=str(TINYSTORIES), max_documents=300, seq_len=64)
  blocks = data.load(text, load_tokenizer(STORIES.parent)).blocks
  model = llama.Llama(CheckpointSource(STORIES).config, dtype=np.float32)
  return calibration.input_moments(
    model, CheckpointSource(STORIES), calibration.spread(blocks, sequences), batch_size, full=full
  )


CALIBRATED = (
  "--config.quant.method=lowra",
  "--config.quant.calibration=kernel",
  "--config.lora.init=qlora",
  "--config.calib.sequences=8",
  "--config.calib.batch_size=3",
  "--config.optim.total_steps=4",
)


def test_calibrated_run_caches_its_moments_and_refuses_a_base_of_other_calibration(
  need_data, tmp_path
):
  """quant.calibration: the moments of calib.sequences training blocks (the default data) are
  cached beside the base, and the saved base's identity holds the calibration."""
  workdir = tmp_path / "calibrated"
  out = run(workdir, *CALIBRATED)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "calibration: input moments of 8 sequences x 64 tokens" in out.stdout
  cached = load_file(workdir / "calibration.safetensors")
  expected = _expected_moments(8, 3, full=False)
  assert cached.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(cached[path], expected[path], err_msg=path)
  extra = json.loads((workdir / "base" / "tree.json").read_text())["extra"]
  assert extra["calibration"]["sequences"] == 8 and extra["quant"]["calibration"] == "kernel"
  out = run(workdir, *CALIBRATED, "--config.calib.sequences=16", "--config.train.resume=True")
  assert out.returncode != 0 and "other model/quant/calib/lora/seed settings" in out.stderr


def test_fisher_run_caches_the_output_gradients_beside_the_moments(need_data, tmp_path):
  """quant.calibration='fisher': the cache holds each kernel's input moments and its output
  gradients' second moments (`calibration.output_gradients` of the same blocks), the identity
  says so, and the run's base is that of those statistics."""
  from lowra_jax import calibration, data
  from lowra_jax.models.tokenizer import load_tokenizer
  from lowra_jax.models.weights_source import CheckpointSource
  from lowra_jax.quantize import pipeline

  workdir = tmp_path / "fisher"
  fisher = [a.replace("calibration=kernel", "calibration=fisher") for a in CALIBRATED]
  out = run(workdir, *fisher)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "calibration: input moments and output gradients (forward and backward) of 8" in out.stdout
  cached = load_file(workdir / "calibration.safetensors")
  moments = _expected_moments(8, 3, full=False)
  for path in moments:  # from the gradients' first forward: the same sums
    np.testing.assert_array_equal(cached[path], moments[path], err_msg=path)
  text = data.DataConfig(name="text", path=str(TINYSTORIES), max_documents=300, seq_len=64)
  blocks = data.load(text, load_tokenizer(STORIES.parent)).blocks
  model = llama.Llama(CheckpointSource(STORIES).config, dtype=np.float32)
  grads = calibration.output_gradients(
    model, CheckpointSource(STORIES), calibration.spread(blocks, 8), 3
  )
  assert cached.keys() == moments.keys() | grads.keys()
  assert grads.keys() == {pipeline.output_key(p) for p in moments}
  # another process's float32 gradients (squared: twice their relative error), summed over tokens
  bound = 4 * f32_sum_random(llama_grad_terms(model.config, 3, 64)) + f32_sum(8 * 64)
  for path, g in grads.items():
    assert_close_at_scale(cached[path], g, bound, err_msg=path)
  extra = json.loads((workdir / "base" / "tree.json").read_text())["extra"]
  assert extra["calibration"]["output_gradients"] and extra["quant"]["calibration"] == "fisher"


def test_gptq_run_quantizes_with_layer_by_layer_covariances(need_data, tmp_path):
  """quant.rounding='gptq': the cache holds the second moments only (of a model this small, the
  covariances' diagonals: their one forward, all kept, serves the moments too), and the saved
  base equals, bit for bit, the in-memory quantizer's given the whole covariances at once
  (`input_moments(full=True)`), which the run computes one decoder layer at a time instead."""
  from lowra_jax.quantize import QuantConfig, quantize_params
  from lowra_jax.quantize.serialize import load_quantized

  workdir = tmp_path / "gptq"
  out = run(workdir, *CALIBRATED, "--config.quant.rounding=gptq")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "gptq: input covariances, one forward, all kept" in out.stdout
  cached = load_file(workdir / "calibration.safetensors")
  full = _expected_moments(8, 3, full=True)
  assert cached.keys() == full.keys()
  for path, c in full.items():  # float32 sums of 8 x 64 rows, another process's order
    assert_close_at_scale(cached[path], np.diagonal(c), f32_sum(8 * 64), err_msg=path)
  h = dict(cached)
  extra = json.loads((workdir / "base" / "tree.json").read_text())["extra"]
  assert extra["quant"]["rounding"] == "gptq"
  fields = extra["quant"].items()
  quant = QuantConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields})
  _, params = llama.load_pretrained(STORIES, dtype=np.float32)
  expected, _ = quantize_params(
    params, quant, progress=False, importance=h, covariances=full
  )
  saved = load_quantized(workdir / "base")[0]["qparams"]
  got, want = jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(expected)
  assert len(got) == len(want)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
