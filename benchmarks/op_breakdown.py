"""Where the time of one `quantized_matmul` goes: the GPU kernels it launches, from a profiler trace.

For each case (precision, M, pass) the op is compiled and timed as in `benchmarks/kernels.py`,
then run `--calls` more times under `jax.profiler.trace`; the device events of that trace (the
Perfetto JSON jax writes) give each kernel's duration. Printed per case: the kernels of one call
in launch order with their mean µs, their sum, and the op's time per call in the timed loop.

    python benchmarks/op_breakdown.py --shape=4096x11008 --precisions=2,mix1.5 --ms=1,512
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import kernels as kb  # benchmarks/kernels.py: the same timing loop and weights

from lowra_jax import quantize


def device_events(trace_dir: str) -> list[tuple[float, str, float]]:
  """(start µs, name, duration µs) of the kernels in the trace: complete events on the device's
  stream tracks (its derived "XLA Ops"/"XLA Modules" tracks would count every kernel twice)."""
  path = next(Path(trace_dir).rglob("*.json.gz"))
  trace = json.load(gzip.open(path))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  meta = lambda kind: {  # noqa: E731
    (e["pid"], e.get("tid")) if kind == "thread_name" else e["pid"]: e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == kind
  }
  processes, threads = meta("process_name"), meta("thread_name")
  devices = {pid for pid, name in processes.items() if "/device:" in name and "CPU" not in name}
  streams = {t for t, name in threads.items() if t[0] in devices and "stream" in name.lower()}
  if not streams:
    found = sorted({f"{processes.get(p)}: {name}" for (p, _), name in threads.items()})
    raise SystemExit(f"no device stream track in the trace; tracks: {found}")
  return sorted(
    (e["ts"], e["name"], e["dur"])
    for e in events
    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams and "dur" in e
  )


def kernels_per_call(events, calls: int) -> list[tuple[str, float]]:
  """Kernels of one call: names in first-seen order with the mean duration over `calls`."""
  total, order = defaultdict(float), []
  for _, name, dur in events:
    if name not in total:
      order.append(name)
    total[name] += dur
  return [(name, total[name] / calls) for name in order]


def profile(fn, a, qt, calls: int):
  once = jax.jit(fn)
  jax.block_until_ready(once(a, qt))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(once(a, qt))
    return kernels_per_call(device_events(d), calls)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="4096x11008")
  parser.add_argument("--precisions", default="2,mix1.5")
  parser.add_argument("--ms", default="1,512")
  parser.add_argument("--passes", default="fwd,bwd")
  parser.add_argument("--calls", type=int, default=5)
  args = parser.parse_args()
  k, n = (int(s) for s in args.shape.split("x"))
  key = jax.random.key(k * 7 + n)
  w = (0.02 * jax.random.t(key, 5.0, (k, n))).astype(jnp.bfloat16)
  summary = []
  for prec in args.precisions.split(","):
    qt = quantize.quantize_tensor(w, quantize.QuantConfig(**kb.PRECISIONS[prec]))
    for m in (int(s) for s in args.ms.split(",")):
      for direction in args.passes.split(","):
        op = kb.forward if direction == "fwd" else kb.backward
        fn = lambda z, q, op=op: op(z, q, backend="auto")  # noqa: E731
        a = jax.random.normal(key, (m, k if direction == "fwd" else n), jnp.bfloat16)
        sec = kb.bench(fn, a, [qt], iters=10, reps=5)
        ks = profile(fn, a, qt, args.calls)
        total = sum(us for _, us in ks)
        print(f"\n{args.shape} {prec} M={m} {direction}: {sec * 1e6:.1f} µs per call (timed loop)")
        for name, us in ks:
          print(f"  {us:8.1f} µs  {name[:110]}")
        print(f"  {total:8.1f} µs  sum of {len(ks)} kernels", flush=True)
        summary.append((prec, m, direction, sec * 1e6, len(ks), total))
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.shape}")
  print("| precision | M | pass | op µs (timed loop) | kernels | sum of kernel µs (trace) |")
  print("|---|---|---|---|---|---|")
  for prec, m, d, op_us, count, total in summary:
    print(f"| {prec} | {m} | {d} | {op_us:.1f} | {count} | {total:.1f} |")


if __name__ == "__main__":
  main()
