"""GPU kernels of a jitted call, from a `jax.profiler` trace (the Perfetto JSON jax writes).

`kernels_of(fn, make_args, calls=5)` runs fn(*make_args()) once (compilation), then `calls` times
under the profiler (fresh arguments each time: fn may donate them), and returns every kernel name seen with its launches and µs per call. Used by
`op_breakdown.py` (one `quantized_matmul`) and `generate.py --trace` (one decode step), which
call `check_gpu` first.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
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


def kernels_of(fn, make_args, calls: int = 5) -> list[Kernel]:
  """The kernels of one fn(*make_args()) call (fn jitted); arguments are made outside the trace."""
  jax.block_until_ready(fn(*make_args()))
  fresh = [jax.block_until_ready(make_args()) for _ in range(calls)]
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for args in fresh:
        jax.block_until_ready(fn(*args))
    return per_call(device_events(d), calls)
