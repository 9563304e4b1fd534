"""Quantizing as the weights are read (`quantize_stream`, `base.quantize_checkpoint`,
`base.loftq_checkpoint`).

The reference is the in-memory path: the whole checkpoint read by `llama.load_pretrained` and
quantized by `quantize_params` (LoftQ: `lora.init_lora`); the streamed result must equal it bit
for bit, on both bundled models. Memory is measured as the child process's peak RSS (VmHWM) above its own baseline,
against a synthetic model several times larger than the bound; the same measurement of the model
read whole shows that it would see one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from lowra_jax import base
from lowra_jax.models import llama, weights
from lowra_jax.models.shapes import SHAPES
from lowra_jax.models.weights_source import CheckpointSource, SyntheticSource
from lowra_jax.quantize import QuantConfig, pipeline, quantize_params
from lowra_jax.quantize.pipeline import nest, quantize_stream
from lowra_jax.quantize.serialize import Writer, load_quantized

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / ".." / "shared" / "data" / "models"
PYCODE = MODELS / "pycode-llama-17m"
STORIES = MODELS / "stories260K" / "stories260K.bin"
TINY = llama.LlamaConfig(256, 128, 320, 2, 4, 2, 32)


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"../shared/data not present ({path.name} missing)")
  return path


def _assert_identical(streamed, reference):
  assert jax.tree.structure(streamed) == jax.tree.structure(reference)  # static fields included
  for a, b in zip(jax.tree.leaves(jax.device_get(streamed)), jax.tree.leaves(reference)):
    a, b = np.asarray(a), np.asarray(jax.device_get(b))
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
  "path,config",
  [
    (PYCODE, QuantConfig(budget=1.5)),
    (STORIES, QuantConfig(budget=1.5)),
    (STORIES, QuantConfig(method="nf", bits=4)),
  ],
  ids=["pycode-lowra1.5", "stories-lowra1.5", "stories-nf4"],
)
def test_streamed_checkpoint_equals_in_memory(path, config):
  _, params = llama.load_pretrained(_need(path))
  reference, ref_report = quantize_params(params, config, progress=False)
  streamed, report = base.quantize_checkpoint(path, config, progress=False)
  _assert_identical(streamed, reference)
  assert [l.path for l in report.layers] == [l.path for l in ref_report.layers]
  assert report.total_bits == ref_report.total_bits


def test_fit_in_chunks_of_channels_equals_the_whole_fit(monkeypatch):
  _, params = llama.load_pretrained(_need(STORIES))
  whole, _ = quantize_params(params, QuantConfig(budget=1.5), progress=False)
  monkeypatch.setattr(pipeline, "FIT_CHUNK", 1 << 11)  # 10 channels of 192 rows, 32 of 64
  chunked, _ = quantize_params(params, QuantConfig(budget=1.5), progress=False)
  _assert_identical(chunked, whole)


@pytest.mark.parametrize(
  "init,method", [("qlora", "lowra"), ("loftq", "nf"), ("loftq", "lowra")]
)
def test_prepare_streams_a_base_equal_to_init_lora(init, method):
  from configs.demo import get_config
  from lowra_jax import lora, run_config

  config = get_config()
  config.model.path = str(_need(STORIES))
  config.lora.init, config.quant.method = init, method
  config.quant.calibration = "none"  # what is compared here is the streaming, not calibration
  config.quant.rounding, config.quant.refit = "nearest", False  # GPTQ needs the calibration
  config.lora.loftq_weighting = "none"
  s = run_config.settings(config)
  prep = base.prepare(config, s, tokenizer=None)
  qparams, adapters, _ = lora.init_lora(
    base.load_dense(s), s.quant, s.lora, jax.random.key(config.train.seed), progress=False
  )
  frozen, quant = lora.split_quantized(qparams)
  _assert_identical(prep.frozen, {"params": frozen, "quant": quant})
  _assert_identical(prep.adapters, adapters)
  assert prep.model.config == llama.LlamaConfig.from_hf(weights.inspect_checkpoint(STORIES)[0])


def test_streamed_into_a_writer_loads_as_the_in_memory_base(tmp_path):
  source = SyntheticSource(TINY, seed=3)
  config = QuantConfig(budget=1.5)
  reference, _ = quantize_params(nest(source), config, progress=False)
  with Writer(tmp_path / "base", {"seed": 3}, shard_bytes=20_000) as out:
    quantize_stream(source, config, sink=lambda p, leaf, _: out.add(p, leaf), progress=False)
  assert len(list((tmp_path / "base").glob("arrays-*.safetensors"))) > 2
  loaded, extra = load_quantized(tmp_path / "base")
  assert extra == {"seed": 3}
  _assert_identical(loaded, reference)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
  with pytest.raises(RuntimeError), Writer(tmp_path / "base", shard_bytes=1) as out:
    out.add("a/b", np.ones(4, np.float32))
    raise RuntimeError("interrupted")
  assert list(tmp_path.iterdir()) == []


def test_synthetic_source_is_deterministic_and_model_shaped():
  source = SyntheticSource(TINY, seed=1)
  first, second = nest(source), nest(source)
  chex.assert_trees_all_equal(first, second)
  other = nest(SyntheticSource(TINY, seed=2))
  assert not np.array_equal(first["lm_head"]["kernel"], other["lm_head"]["kernel"])
  model = llama.Llama(TINY)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
  assert jax.tree.map(lambda x: x.shape, first) == jax.tree.map(lambda x: x.shape, shapes)
  assert source.num_params == sum(x.size for x in jax.tree.leaves(first))
  assert SyntheticSource(SHAPES["70b"]).num_params == pytest.approx(68.98e9, rel=1e-3)


@pytest.fixture
def pycode_copy(tmp_path) -> Path:
  return Path(shutil.copytree(_need(PYCODE), tmp_path / "pycode"))


def test_truncated_shard_fails_in_one_line_before_any_read(pycode_copy):
  shard = sorted(pycode_copy.glob("*.safetensors"))[-1]
  data = shard.read_bytes()
  shard.write_bytes(data[: len(data) - 1000])
  with pytest.raises(ValueError, match="truncated") as e:
    base.quantize_checkpoint(pycode_copy, QuantConfig(), progress=False)
  assert "\n" not in str(e.value) and shard.name in str(e.value)


def test_missing_shard_fails_in_one_line_before_any_read(pycode_copy):
  shard = sorted(pycode_copy.glob("*.safetensors"))[0]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="missing shard") as e:
    CheckpointSource(pycode_copy)
  assert "\n" not in str(e.value) and shard.name in str(e.value)


# A child process: its RSS after warming up on a one-layer model of the same shapes (every jitted
# function compiled; the peak then reset to it), and its peak RSS (VmHWM) after `mode` on the full
# model.
_CHILD = """
import dataclasses, json, sys, tempfile
import numpy as np
from lowra_jax.models.llama import LlamaConfig
from lowra_jax.models.weights_source import SyntheticSource
from lowra_jax.quantize import QuantConfig, pipeline
from lowra_jax.quantize.pipeline import nest, quantize_stream
from lowra_jax.quantize.serialize import Writer

