"""Speed of `quantized_matmul` on the GPU against bf16 `jnp.dot` and plain XLA dequant + dot.

For each weight shape [K, N], precision and M: forward y = x @ W and backward dX = dY @ W^T,
timed side by side in one process: bf16 `jnp.dot` on the dequantized weight, the `xla` backend
(unpack + table lookup + dot, all XLA) and the Pallas kernels (`auto`: the Triton kernels below
`Tuning.dense_from_m` rows, dequantize + dot above). Weights rotate over enough copies to exceed the L2
cache. Also: packed bytes / time against the measured device copy bandwidth.

    python benchmarks/kernels.py --rows runs/kernels/a.jsonl                  # the full grid
    python benchmarks/kernels.py --shapes 4096x11008 --rows runs/kernels/b.jsonl
    python benchmarks/kernels.py --precisions 3,mix3.0 --ms 1,16 --rows runs/kernels/c.jsonl
    python benchmarks/kernels.py --layouts words --ms 1,4 --no-backward --rows runs/kernels/w.jsonl
    python benchmarks/kernels.py --layouts words --ms 8,16,32,64 --no-backward \
      --tuning '{"word_max_rows": 64}' --rows runs/kernels/w.jsonl
    python benchmarks/kernels.py --layouts planes,words --ms 1,4,16,64 --precisions 2,mix1.5,4 \
      --no-backward --no-xla --rows runs/kernels/decode.jsonl           # the decode targets' rows
    python benchmarks/kernels.py --report runs/kernels/*.jsonl --figure docs/figures/kernels.png

`--layouts=words` times the forward of tensors converted to the decode word layout
(`quantize.to_word_layout`, what generate.py decodes from) where it has its own kernels
(`word_gemv` up to M = 4, `word_mma` up to `quantized_ops.word_rows()`; precisions whose channels
all have 1 to 4 bits); rows say their layout. `--tuning` overrides fields of the kernels' `Tuning`
(e.g. '{"word_max_rows": 64}': `word_mma` up to 64 rows). Each row is appended to the --rows file
as it is measured, so a run cut short keeps what it measured; split a run that must fit a time
limit by shape (or by M for the 70B shape) and merge the files with --report, which prints the
table, forward + backward at M >= 4096 and the issue's targets (met or not; a decode target takes
the faster layout of each row, as decoding does), and can plot speed-up against M.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lowra_jax import cli, quantize
from lowra_jax.quantize.words import convertible
from pallas_kernels import quantized_matmul, quantized_ops

L2_BYTES = 60 * 2**20
SHAPES = ("4096x4096", "4096x11008", "11008x4096", "8192x28672")  # LLaMA-7B, then 70B
PRECISIONS = {
  "1": dict(method="lloyd", bits=1),
  "2": dict(method="lloyd", bits=2),
  "4": dict(method="lloyd", bits=4),
  "mix1.5": dict(method="lowra", budget=1.5),
  "mix2.0": dict(method="lowra", budget=2.0),
  "3": dict(method="lloyd", bits=3),  # two planes; forward kernels only (M <= 16)
  "mix3.0": dict(method="lowra", budget=3.0, precisions=(1, 2, 3, 4)),
}
DEFAULT_PRECISIONS = ("1", "2", "4", "mix1.5", "mix2.0")  # the report's grid


def dims(shape: str, flag: str = "--shapes") -> tuple[int, int]:
  """(K, N) of a "KxN" weight shape given with `flag`."""
  try:
    k, n = (int(s) for s in shape.split("x"))
  except ValueError:
    raise cli.UserError(f"{flag}: {shape!r} is not KxN — give e.g. 4096x11008") from None
  cli.positive(flag, k, n)
  return k, n


def grid(args) -> tuple[list[str], list[str], list[int]]:
  """(shapes, precisions, M values) to measure, from the --shapes, --precisions and --ms flags."""
  shapes = cli.parse_list(args.shapes, "--shapes")
  for shape in shapes:
    dims(shape)
  ms = cli.parse_list(args.ms, "--ms", convert=int)
  cli.positive("--ms", *ms)
  return shapes, cli.parse_list(args.precisions, "--precisions", PRECISIONS), ms


def add_tuning_flag(parser) -> None:
  """--tuning: JSON overrides of the kernels' per-GPU `Tuning` (`apply_tuning`)."""
  parser.add_argument(
    "--tuning",
    default="",
    help='JSON overrides of the kernels\' Tuning, e.g. \'{"word_max_rows": 64}\'',
  )


