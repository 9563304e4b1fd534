"""GPU kernels of a jitted call, from a `jax.profiler` trace (the Perfetto JSON jax writes).

`kernels_of(fn, make_args, calls=5)` runs fn(*make_args()) once (compilation), then `calls` times
under the profiler (fresh arguments each time: fn may donate them), and returns every kernel name
seen with its launches and µs per call (`trace_events`: the raw events; `idle`: the device's idle
time between kernels and which kernels it precedes; `iteration`: one iteration of a device loop,
in order); `grouped` sums them by name without numeric suffixes and `print_kernels` prints the
top ones. Used by `op_breakdown.py` (one `quantized_matmul`),
`generate.py --trace` (one decode step) and `model_step.py --trace` (one training step), which
call `check_gpu` first.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax

from lowra_jax.cli import UserError


@dataclasses.dataclass(frozen=True)
class Kernel:
  """One kernel name's launches and device time per call, in first-launch order."""

  name: str
  launches: float
  us: float


def check_gpu(what: str) -> None:
  """A `UserError` unless jax runs on a GPU: `kernels_of` finds no device kernels elsewhere."""
  backend = jax.default_backend()
  if backend != "gpu":
    raise UserError(
      f"{what} reads GPU kernels from a profiler trace but jax runs on {backend} here — "
      "run it on a GPU machine"
    )


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


def per_call(events, calls: int) -> list[Kernel]:
  """Kernels of one call: names in first-seen order with launches and µs averaged over `calls`."""
  launches, total = {}, {}
  for _, name, dur in events:
    launches[name] = launches.get(name, 0) + 1
    total[name] = total.get(name, 0.0) + dur
  return [Kernel(name, launches[name] / calls, total[name] / calls) for name in launches]


def trace_events(fn, make_args, calls: int = 5) -> list[tuple[float, str, float]]:
  """`device_events` of `calls` fn(*make_args()) calls (fn jitted, run once before the trace);
  arguments are made outside the trace."""
  jax.block_until_ready(fn(*make_args()))
  fresh = [jax.block_until_ready(make_args()) for _ in range(calls)]
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for args in fresh:
        jax.block_until_ready(fn(*args))
    return device_events(d)


def kernels_of(fn, make_args, calls: int = 5) -> list[Kernel]:
  """The kernels of one fn(*make_args()) call (fn jitted); arguments are made outside the trace."""
  return per_call(trace_events(fn, make_args, calls), calls)


def idle(events, calls: int) -> tuple[float, list[Kernel]]:
  """The device's idle time per call between the kernels of `calls` traced calls: (idle µs,
  `Kernel`s whose `us` is the idle time just before them, most first). Gaps are measured on the
  merged timeline of the streams; the `calls` - 1 largest are taken for the host's time between
  calls and left out."""
  gaps, end = [], None
  for start, name, dur in events:
    if end is not None and start > end:
      gaps.append((start - end, name))
    end = start + dur if end is None else max(end, start + dur)
  gaps = sorted(gaps, reverse=True)[calls - 1 :]
  launches, total = {}, {}
  for gap, name in gaps:
    name = re.sub(r"([._]\d+)+$", "", name)
    launches[name] = launches.get(name, 0) + 1
    total[name] = total.get(name, 0.0) + gap
  rows = [Kernel(n, launches[n] / calls, total[n] / calls) for n in launches]
  return sum(total.values()) / calls, sorted(rows, key=lambda k: -k.us)


def iteration(events, marker: str = "MemcpyD2H") -> dict | None:
  """One iteration of a device `while` loop: the events after the first `marker` (the copy of
  the loop's condition to the host) up to and including the next, in order. Returns {"span_us":
  from the end of the first marker to the end of the next, "busy_us": time some kernel runs
  (merged timeline), "first_gap_us": idle before the first kernel (the host's turn), "kernels":
  [[µs from the first marker's end, name, µs], ...]}, or None with fewer than two markers."""
  marks = [i for i, (_, name, _) in enumerate(events) if name.startswith(marker)]
  if len(marks) < 2:
    return None
  start, _, dur = events[marks[0]]
  origin = start + dur
  inside = events[marks[0] + 1 : marks[1] + 1]
  busy, end = 0.0, origin
  for t, _, d in inside:
    busy += max(0.0, t + d - max(t, end))
    end = max(end, t + d)
  return {
    "span_us": end - origin,
    "busy_us": busy,
    "first_gap_us": inside[0][0] - origin,
    "kernels": [[round(t - origin, 2), name, round(d, 2)] for t, name, d in inside],
  }


def grouped(kernels: list[Kernel], per: float = 1) -> list[dict]:
  """{kernel, launches, us} per name without numeric suffixes ("fusion.12" -> "fusion"), divided
  by `per` (e.g. the decode steps of one call), most time first."""
  groups: dict[str, list[float]] = {}
  for k in kernels:
    name = re.sub(r"([._]\d+)+$", "", k.name)
    acc = groups.setdefault(name, [0.0, 0.0])
    acc[0], acc[1] = acc[0] + k.launches / per, acc[1] + k.us / per
  rows = [{"kernel": n, "launches": a, "us": u} for n, (a, u) in groups.items()]
  return sorted(rows, key=lambda r: -r["us"])


def print_kernels(label: str, rows: list[dict], top: int = 20) -> None:
  """The total and the `top` rows of `grouped`, on stderr."""
  total_us, total_n = sum(r["us"] for r in rows), sum(r["launches"] for r in rows)
  print(f"\n{label}: {total_n:.0f} kernels, {total_us:.0f} µs", file=sys.stderr)
  for r in rows[:top]:
    print(f"  {r['us']:8.1f} µs {r['launches']:6.0f}x  {r['kernel'][:100]}", file=sys.stderr)