mode, layers = sys.argv[1], int(sys.argv[2])
config = LlamaConfig(*json.loads(sys.argv[3]))
pipeline.FIT_CHUNK = 1 << 16  # the fit's working set, scaled down with the model
quant = QuantConfig(budget=1.5, precisions=(1, 2), lloyd_iters=2, solver="greedy")  # sooner
def peak():  # VmHWM: the peak RSS that clear_refs resets (ru_maxrss keeps exited threads' peaks)
  with open("/proc/self/status") as f:
    return 1024 * next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))

def stream(source, directory):
  with Writer(directory, shard_bytes=1 << 20) as out:
    quantize_stream(source, quant, sink=lambda p, leaf, _: out.add(p, leaf), progress=False)

with tempfile.TemporaryDirectory() as tmp:
  if mode == "stream":
    stream(SyntheticSource(dataclasses.replace(config, num_layers=1)), tmp + "/warm")
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak to the current RSS (Linux >= 4.0)
  baseline = peak()
  source = SyntheticSource(dataclasses.replace(config, num_layers=layers))
  if mode == "stream":
    stream(source, tmp + "/base")
  else:
    tree = {p: np.asarray(leaf) for p, leaf in source}
  print(json.dumps({"baseline": baseline, "peak": peak(), "bf16_bytes": 2 * source.num_params}))
"""


# RSS that follows what is alive: few per-thread heaps, and blocks from 64 KiB up mapped (and
# unmapped when freed) rather than kept in a heap (glibc's threshold otherwise grows with use).
_MALLOC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}


def _start_child(mode: str, layers: int, config: llama.LlamaConfig) -> subprocess.Popen:
  fields = [getattr(config, f.name) for f in dataclasses.fields(config)][:7]
  return subprocess.Popen(
    [sys.executable, "-c", _CHILD, mode, str(layers), json.dumps(fields)],
    cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    env={**os.environ, **_MALLOC},
  )  # fmt: skip


def _peak_above_baseline(proc: subprocess.Popen) -> dict:
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  out = json.loads(stdout.splitlines()[-1])
  return {**out, "growth": out["peak"] - out["baseline"]}


def test_streamed_quantization_stays_within_a_memory_bound_several_times_below_the_model():
  """Above the warmed-up process, streaming needs one tensor's working set or the fits and the
  solver (not at once), not the model: 16 layers of 5.7 MB against a 24 MB bound. The two
  children run at once: each measures its own peak RSS."""
  config = llama.LlamaConfig(512, 512, 1376, 1, 4, 2, 128)
  bound = 24 << 20
  children = {mode: _start_child(mode, 16, config) for mode in ("stream", "read_whole")}
  streamed, whole = (_peak_above_baseline(children[mode]) for mode in ("stream", "read_whole"))
  assert streamed["bf16_bytes"] > 3.5 * bound, streamed
  assert streamed["growth"] <= bound, streamed
  assert whole["growth"] >= 0.9 * whole["bf16_bytes"], whole  # the measurement sees a whole model


@pytest.mark.parametrize(
  "quant", [QuantConfig(method="nf", bits=2), QuantConfig(method="lloyd"), QuantConfig(budget=1.5)]
)
def test_loftq_streamed_equals_loftq_in_memory(quant):
  from lowra_jax import lora

  config = lora.LoraConfig(rank=4, init="loftq", loftq_iters=2)
  key = jax.random.key(0)
  _, params = llama.load_pretrained(_need(STORIES))
  qparams, adapters, report = lora.init_lora(params, quant, config, key, progress=False)
  streamed, streamed_adapters, streamed_report = base.loftq_checkpoint(STORIES, quant, config, key)
  _assert_identical(streamed, qparams)
  _assert_identical(streamed_adapters, adapters)
  np.testing.assert_allclose(streamed_report.errors, report.errors, rtol=1e-5)
  assert streamed_report.quant_error == pytest.approx(report.quant_error, rel=1e-5)
  assert streamed_report.errors[-1] < streamed_report.quant_error
