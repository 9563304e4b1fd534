"""Tests for KV-cached generation (lowra_jax.generate, the model's cache path) and generate.py.

Oracles: the full-sequence forward pass (no cache) -- its logits, and greedy decoding by
recomputing the whole prefix every step; the same prompts generated one at a time; the bf16 model
against its 4-bit quantization; nucleus/temperature distributions computed in numpy; the documented
greedy sample of stories260K.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_model import tiny_model
from tolerances import assert_close_at_scale, f32_sum, llama_terms

from lowra_jax import base, data, lora, preflight, run_config, train_lib
from lowra_jax import generate as gen
from lowra_jax.checkpoint import TrainCheckpoints
from lowra_jax.models import llama
from lowra_jax.models.tokenizer import load_tokenizer
from lowra_jax.quantize import QuantConfig, bits_per_param, dequantize, quantize_params

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
STORIES = DATA / "models" / "stories260K"
TINYSTORIES = DATA / "tinystories" / "tinystories_val.txt"
LILY = "Once upon a time, there was a little girl named Lily."
MAX_LEN = 48  # one cache length for most tests: fewer compilations


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"../shared/data not present ({path.name} missing)")
  return path


@pytest.fixture(scope="module")
def stories():
  """(model fp32, variables, tokenizer) of the real stories260K."""
  model, params = llama.load_pretrained(_need(STORIES) / "stories260K.bin", dtype=jnp.float32)
  return (
    model,
    {"params": jax.tree.map(jnp.asarray, params)},
    load_tokenizer(STORIES / "tok512.bin"),
  )


@pytest.fixture(scope="module")
def tiny():
  """(model fp32, variables: 2-bit packed base + non-zero adapters) of a random tiny LLaMA."""
  model, _, _, frozen, adapters, _ = tiny_model()
  return model, {**frozen, "lora": adapters}


def full_forward_greedy(model, variables, prompt: list[int], steps: int) -> list[int]:
  """Reference: greedy decoding that recomputes the whole sequence every step (no cache), over one
  fixed-length buffer (causal attention makes the unwritten tail irrelevant)."""
  apply = jax.jit(model.apply)
  tokens = np.zeros((1, len(prompt) + steps), np.int32)
  tokens[0, : len(prompt)] = prompt
  for i in range(len(prompt), tokens.shape[1]):
    tokens[0, i] = int(jnp.argmax(apply(variables, tokens)[0, i - 1]))
  return tokens[0, len(prompt) :].tolist()


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_cached_logits_equal_full_forward(request, which):
  """Prefill of a left-padded batch, then teacher-forced single-token steps through the cache:
  every position's logits equal the full-sequence forward pass of each row alone (fp32)."""
  model, variables = request.getfixturevalue(which)[:2]
  vocab = model.config.vocab_size
  seqs = np.random.default_rng(0).integers(3, vocab, size=(2, 18))  # 18 = 10 + steps
  lengths, width, steps = (10, 6), 10, 8
  prompt = np.zeros((2, width), np.int32)
  pad = np.asarray([width - n for n in lengths])
  for row, n in enumerate(lengths):
    prompt[row, width - n :] = seqs[row, :n]
  slots = np.arange(width)[None]
  cache = llama.KVCache.create(model.config, 2, width + steps, jnp.float32)
  apply = jax.jit(model.apply)
  logits, cache = apply(
    variables, prompt, np.maximum(slots - pad[:, None], 0), slots >= pad[:, None], cache=cache
  )
  cached = [[logits[row, pad[row] + i] for i in range(n)] for row, n in enumerate(lengths)]
  for i in range(steps):
    step = np.asarray([[seqs[row, n + i]] for row, n in enumerate(lengths)])
    positions = np.asarray([[n + i] for n in lengths])
    logits, cache = apply(variables, step, positions, cache=cache)
    for row in range(2):
      cached[row].append(logits[row, 0])
  assert int(cache.index) == width + steps
  rank = model.lora.rank if model.lora else 0
  bound = f32_sum(llama_terms(model.config, width + steps, rank))
  for row, n in enumerate(lengths):
    full = np.asarray(apply(variables, seqs[row : row + 1, : n + steps]))[0]
    assert_close_at_scale(np.stack(cached[row]), full, bound)


def test_stories_greedy_matches_full_recompute(stories):
  model, variables, tok = stories
  out = gen.generate(model, variables, [[tok.bos_id]], max_new_tokens=24, max_len=MAX_LEN)[0]
  assert out == full_forward_greedy(model, variables, [tok.bos_id], 24)
  assert tok.decode(out).startswith(LILY)


