"""The word layout (`quantize.words`) and `word_gemv`, against numpy and float64.

The GEMV runs in Pallas' interpreter on CPU (its PTX emulated in jnp, float16 rounding included)
and compiled through Triton when a GPU is present.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowra_jax import quantize
from lowra_jax.quantize import serialize, words
from pallas_kernels import quantized_matmul, quantized_ops
from pallas_kernels import word_gemv as wg

ON_GPU = jax.default_backend() == "gpu"
F16_EPS = 2.0**-11  # float16 unit roundoff


def words_numpy(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
  """The documented layout built bit by bit: pair p of word q at bits a_p and a_p + 8, codes in
  fields of 1, 2 or 4 bits (3-bit codes in 4)."""
  k, n = codes.shape
  field = {1: 1, 2: 2, 3: 4, 4: 4}[bits]
  r = 32 // field
  at = {1: [*range(8), *range(16, 24)], 2: [0, 2, 4, 6, 16, 18, 20, 22], 4: [0, 4, 16, 20]}[field]
  out = np.zeros((k // r, n), np.uint64)
  for q in range(k // r):
    for p, a in enumerate(at):
      out[q] |= codes[q * r + 2 * p].astype(np.uint64) << np.uint64(a)
      out[q] |= codes[q * r + 2 * p + 1].astype(np.uint64) << np.uint64(a + 8)
  return out.astype(np.uint32).view(np.int32).reshape(k // group, group // r, n)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_words_hold_the_codes_as_documented(bits):
  rng = np.random.default_rng(bits)
  codes = rng.integers(0, 1 << bits, (128, 24)).astype(np.uint8)
  got = words.pack_words(jnp.asarray(codes), bits, 64)
  np.testing.assert_array_equal(np.asarray(got), words_numpy(codes, bits, 64))
  np.testing.assert_array_equal(np.asarray(words.unpack_words(got, bits)), codes)


def run_ptx(code: str, args: list[int]) -> int:
  """$0 after a block of PTX run on Python integers ($1, $2, ... = args): the subset the lookups
  use, as the PTX ISA defines it -- mov.b32, shr.u32, and.b32, mad.lo.u32 (low 32 bits of a * b
  + c) and prmt.b32 in its default mode (selector nibble i picks byte i of the result from the 8
  bytes b:a by its low 3 bits; its bit 3 replicates that byte's sign bit)."""
  regs = {f"${i + 1}": a for i, a in enumerate(args)}
  body = code.strip()
  assert body[0] == "{" and body[-1] == "}"
  for stmt in body[1:-1].split(";"):
    if not stmt.strip() or stmt.strip().startswith(".reg"):
      continue
    op, rest = stmt.split(None, 1)
    dst, *src = [o.strip() for o in rest.split(",")]
    a, b, c = ([regs[o] if o in regs else int(o, 0) for o in src] + [0, 0])[:3]
    if op == "mov.b32":
      out = a
    elif op == "shr.u32":
      out = a >> b
    elif op == "and.b32":
      out = a & b
    elif op == "mad.lo.u32":
      out = a * b + c
    elif op == "prmt.b32":
      source, out = b << 32 | a, 0
      for i in range(4):
        nibble = c >> 4 * i & 0xF
        byte = source >> 8 * (nibble & 7) & 0xFF
        out |= (0xFF * (byte >> 7) if nibble & 8 else byte) << 8 * i
    else:
      raise AssertionError(f"not in the subset: {op}")
    regs[dst] = out % 2**32
  return regs["$0"]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_compiled_lookups_give_both_levels_of_every_pair(bits):
  """The inline PTX of a pair's lookup (`lookup_code` of the `stage_plans`), run by `run_ptx`:
  for every pair position and all codes of a pair, the word's other bits random, both halves
  hold that pair's two float16 levels (random 16-bit patterns here), for the pair at `at` and the
  one at `at + 16`."""
  rng = np.random.default_rng(bits)
  field = words.field_bits(bits)
  levels = [int(v) for v in rng.integers(0, 2**16, 1 << bits)]
  level_words = [levels[i] | levels[i + 1] << 16 for i in range(0, len(levels), 2)]
  table = level_words if bits > 2 else [level_words[0], level_words[-1]]
  lows = [a for a in words.PAIR_BITS[field] if a < 16]
  assert [a + 16 for a in lows] == [a for a in words.PAIR_BITS[field] if a >= 16]
  for at in lows:
    plans = wg.stage_plans(at, bits)
    assert all(p.shift < 32 and max(p.mask, p.mul, p.add) < 2**32 for p in plans)  # .u32
    for down, a in ((False, at), (True, at + 16)):
      code = wg.lookup_code(plans, down)
      for c0, c1 in itertools.product(range(1 << bits), repeat=2):
        word = int(rng.integers(0, 2**32))  # other pairs' codes: noise
        for c, b in ((c0, a), (c1, a + 8)):
          word = word & ~(((1 << field) - 1) << b) | c << b
        got = run_ptx(code, [word, *table])
        assert got == levels[c0] | levels[c1] << 16, (at, down, c0, c1)


CONFIGS = {  # groups of 32 rows: 1 to 4 words a group, to keep the interpreted kernels short
  "2 bits": dict(method="lloyd", bits=2, group_size=32),
  "1 bit": dict(method="lloyd", bits=1, group_size=32),
  "mixed 1.5": dict(method="lowra", budget=1.5, precisions=(1, 2), group_size=32),
  "nf2, plain scales": dict(method="nf", bits=2, double_quant=False),
  "4 bits": dict(method="lloyd", bits=4, group_size=32),
  "nf4": dict(method="nf", bits=4, group_size=32),
  "mixed 3.0": dict(method="lowra", budget=3.0, precisions=(1, 2, 3, 4), group_size=32),
}


def quantized(name, k=128, n=72, seed=0):
  w = 0.02 * jax.random.t(jax.random.key(seed), 5.0, (k, n))
  return quantize.quantize_tensor(w, quantize.QuantConfig(**CONFIGS[name]))


def dense64(qt) -> np.ndarray:
  """W [K, N] in float64 with float16-rounded levels: tables [code] * scale, from numpy."""
  k = qt.shape[0]
  cols = []
  for b in qt.buckets:
    codes = np.asarray(quantize.packing.unpack(b.planes, b.bits)).astype(np.int64)
    tables = np.asarray(b.channel_tables(), np.float16).astype(np.float64)  # [Nb, 2^b]
    scales = np.repeat(np.asarray(b.scales.dequantize(), np.float64), qt.group_size, axis=0)
    cols.append(tables[np.arange(codes.shape[1]), codes] * scales)
  w = np.concatenate(cols, axis=1)[:k]
  if qt.perm is None:
    return w
  out = np.empty_like(w)
  out[:, np.asarray(qt.perm)] = w
  return out


def gemv_bound(bits: int) -> float:
  """|error| / (|x| @ |W|): float16 x (exact for these bf16 inputs), a float16 sum of each word's
  16 / f pairs (f-bit fields; one rounding per FMA), then float32 sums."""
  return (16 // words.field_bits(bits) + 2) * F16_EPS


# the compiled kernels also with their loops pipelined (Triton only: the interpreter has no loads
# to pipeline; the CPU checks the marked IR, test_pipelined_gemv_marks_its_loop_for_triton)
STAGES = [1, 3] if ON_GPU else [1]


def _relative_error(kernel, tiles, name: str, m: int) -> float:
  """max |kernel(x) - float64| / (|x| @ |W|): every bucket in one launch, channel order, ragged
  channels, two group ranges, the output NaN-poisoned (every element must be written)."""
  qt = quantized(name)
  wq = quantize.to_word_layout(qt)
  x = jax.random.normal(jax.random.key(m), (m, qt.shape[0]), jnp.bfloat16)
  out = jnp.full((2, m, qt.shape[1]), jnp.nan, jnp.float32)
  got = kernel(
    x, wq.buckets, group=qt.group_size, tiles=tiles, columns=qt.perm, interpret=not ON_GPU, out=out
  )
  got = np.asarray(got, np.float64).sum(axis=0)
  assert np.isfinite(got).all()
  xd, wd = np.asarray(x, np.float64), dense64(qt)
  return float((np.abs(got - xd @ wd) / (np.abs(xd) @ np.abs(wd))).max())


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize(
  "name, m",
  [("2 bits", 4), ("1 bit", 1), ("mixed 1.5", 2), ("nf2, plain scales", 1), ("4 bits", 1),
   ("nf4", 2), ("mixed 3.0", 1)],
)
def test_word_gemv_matches_float64(name, m, stages):
  tiles = wg.GemvTiles(block_g=1, block_n=64, splits=2, num_stages=stages)
  bits = min(b.bits for b in quantized(name).buckets)
  assert _relative_error(wg.word_gemv, tiles, name, m) <= gemv_bound(bits)


@pytest.mark.parametrize("name, m", [("mixed 1.5", 2), ("2 bits", 1)])
def test_word_gemv_adds_a_low_rank_term(name, m):
  """word_gemv with a `LowRank` of three segments (fused siblings' adapters) against float64:
  x @ W + scale * h_s(n) @ b[:, n], only once over the two group ranges, in channel order."""
  qt = quantized(name)
  wq = quantize.to_word_layout(qt)
  n, rank, bounds = qt.shape[1], 3, (24, 56)  # segments of 24, 32 and 16 columns
  keys = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(keys[0], (m, qt.shape[0]), jnp.bfloat16)
  h = jax.random.normal(keys[1], (m, 3 * rank), jnp.float32)
  b = jax.random.normal(keys[2], (rank, n), jnp.bfloat16)
  low_rank = wg.LowRank(h, b, scale=0.5, bounds=bounds)
  tiles = wg.GemvTiles(block_g=1, block_n=64, splits=2)
  out = jnp.full((2, m, n), jnp.nan, jnp.float32)
  got = wg.word_gemv(
    x, wq.buckets, group=qt.group_size, tiles=tiles, columns=qt.perm, low_rank=low_rank,
    interpret=not ON_GPU, out=out,
  )
  got = np.asarray(got, np.float64).sum(axis=0)
  xd, wd = np.asarray(x, np.float64), dense64(qt)
  hd, bd = np.asarray(h, np.float64), np.asarray(b, np.float64)
  segment = np.searchsorted(np.array(bounds), np.arange(n), side="right")
  term = np.stack([hd[:, s * rank : (s + 1) * rank] @ bd[:, c] for c, s in enumerate(segment)], 1)
  # the GEMV's bound, plus float32 sums of the term's `rank` products
  bits = min(bk.bits for bk in qt.buckets)
  scale = np.abs(xd) @ np.abs(wd) + 0.5 * np.stack(
    [np.abs(hd[:, s * rank : (s + 1) * rank]) @ np.abs(bd[:, c]) for c, s in enumerate(segment)], 1
  )
  assert (np.abs(got - xd @ wd - 0.5 * term) / scale).max() <= gemv_bound(bits)


def test_only_dequantizing_paths_hold_the_activations_behind_a_barrier():
  """Lowered for CUDA (no GPU needed): the word GEMV (1 row) dequantizes nothing in XLA, so no
  optimization barrier stands between the activations and their float16 conversion (which then
  fuses into their producer); at 16 rows the word-layout tensor is dequantized by XLA, after a
  barrier on (x, W)."""
  wq = quantize.to_word_layout(quantized("2 bits"))
  for rows, barriers in ((1, 0), (16, 1)):
    x = jnp.ones((rows, wq.shape[0]), jnp.bfloat16)
    f = jax.jit(lambda x, w: quantized_matmul(x, w, backend="triton"))
    text = f.trace(x, wq).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("stablehlo.optimization_barrier") == barriers, rows


@pytest.mark.parametrize("bounds, rank", [((), 16), ((40,), 3)])
def test_low_rank_gemv_lowers_for_triton(bounds, rank):
  """Lowered for CUDA (no GPU needed; the interpreter broadcasts what Triton does not): one
  segment and two, the rank a power of two and not."""
  from pallas_kernels import loop_stages

  qt = quantized("mixed 1.5")
  wq = quantize.to_word_layout(qt)
  x = jnp.ones((2, qt.shape[0]), jnp.bfloat16)
  h = jnp.ones((2, (len(bounds) + 1) * rank), jnp.bfloat16)
  b = jnp.ones((rank, qt.shape[1]), jnp.bfloat16)
  tiles = wg.GemvTiles(block_g=1, block_n=64, splits=2)

  def gemv(a, w, h, b):
    low_rank = wg.LowRank(h, b, scale=1.0, bounds=bounds)
    return wg.word_gemv(
      a, w.buckets, group=qt.group_size, tiles=tiles, columns=w.perm, low_rank=low_rank
    )

  (ir,) = loop_stages.cuda_modules(gemv, x, wq, h, b)
  assert "tt.func" in ir


@pytest.mark.parametrize(
  "layout, in_gemv", [("words", True), ("words", False), ("planes", True)]
)
def test_quantized_matmul_low_rank_adds_the_adapter_term(layout, in_gemv, monkeypatch):
  """`quantized_matmul_low_rank` against float64, on a word-layout tensor (the term inside the
  GEMV's launch, or after it with the Tuning's `gemv_low_rank` off) and on the stored planes
  (added after by XLA); 3 leading rows, two segments."""
  monkeypatch.setattr(quantized_ops, "TUNINGS", dict(quantized_ops.TUNINGS))
  quantized_ops.override_tuning({"gemv_low_rank": in_gemv})
  qt = quantized("mixed 1.5")
  wq = quantize.to_word_layout(qt) if layout == "words" else qt
  n, rank = qt.shape[1], 4
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (3, qt.shape[0]), jnp.bfloat16)
  h = jax.random.normal(keys[1], (3, 2 * rank), jnp.float32)
  b = jax.random.normal(keys[2], (rank, n), jnp.float32)
  low_rank = wg.LowRank(h, b, scale=2.0, bounds=(40,))
  got = quantized_ops.quantized_matmul_low_rank(
    x, wq, low_rank, backend="interpret" if layout == "words" else "xla"
  )
  xd, wd, hd, bd = (np.asarray(a, np.float64) for a in (x, dense64(qt), h, b))
  term = np.concatenate([hd[:, :rank] @ bd[:, :40], hd[:, rank:] @ bd[:, 40:]], axis=1)
  scale = np.abs(xd) @ np.abs(wd) + 2 * np.concatenate(
    [np.abs(hd[:, :rank]) @ np.abs(bd[:, :40]), np.abs(hd[:, rank:]) @ np.abs(bd[:, 40:])], 1
  )
  # words: the GEMV's float16 bound; planes: float32 sums (far below it)
  err = np.abs(np.asarray(got, np.float64) - xd @ wd - 2 * term) / scale
  assert err.max() <= gemv_bound(1)
  with pytest.raises(ValueError, match="adapter's b"):
    quantized_ops.quantized_matmul_low_rank(x, wq, wg.LowRank(h, b[:, 1:], scale=1.0))


@pytest.mark.parametrize("stages, name", [(1, "2 bits"), (3, "2 bits"), (1, "mixed 3.0")])
def test_pipelined_gemv_marks_its_loop_for_triton(stages, name):
  """Lowered for CUDA (no GPU needed): stages > 1 puts Triton's `tt.num_stages` on the step loop
  and loads the words plainly (Triton then copies them asynchronously, steps ahead); 1 leaves the
  loop unmarked and the words volatile. Buckets of 1 to 4 bits lower (their inline PTX)."""
  from pallas_kernels import loop_stages

  qt = quantized(name)
  wq = quantize.to_word_layout(qt)
  x = jnp.ones((1, qt.shape[0]), jnp.bfloat16)
  tiles = wg.GemvTiles(block_g=1, block_n=64, splits=2, num_stages=stages)

  def gemv(a, w):
    return wg.word_gemv(a, w.buckets, group=qt.group_size, tiles=tiles, columns=w.perm)

  (ir,) = loop_stages.cuda_modules(gemv, x, wq)
  assert loop_stages.marked_loops(ir) == ([stages] if stages > 1 else [])
  assert ("isVolatile = true" in ir) == (stages == 1)


def test_word_layout_dequantizes_as_the_planes():
  for name in CONFIGS:
    qt = quantized(name)
    wq = quantize.to_word_layout(qt)
    assert all(isinstance(b, quantize.WordBucket) for b in wq.buckets)
    before, after = quantize.bits_per_param(qt), quantize.bits_per_param(wq)
    assert after.code == before.code
    # Per-channel level words (16 bits a level) replace shared or indexed tables; 3-bit codes
    # take 4 bits.
    k_pad = wq.buckets[0].words.shape[0] * qt.group_size
    grown = sum((16 * 2**b.bits + (words.field_bits(b.bits) - b.bits) * k_pad) * b.num_channels
                for b in qt.buckets)  # fmt: skip
    assert after.total <= before.total + grown / after.num_params
    # Both sides use the same float32 scales and float16 levels; only the float32 product of the
    # two is rounded (once: 2^-24 relative).
    np.testing.assert_allclose(
      np.asarray(quantize.dequantize(wq, jnp.float32)), dense64(qt), rtol=2.0**-23, atol=0
    )


def test_to_word_layout_leaves_what_it_cannot_hold():
  w = 0.02 * jax.random.normal(jax.random.key(0), (128, 64))
  # 2-bit codes take 16 rows a word: groups of 8 rows leave words half-filled
  small = quantize.quantize_tensor(w, quantize.QuantConfig(method="lloyd", bits=2, group_size=8))
  tree = {"a": small, "b": quantized("2 bits"), "c": jnp.ones(3)}
  out = quantize.to_word_layout(tree)
  assert out["a"] is small and out["c"] is tree["c"]
  assert isinstance(out["b"].buckets[0], quantize.WordBucket)


@pytest.mark.parametrize("word_max_rows", [4, 16])
def test_quantized_matmul_takes_the_word_kernels_up_to_word_rows_then_dense(
  word_max_rows, monkeypatch
):
  """The plan (`word_gemv` up to 4 rows, `word_mma` up to the Tuning's `word_max_rows`), and
  results and gradients against float64 on both sides of each switch."""
  monkeypatch.setattr(quantized_ops, "TUNINGS", dict(quantized_ops.TUNINGS))
  quantized_ops.override_tuning({"word_max_rows": word_max_rows})
  qt = quantized("mixed 1.5")
  wq = quantize.to_word_layout(qt)
  impl = "triton" if ON_GPU else "interpret"
  assert quantized_ops.plan(wq, 4, jnp.bfloat16, impl).gemv is not None
  at_5 = quantized_ops.plan(wq, 5, jnp.bfloat16, impl)
  assert at_5.dense if word_max_rows == 4 else at_5.mma is not None
  assert quantized_ops.plan(wq, word_max_rows + 1, jnp.bfloat16, impl).dense
  assert quantized_ops.plan(wq, 1, jnp.bfloat16, impl, backward=True).dense
  wd = dense64(qt)
  for m in (2, 8, word_max_rows + 1):
    x = jax.random.normal(jax.random.key(m), (m, qt.shape[0]), jnp.float32)
    y, vjp = jax.vjp(lambda z: quantized_matmul(z, wq, backend=impl), x)
    xd = np.asarray(x, np.float64)
    scale = np.abs(xd) @ np.abs(wd)
    assert (np.abs(np.asarray(y) - xd @ wd) / scale).max() <= gemv_bound(1) + 2 * F16_EPS
    g = np.ones((m, qt.shape[1]))
    (dx,) = vjp(jnp.asarray(g, jnp.float32))
    tf32 = 2.0**-10 if ON_GPU else 0.0  # XLA's float32 dots round operands to TF32 on GPUs
    bound = (tf32 + qt.shape[1] * 2.0**-23) * (np.abs(g) @ np.abs(wd.T))
    assert (np.abs(np.asarray(dx) - g @ wd.T) <= bound + 1e-30).all()


def test_word_layout_is_not_saved(tmp_path):
  wq = quantize.to_word_layout({"w": quantized("2 bits")})
  with pytest.raises(ValueError, match="word layout"):
    serialize.save_quantized(tmp_path / "base", wq)
  assert not (tmp_path / "base").exists()


def test_generation_decodes_from_words_only_where_word_kernels_run():
  from lowra_jax import generate as gen
  from pallas_kernels import backend

  variables = {"params": {"e": jnp.ones(2)}, "quant": {"w": quantized("2 bits")}}
  assert gen.decode_layout(variables, 1) is variables or ON_GPU  # CPU 'auto': XLA, no kernels
  backend.set_default("interpret")
  try:
    words_1 = gen.decode_layout(variables, 1)
    assert isinstance(words_1["quant"]["w"].buckets[0], quantize.WordBucket)
    assert words_1["params"] is variables["params"]
    assert gen.decode_layout(variables, 5) is variables
  finally:
    backend.set_default("auto")


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize(
  "name, m", [("2 bits", 5), ("mixed 1.5", 19), ("nf2, plain scales", 8), ("mixed 3.0", 6)]
)
def test_word_mma_matches_float64(name, m, stages):
  """The tensor-core kernel (5 <= M <= 64): float16 levels and activations (exact here: bf16
  inputs, float16 tables), float32 sums over K."""
  from pallas_kernels import word_mma as wm

  tiles = wm.MmaTiles(block_n=64, splits=2, num_stages=stages)
  k = quantized(name).shape[0]
  assert _relative_error(wm.word_mma, tiles, name, m) <= 4 * k * 2.0**-24


def test_word_mma_lowers_to_one_dot_per_group():
  """Lowered for CUDA (no GPU needed): one `tt.dot` in the group loop, float16 operands."""
  from pallas_kernels import loop_stages
  from pallas_kernels import word_mma as wm

  qt = quantized("mixed 1.5")
  wq = quantize.to_word_layout(qt)
  x = jnp.ones((8, qt.shape[0]), jnp.bfloat16)

  def mma(a, w):
    return wm.word_mma(a, w.buckets, group=qt.group_size, columns=w.perm)

  (ir,) = loop_stages.cuda_modules(mma, x, wq)
  dots = [line for line in ir.splitlines() if "tt.dot" in line]
  assert len(dots) == len(wq.buckets) and all("xf16" in d for d in dots), dots