def apply_tuning(text: str) -> None:
  """`quantized_ops.override_tuning` of the --tuning JSON (nothing if empty); bad input: one
  line."""
  if text:
    with cli.user_errors("--tuning: ", (ValueError, TypeError)):
      quantized_ops.override_tuning(json.loads(text))


def bench(fn, x, operands, iters: int = 10, reps: int = 5) -> float:
  """Median seconds per call of fn(x, op), rotating over `operands`, chained in one jitted loop.

  Each iteration's input depends on the previous result and every output is consumed, so XLA can
  neither hoist the calls out of the loop nor shrink them to the elements read. Operands are
  arguments of the jitted loop (not embedded constants).
  """

  def body(_, carry, ops):
    a = x + (carry * 0).astype(x.dtype)
    return carry + sum(jnp.sum(fn(a, op).astype(jnp.float32)) for op in ops)

  loop = jax.jit(lambda ops: jax.lax.fori_loop(0, iters, lambda i, c: body(i, c, ops), 0.0))
  jax.block_until_ready(loop(operands))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(operands))
    times.append((time.perf_counter() - t0) / iters / len(operands))
  return statistics.median(times)


def copy_bandwidth(iters: int = 20) -> float:
  """Bytes read + written per second by a large device copy (x <- x * c, 1 GiB)."""
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, iters, lambda _, a: a * 1.0001, x))
  x = jnp.ones((2**28,), jnp.float32)
  jax.block_until_ready(loop(x))
  t0 = time.perf_counter()
  jax.block_until_ready(loop(x))
  return 2 * x.nbytes * iters / (time.perf_counter() - t0)


def packed_bytes(qt) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(qt))