def test_4bit_quantized_agrees_with_bf16_model(stories):
  """Greedy continuations of "Once upon a time" by the bf16 model and its NF4 quantization (bf16
  compute, the packed base through quantized_matmul) agree on the first tokens."""
  _, _, tok = stories
  model, params = llama.load_pretrained(STORIES / "stories260K.bin")  # bf16 compute
  qparams, _ = quantize_params(params, QuantConfig(method="nf", bits=4), progress=False)
  frozen, quant = lora.split_quantized(qparams)
  prompt = tok.encode("Once upon a time")
  dense = gen.generate(model, {"params": params}, [prompt], max_new_tokens=12)[0]
  packed = gen.generate(model, {"params": frozen, "quant": quant}, [prompt], max_new_tokens=12)[0]
  assert tok.decode(dense).startswith(LILY[len("Once upon a time") :])
  assert packed == dense


@pytest.mark.parametrize("which", ["tiny", "stories"])
def test_left_padded_batch_equals_one_by_one(request, which):
  model, variables = request.getfixturevalue(which)[:2]
  rng = np.random.default_rng(1)
  prompts = [rng.integers(3, model.config.vocab_size, size=n).tolist() for n in (1, 5, 12, 16)]
  batch = gen.generate(model, variables, prompts, max_new_tokens=10, max_len=MAX_LEN)
  alone = [
    gen.generate(model, variables, [p], max_new_tokens=10, max_len=MAX_LEN)[0] for p in prompts
  ]
  assert batch == alone
  assert batch[2] == full_forward_greedy(model, variables, prompts[2], 10)


def test_eos_stops_rows_and_streaming_reports_live_tokens(stories):
  model, variables, tok = stories
  prompts = [[tok.bos_id], tok.encode("Tom had a dog")]
  free = gen.generate(model, variables, prompts, max_new_tokens=16, max_len=MAX_LEN)
  eos = free[0][5]  # pretend this token is EOS: row 0 stops before its first occurrence
  cut = [row[: row.index(eos)] if eos in row else row for row in free]
  streamed = []
  out = gen.generate(
    model,
    variables,
    prompts,
    max_new_tokens=16,
    max_len=MAX_LEN,
    eos_id=eos,
    on_token=lambda tokens, live: streamed.append((tokens.copy(), live.copy())),
  )
  assert out == cut and len(out[0]) <= 5
  for row in range(2):
    live = [int(t[row]) for t, l in streamed if l[row]]
    assert live[: len(out[row])] == out[row]
    assert live[len(out[row]) :] in ([], [eos])  # a finished row reports EOS once, then nothing


@pytest.mark.parametrize("steps", [3, 8])
def test_steps_per_sync_changes_nothing_but_syncs(stories, steps):
  """Several steps a loop iteration: the same tokens and the same final cache (index, mask and
  every unmasked slot) as one step an iteration, whether rows stop by EOS, by the step budget
  (10 and 16 steps: not multiples of 3) or by a full cache."""
  model, variables, tok = stories
  prompts = [[tok.bos_id], tok.encode("Tom had a dog")]
  free = gen.generate(model, variables, prompts, max_new_tokens=16, max_len=MAX_LEN)
  for kwargs in (
    dict(max_new_tokens=10, max_len=MAX_LEN),
    dict(max_new_tokens=16, max_len=MAX_LEN, eos_id=free[1][6]),
    dict(max_new_tokens=12, max_len=8),
  ):
    one = gen.generate(model, variables, prompts, **kwargs)
    assert gen.generate(model, variables, prompts, steps_per_sync=steps, **kwargs) == one
  batch = gen.layout(prompts, 11, MAX_LEN, model.config.vocab_size)
  states = []
  for k in (1, steps):
    state = gen.prefill(
      model, variables, jnp.asarray(batch.tokens), jnp.asarray(batch.pad), jax.random.key(0),
      max_len=batch.max_len, sampling=gen.Sampling(), eos_id=None,
    )
    stop = jnp.asarray(batch.tokens.shape[1] + batch.new - 1, jnp.int32)
    states.append(gen.decode(model, variables, state, jax.random.key(0), stop,
                             sampling=gen.Sampling(), eos_id=None, steps_per_sync=k))
  a, b = states
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.cache.mask, b.cache.mask)
  assert int(a.cache.index) == int(b.cache.index)
  written = np.asarray(a.cache.mask)[:, :, None, None]
  # the same steps compiled inside another loop may sum in other orders: float32 sums along the
  # forward pass up to a layer's keys and values
  bound = f32_sum(llama_terms(model.config, batch.max_len))
  for x, y in zip(a.cache.keys + a.cache.values, b.cache.keys + b.cache.values):
    assert_close_at_scale(np.where(written, y, 0), np.where(written, x, 0), bound)


