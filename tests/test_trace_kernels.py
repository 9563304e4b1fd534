"""benchmarks/trace_kernels.py: kernels are read from the device's stream tracks only (not its
derived XLA Ops track, not the host), and averaged per call."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
  "trace_kernels", ROOT / "benchmarks" / "trace_kernels.py"
)
trace_kernels = importlib.util.module_from_spec(spec)
sys.modules["trace_kernels"] = trace_kernels  # its dataclass looks its module up there
spec.loader.exec_module(trace_kernels)


def meta(kind, pid, name, tid=None):
  e = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
  return e if tid is None else {**e, "tid": tid}


def kernel(pid, tid, ts, name, dur):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "name": name, "dur": dur}


def test_device_stream_events_averaged_per_call(tmp_path):
  events = [
    meta("process_name", 1, "/device:GPU:0"),
    meta("thread_name", 1, "Stream #13(Compute)", tid=7),
    meta("thread_name", 1, "XLA Ops", tid=8),
    meta("process_name", 2, "/host:CPU"),
    meta("thread_name", 2, "python", tid=1),
    # two calls, each: lut kernel then a reduce; the same kernels on the derived track
    kernel(1, 7, 10.0, "lut_matmul_2bit", 20.0),
    kernel(1, 7, 31.0, "loop_reduce_fusion", 1.0),
    kernel(1, 7, 50.0, "lut_matmul_2bit", 24.0),
    kernel(1, 7, 75.0, "loop_reduce_fusion", 3.0),
    kernel(1, 8, 10.0, "lut_matmul_2bit", 20.0),
    kernel(2, 1, 5.0, "PjitFunction", 100.0),
  ]
  path = tmp_path / "plugins" / "profile" / "run"
  path.mkdir(parents=True)
  with gzip.open(path / "host.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  found = trace_kernels.device_events(str(tmp_path))
  assert [name for _, name, _ in found] == ["lut_matmul_2bit", "loop_reduce_fusion"] * 2
  per_call = trace_kernels.per_call(found, calls=2)
  assert per_call == [
    trace_kernels.Kernel("lut_matmul_2bit", 1.0, 22.0),
    trace_kernels.Kernel("loop_reduce_fusion", 1.0, 2.0),
  ]


def test_idle_time_is_the_gaps_on_the_merged_timeline_without_the_gaps_between_calls():
  """Two calls: kernels a (0-10) and b on a second stream (5-12) overlap, then c.1 after a 3 µs gap;
  the host's 100 µs between the calls is left out; the second call has a 4 µs gap before c.2."""
  events = [
    (0.0, "a", 10.0),
    (5.0, "b", 7.0),
    (15.0, "c.1", 5.0),
    (120.0, "a", 10.0),
    (134.0, "c.2", 6.0),
  ]
  idle_us, before = trace_kernels.idle(events, calls=2)
  assert idle_us == 3.5
  assert before == [trace_kernels.Kernel("c", 1.0, 3.5)]


def test_iteration_lists_the_kernels_between_two_condition_copies():
  """Kernels a (81-91) and b on another stream (85-95) overlap; c after a 5 µs gap; the second
  condition copy ends the iteration; what follows it is not part of it."""
  events = [
    (0.0, "MemcpyD2H", 1.0),
    (81.0, "a", 10.0),
    (85.0, "b", 10.0),
    (100.0, "c", 2.0),
    (103.0, "MemcpyD2H", 1.0),
    (190.0, "a", 10.0),
  ]
  found = trace_kernels.iteration(events)
  assert found == {
    "span_us": 103.0,
    "busy_us": 10.0 + 4.0 + 2.0 + 1.0,
    "first_gap_us": 80.0,
    "kernels": [[80.0, "a", 10.0], [84.0, "b", 10.0], [99.0, "c", 2.0], [102.0, "MemcpyD2H", 1.0]],
  }
  assert trace_kernels.iteration(events[:4]) is None