def rotate(make, nbytes: int, most: int = 8):
  """Copies of an operand (1 to `most`) that together exceed twice the L2 cache where possible."""
  return [make(i) for i in range(min(most, max(1, -(-2 * L2_BYTES // max(nbytes, 1)))))]


def quantized_copies(qt, most: int = 8):
  """`rotate`d copies of a QuantizedTensor in distinct buffers (floats scaled by 1 + i * 1e-3)."""
  return rotate(
    lambda i: jax.tree_util.tree_map(
      lambda a: a + 0 if jnp.issubdtype(a.dtype, jnp.integer) else a * (1 + i * 1e-3), qt
    ),
    packed_bytes(qt),
    most,
  )


def forward(a, w_or_qt, backend=None):
  """y = a @ W: bf16 `jnp.dot` on a dense W, else `quantized_matmul` with `backend`."""
  if backend is None:
    return jnp.dot(a, w_or_qt)
  return quantized_matmul(a, w_or_qt, backend=backend)


def backward(a, w_or_qt, backend=None):
  """dX = a @ W^T, through the VJP of `quantized_matmul` for a quantized W."""
  if backend is None:
    return jnp.dot(a, w_or_qt.T)
  k = w_or_qt.shape[0]
  x = jnp.zeros((a.shape[0], k), a.dtype)
  return jax.vjp(lambda z: quantized_matmul(z, w_or_qt, backend=backend), x)[1](a)[0]


def tile_overrides(text: str) -> list[dict]:
  """The --tiles flag: a JSON list of `Tiles` overrides ({field: value} each)."""
  from pallas_kernels import lut_matmul as lm

  fields = [f.name for f in dataclasses.fields(lm.Tiles)]
  try:
    overrides = json.loads(text)
  except ValueError:
    overrides = None
  if not isinstance(overrides, list) or not all(
    isinstance(o, dict) and set(o) <= set(fields) for o in overrides
  ):
    raise cli.UserError(
      f"--tiles: {text} is not a JSON list of Tiles overrides — give e.g. "
      f"'[{{\"block_n\": 32}}]' with keys from {', '.join(fields)}"
    )
  return overrides


def sweep(m: int, overrides: list[dict], forward_only: bool = False):
  """Kernel-only times of tile settings on 4096x11008, 2 bits, at M rows (pick `tiles_for` here).

  overrides: `Tiles` overrides, each timed against the default tiles of that M; forward_only:
  the forward kernel's (--no-backward)."""
  from pallas_kernels import lut_matmul as lm

  k, n = 4096, 11008
  w = (0.02 * jax.random.t(jax.random.key(0), 5.0, (k, n))).astype(jnp.bfloat16)
  qt = quantize.quantize_tensor(w, quantize.QuantConfig(method="lloyd", bits=2))
  ops = [q.buckets[0] for q in quantized_copies(qt)]  # distinct buffers: no L2 reuse
  kp = ops[0].planes[0].shape[0]
  for backward_pass, inp in ((False, (m, k)), (True, (m, n)))[: 1 if forward_only else 2]:
    a = jax.random.normal(jax.random.key(1), inp, jnp.bfloat16)
    base = quantized_ops.tiles_for(m, kp, n, 64, backward_pass)
    name = "bwd" if backward_pass else "fwd"
    print(f"M={m} default {name} tiles: {base}")
    for kw in [{}, *overrides]:
      t = dataclasses.replace(base, **kw)
      call = lm.lut_matmul_t if backward_pass else lm.lut_matmul
      sec = bench(lambda z, op: call(z, op, group=64, tiles=t).sum(0), a, ops)
      print(f"M={m} {name} {kw or 'default'}: {sec * 1e6:.1f} us", flush=True)


@dataclasses.dataclass(frozen=True)
class Row:
  """One measured row: seconds per call of each variant, packed bytes of the quantized weight."""

  shape: str  # "KxN"
  precision: str  # a key of PRECISIONS
  m: int
  direction: str  # "fwd" (x @ W) or "bwd" (dY @ W^T)
  bf16_s: float
  xla_s: float | None  # None: not timed (--no-xla)
  ours_s: float
  packed_bytes: int
  copy_bw: float  # bytes/s, measured in the same process
  device: str
  jax: str
  date: str
  layout: str = "planes"  # "words": converted by `quantize.to_word_layout`

  @property
  def speedup(self) -> float:
    return self.bf16_s / self.ours_s

  @property
  def bw_fraction(self) -> float:
    return self.packed_bytes / self.ours_s / self.copy_bw


def load_rows(paths) -> list[Row]:
  """Rows of one or more JSONL files (later files win for a repeated shape/precision/M/pass)."""
  rows = {}
  fix = "pass files that --rows wrote"
  for path in paths:
    for i, line in enumerate(cli.read_json_lines("--report", path, fix), 1):
      try:
        r = Row(**line)
      except TypeError as e:
        raise cli.UserError(f"--report: {path} row {i} is not a row of kernels.py ({e}) — {fix}")
      rows[(r.shape, r.precision, r.m, r.direction, r.layout)] = r
  return list(rows.values())


def measure(args) -> None:
  """Times every row of the grid, printing each and appending it to args.rows as measured."""
  bw = copy_bandwidth()
  device, date = jax.devices()[0].device_kind, datetime.date.today().isoformat()
  print(f"{device}, jax {jax.__version__}; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
  shapes, precisions, ms = grid(args)
  layouts = cli.parse_list(args.layouts, "--layouts", ("planes", "words"))
  args.rows.parent.mkdir(parents=True, exist_ok=True)
  for shape in shapes:
    k, n = dims(shape)
    key = jax.random.key(k * 7 + n)
    w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
    w_copies = rotate(lambda i: w + jnp.bfloat16(i * 1e-3), w.nbytes)
    q_copies = {}
    for prec in precisions:
      qt = quantize.quantize_tensor(w, quantize.QuantConfig(**PRECISIONS[prec]))
      for layout in layouts:
        if layout == "planes":
          q_copies[prec, layout] = quantized_copies(qt)
        elif convertible(qt):
          q_copies[prec, layout] = quantized_copies(quantize.to_word_layout(qt))
    for m in ms:
      iters, reps = (10, 5) if m <= 512 else (3, 3)
      for direction, op in (("fwd", forward), ("bwd", backward))[: 1 if args.no_backward else 2]:
        a = jax.random.normal(key, (m, k if direction == "fwd" else n), jnp.bfloat16)
        t_bf16 = bench(op, a, w_copies, iters, reps)
        for (prec, layout), qs in q_copies.items():
          if layout == "words" and (direction != "fwd" or m > quantized_ops.word_rows()):
            continue  # the dense path, as for the planes: nothing of the layout's own
          t_xla = None if args.no_xla else bench(
            functools.partial(op, backend="xla"), a, qs, iters, reps
          )
          t_ours = bench(functools.partial(op, backend="auto"), a, qs, iters, reps)
          row = Row(
            shape, prec, m, direction, t_bf16, t_xla, t_ours, packed_bytes(qs[0]), bw, device,
            jax.__version__, date, layout,
          )  # fmt: skip
          with args.rows.open("a") as f:
            f.write(json.dumps(dataclasses.asdict(row)) + "\n")
          print(
            f"{shape:>11s} {prec:>6s} {layout:>6s} M={m:<5d} {direction}  "
            f"bf16 {t_bf16 * 1e6:8.1f} us  xla {_us(t_xla):>8s} us  ours {t_ours * 1e6:8.1f} us  "
            f"x{row.speedup:5.2f} vs bf16  {100 * row.bw_fraction:5.1f}% of copy bw",
            flush=True,
          )


def _us(seconds: float | None) -> str:
  return "—" if seconds is None else f"{seconds * 1e6:.1f}"


def _order(rows: list[Row]) -> list[Row]:
  shapes = {s: i for i, s in enumerate(SHAPES)}
  precs = {p: i for i, p in enumerate(PRECISIONS)}
  return sorted(
    rows,
    key=lambda r: (
      shapes.get(r.shape, 99), r.shape, precs[r.precision], r.m, r.direction != "fwd", r.layout
    ),
  )


def fwd_bwd(rows: list[Row]) -> dict[tuple[str, str, int], float]:
  """(shape, precision, M) -> (ours fwd + bwd) / (bf16 fwd + bwd), where both passes were timed."""
  both = {}
  for r in rows:
    if r.layout == "planes":  # the stored layout, which training reads
      both.setdefault((r.shape, r.precision, r.m), []).append(r)
  return {
    key: sum(r.ours_s for r in rs) / sum(r.bf16_s for r in rs)
    for key, rs in both.items()
    if {r.direction for r in rs} == {"fwd", "bwd"}
  }


def decoded(rows: list[Row]) -> list[Row]:
  """The forward rows as decoding runs them: per shape, precision and M the faster layout."""
  best = {}
  for r in rows:
    key = (r.shape, r.precision, r.m)
    if r.direction == "fwd" and (key not in best or r.ours_s < best[key].ours_s):
      best[key] = r
  return list(best.values())


def targets(rows: list[Row]) -> list[tuple[str, int, float, float, bool]]:
  """The issue's speed targets: (target, rows judged, worst, best, met by every row).

  Decode targets are judged on the forward in the faster layout (`decoded`); speed-ups are
  bf16 / ours, the M >= 4096 one ours / bf16 (forward + backward on the stored planes)."""
  fwd = decoded(rows)
  out = []

  def judge(name, values, goal, at_least=True):
    if values:
      ok = min(values) >= goal if at_least else max(values) <= goal
      worst = min(values) if at_least else max(values)
      best = max(values) if at_least else min(values)
      out.append((name, len(values), worst, best, ok))

  for prec in ("2", "mix1.5"):
    bw = [r.bw_fraction for r in fwd if r.m == 1 and r.precision == prec]
    judge(f"M = 1, {prec} bits: >= 50 % of copy bw", bw, 0.5)
  for prec, goal in (("2", 4.0), ("mix1.5", 5.0), ("4", 2.5)):
    s = [r.speedup for r in fwd if r.m <= 16 and r.precision == prec]
    judge(f"M <= 16, {prec} bits: >= {goal:g}x bf16", s, goal)
  s = [r.speedup for r in fwd if 32 <= r.m <= 64 and r.precision == "2"]
  judge("M = 32-64, 2 bits: >= 2x bf16", s, 2.0)
  ratios = [v for (_, _, m), v in fwd_bwd(rows).items() if m >= 4096]
  judge("M >= 4096: fwd + bwd <= 1.10x bf16", ratios, 1.10, at_least=False)
  return out


def report(rows: list[Row]) -> str:
  """Markdown: the rows, forward + backward against bf16 at M >= 4096, and the targets."""
  rows = _order(rows)
  runs = sorted({(r.date, r.device, r.jax) for r in rows})
  lines = [
    "Measured " + "; ".join(f"{d}, {dev}, jax {v}" for d, dev, v in runs) + ".",
    "",
    "| K x N | bits | M | pass | layout | bf16 dot (µs) | XLA dequant+dot (µs) | ours (µs) | "
    "ours vs bf16 | packed bytes/time vs copy bw |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r.shape} | {r.precision} | {r.m} | {r.direction} | {r.layout} | {r.bf16_s * 1e6:.1f} | "
      f"{_us(r.xla_s)} | {r.ours_s * 1e6:.1f} | {r.speedup:.2f}x | "
      f"{100 * r.bw_fraction:.0f}% |"
    )
  lines += ["", "| K x N | bits | M | fwd+bwd ours / bf16 |", "|---|---|---|---|"]
  for (shape, prec, m), v in fwd_bwd(rows).items():
    if m >= 4096:
      lines.append(f"| {shape} | {prec} | {m} | {v:.2f}x |")
  lines += ["", "| target | rows | worst | best | met |", "|---|---|---|---|---|"]
  for name, count, worst, best, met in targets(rows):
    unit = (lambda v: f"{100 * v:.0f} %") if "copy bw" in name else (lambda v: f"{v:.2f}x")
    lines.append(
      f"| {name} | {count} | {unit(worst)} | {unit(best)} | {'yes' if met else '**no**'} |"
    )
  return "\n".join(lines)


STYLES = (("fwd", "planes", "-o"), ("bwd", "planes", "--s"), ("fwd", "words", ":^"))


def plot(rows: list[Row], path: Path) -> None:
  """One panel per shape: forward and backward speed-up over bf16 against M, per precision and
  layout."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = _order(rows)
  shapes = list(dict.fromkeys(r.shape for r in rows))
  cols = min(2, len(shapes))
  grid = -(-len(shapes) // cols)
  fig, axes = plt.subplots(grid, cols, figsize=(5.5 * cols, 4 * grid), sharey=True, squeeze=False)
  axes = list(axes.flat)
  for ax in axes[len(shapes) :]:
    ax.set_visible(False)
  colors = dict(zip(PRECISIONS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
  for ax, shape in zip(axes, shapes, strict=False):
    for prec in PRECISIONS:
      for direction, layout, style in STYLES:
        pts = [(r.m, r.speedup) for r in rows if (r.shape, r.precision, r.direction, r.layout) == (
          shape, prec, direction, layout)]  # fmt: skip
        if pts:
          m, s = zip(*pts, strict=True)
          label = f"{prec} bits {direction}" + (" (words)" if layout == "words" else "")
          label = label if ax is axes[0] else None
          ax.plot(m, s, style, color=colors[prec], ms=3, lw=1, label=label)
    ax.axhline(1.0, color="k", lw=1)
    for goal in (4.0, 5.0):
      ax.axhline(goal, color="gray", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ms = sorted({r.m for r in rows if r.shape == shape})
    ax.set_xticks(ms, [f"{m // 1024}k" if m >= 4096 else str(m) for m in ms])
    ax.set_yscale("log", base=2)
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8) if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
    ax.set_title(f"K x N = {shape}")
    ax.set_xlabel("M (rows of x)")
    ax.grid(alpha=0.3, which="both")
  for ax in axes[::cols]:
    ax.set_ylabel("speed-up over bf16 jnp.dot (higher is better)")
  axes[0].legend(fontsize=7, ncol=2)
  fig.suptitle("quantized_matmul vs bf16 (dotted: the decode targets 4x / 5x)", fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default=",".join(SHAPES))
  parser.add_argument("--ms", default="1,16,64,512,4096,8192")
  parser.add_argument(
    "--precisions", default=",".join(DEFAULT_PRECISIONS), help=f"of {', '.join(PRECISIONS)}"
  )
  parser.add_argument("--no-backward", action="store_true")
  parser.add_argument(
    "--no-xla", action="store_true", help="skip the XLA dequant + dot timing (a shorter run)"
  )
  parser.add_argument(
    "--layouts", default="planes", help="planes,words: also the decode word layout (fwd)"
  )
  add_tuning_flag(parser)
  parser.add_argument(
    "--rows", type=Path, default=Path("runs/kernels/rows.jsonl"), help="appended to as measured"
  )
  parser.add_argument(
    "--report",
    nargs="+",
    type=Path,
    metavar="JSONL",
    help="do not measure: print the table of these rows files (several calls merged)",
  )
  parser.add_argument("--figure", type=Path, help="with --report: write the speed-up plot here")
  parser.add_argument(
    "--sweep",
    type=int,
    metavar="M",
    help="time lut_matmul tile settings (--tiles) on 4096x11008, 2 bits, at M rows, then exit",
  )
  parser.add_argument(
    "--tiles",
    default='[{"block_n": 32}, {"block_n": 128}, {"block_k": 32}, {"num_warps": 8}, '
    '{"num_stages": 2}, {"num_stages": 4}, {"splits": 1}]',
    help="with --sweep: JSON list of Tiles overrides",
  )
  args = parser.parse_args()
  if args.sweep is not None:
    cli.positive("--sweep", args.sweep)
    return sweep(args.sweep, tile_overrides(args.tiles), args.no_backward)
  if args.report:
    for path in args.report:
      cli.existing("--report", path, "pass the files that --rows wrote")
    rows = load_rows(args.report)
    if not rows:
      raise cli.UserError(
        f"no rows in {', '.join(map(str, args.report))} — run without --report first"
      )
    if args.figure:
      plot(rows, args.figure)
    print(report(rows))
    return
  apply_tuning(args.tuning)
  grid(args)
  if args.rows.exists():
    raise cli.UserError(
      f"{args.rows} exists — pass another --rows file (rows are appended as measured)"
    )
  measure(args)
  print("\n" + report(load_rows([args.rows])))


if __name__ == "__main__":
  cli.guard(main)