def test_full_cache_stops_generation(stories):
  model, variables, tok = stories
  long = gen.generate(model, variables, [[tok.bos_id]], max_new_tokens=12, max_len=MAX_LEN)[0]
  assert gen.generate(model, variables, [[tok.bos_id]], max_new_tokens=12, max_len=6)[0] == long[:5]


def test_sampling_is_reproducible_and_tiny_top_p_is_greedy(stories):
  model, variables, tok = stories
  prompt = [tok.encode("The cat")]

  def run(sampling, seed):
    key = jax.random.key(seed)
    return gen.generate(
      model, variables, prompt, max_new_tokens=16, max_len=MAX_LEN, sampling=sampling, key=key
    )[0]

  hot = gen.Sampling(temperature=1.0)
  assert run(hot, 0) == run(hot, 0)
  assert run(hot, 0) != run(hot, 1)
  greedy = gen.generate(model, variables, prompt, max_new_tokens=16, max_len=MAX_LEN)[0]
  assert run(gen.Sampling(temperature=1.0, top_p=1e-6), 3) == greedy


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 0.7), (0.5, 1.0), (2.0, 0.9)])
def test_sample_distribution(temperature, top_p):
  """Frequencies over 40k draws match the numpy nucleus distribution; tokens outside it never
  appear."""
  logits = np.asarray([2.0, 1.5, 1.0, 0.2, -0.5, -3.0], np.float32)
  p = np.exp(logits / temperature)
  p /= p.sum()
  order = np.argsort(-p)
  nucleus = order[: np.searchsorted(np.cumsum(p[order]), top_p - 1e-9) + 1]
  expected = np.zeros_like(p)
  expected[nucleus] = p[nucleus] / p[nucleus].sum()
  keys = jax.random.split(jax.random.key(0), 40_000)
  draws = jax.vmap(
    lambda k: gen.sample(jnp.asarray(logits)[None], k, gen.Sampling(temperature, top_p))
  )(keys)
  freq = np.bincount(np.asarray(draws).ravel(), minlength=len(p)) / len(keys)
  np.testing.assert_allclose(freq, expected, atol=0.01)
  assert freq[expected == 0].sum() == 0


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    ({"prompts": [list(range(3, 40))], "max_len": 32}, "leaves no room"),
    ({"prompts": [[1], []]}, "at least one token"),
    ({"prompts": [[1, 600]]}, r"\[0, 512\)"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"sampling": gen.Sampling(temperature=0.7)}, "PRNG key"),
  ],
)
def test_bad_input(stories, kwargs, message):
  model, variables, _ = stories
  args = {"prompts": [[1, 2, 3]], "max_new_tokens": 4} | kwargs
  with pytest.raises(ValueError, match=message):
    gen.generate(model, variables, **args)


@pytest.mark.parametrize(
  ("kwargs", "message"), [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p")]
)
def test_bad_sampling(kwargs, message):
  with pytest.raises(ValueError, match=message):
    gen.Sampling(**kwargs)


def test_merge_adapters_and_requantize(tiny):
  model, variables = tiny
  qparams = lora.merge_trees(variables["params"], variables["quant"])
  lcfg = model.lora
  # Adapters whose product is as large as the weights (the fixture's are far below the 2-bit base's
  # level spacing, so any re-quantization would just give the base back).
  leaves, treedef = jax.tree.flatten(variables["lora"])
  keys = jax.random.split(jax.random.key(3), len(leaves))
  adapters = jax.tree.unflatten(
    treedef, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )
  variables = {**variables, "lora": adapters}
  merged = lora.merge_adapters(qparams, adapters, lcfg)
  node = ("model", "layers", "1", "mlp", "down_proj")
  qt, ad = variables["quant"], adapters
  for name in node:
    qt, ad = qt[name], ad[name]
  expected = np.asarray(dequantize(qt["kernel"], jnp.float32)) + lcfg.scale * (
    np.asarray(ad["a"], np.float64) @ np.asarray(ad["b"], np.float64)
  )
  got = merged
  for name in node:
    got = got[name]
  # float32: the rank-4 dot, the scale and the sum with the dequantized kernel
  assert_close_at_scale(got["kernel"], expected, f32_sum(lcfg.rank + 2))
  # Re-quantized, the adapter-free model keeps the code bits and tracks base + adapters (exact,
  # unmerged) the closer the more bits it gets.
  tokens = np.random.default_rng(2).integers(0, 64, size=(2, 16))
  exact = np.asarray(model.apply(variables, tokens))
  errors, weight_errors = {}, {}
  for bits in (2, 4):
    requant, report = lora.requantize_merged(
      qparams, adapters, lcfg, QuantConfig(method="nf", bits=bits)
    )
    frozen, quant = lora.split_quantized(requant)
    assert bits_per_param(quant).code == bits
    folded = np.asarray(model.apply({"params": frozen, "quant": quant}, tokens))
    errors[bits], weight_errors[bits] = np.abs(folded - exact).mean(), report.rel_error
  assert weight_errors[4] < 0.3 * weight_errors[2] and errors[4] < errors[2]


CLI = {
  "model.path": STORIES / "stories260K.bin",
  "model.dtype": "float32",
  "quant.method": "nf",
  "quant.calibration": "none",  # NF has no fit to calibrate
  "quant.rounding": "nearest",  # nor GPTQ's covariances to round and refit with
  "quant.refit": False,
  "lora.loftq_weighting": "none",  # nor input moments to weigh LoftQ's fit by
  "quant.bits": 4,
  "lora.rank": 4,
  "lora.loftq_iters": 1,
  "eval_data.path": TINYSTORIES,
  "eval_data.max_documents": 40,
  "eval_data.seq_len": 64,
  "train.eval_blocks": 4,
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run's workdir as train.py leaves it: base/ and a checkpoint (step 3) whose adapters differ
  from the initial ones."""
  _need(TINYSTORIES)
  from configs.demo import get_config

  config = get_config()
  config.workdir = str(tmp_path_factory.mktemp("run"))
  for key, value in CLI.items():
    section, field = key.split(".")
    config[section][field] = str(value) if isinstance(value, Path) else value
  s = run_config.settings(config)
  prep = base.prepare(config, s, preflight.check_model(config, s).tokenizer)
  base.save(config, prep, Path(config.workdir) / "base")
  tx = train_lib.make_optimizer(s.optim)
  state = train_lib.TrainState.create(prep.adapters, tx)
  trained = jax.tree.map(lambda x: x + 0.01, state.adapters)
  state = state.replace(step=jnp.asarray(3, jnp.int32), adapters=trained)
  ckpt = TrainCheckpoints(Path(config.workdir) / "checkpoints", every=1, keep=1)
  ckpt.save(state, data_position=3)
  ckpt.close()
  return config, s, prep, trained


def run_cli(config, *extra: str) -> subprocess.CompletedProcess:
  flags = [f"--config.{k}={v}" for k, v in CLI.items()]
  cmd = [sys.executable, "generate.py", "--config=configs/demo.py", *flags]
  cmd += [f"--config.workdir={config.workdir}", *extra]
  return subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, timeout=600)


def test_cli_streams_and_merges(workdir):
  config, s, prep, trained = workdir
  out = run_cli(config, "--prompt=Once upon a time", "--max_new_tokens=8", "--merge")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "adapters of step 3" in out.stderr
  rows = {r[1].strip(): r for r in (l.split("|") for l in out.stdout.splitlines()) if len(r) == 6}
  unmerged = rows["(a) base + adapters (unmerged, exact)"]
  assert float(unmerged[2]) == float(rows["(b) merged"][2]) == 4.0  # same code bits
  blocks = data.load(s.eval_data, prep.tokenizer).blocks[:4]
  step = train_lib.make_eval_step(prep.model)
  loss, _ = train_lib.mean_loss(step, prep.frozen, trained, blocks, s.eval_data.batch_size)
  np.testing.assert_allclose(float(unmerged[4]), np.exp(loss), rtol=1e-3)  # the checkpoint's
  assert re.search(r"merging costs [+-]\d", out.stdout)
  assert "Once upon a time" in out.stdout


def test_cli_batch_matches_library(workdir):
  config, _, prep, trained = workdir
  prompts = ["Once upon a time", "Tom had"]
  out = run_cli(config, *(f"--prompt={p}" for p in prompts), "--max_new_tokens=6")
  assert out.returncode == 0, out.stderr[-2000:]
  tok = prep.tokenizer
  ids = [tok.encode(p) for p in prompts]
  new = gen.generate(
    prep.model, {**prep.frozen, "lora": trained}, ids, max_new_tokens=6, eos_id=tok.eos_id
  )
  for p, n in zip(ids, new):
    assert tok.decode(p + n) in out.stdout
