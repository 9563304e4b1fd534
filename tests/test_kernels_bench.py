"""benchmarks/kernels.py: rows merged over calls, the issue's targets judged right, and the
measuring path runs end to end (CPU, a tiny shape)."""

import argparse
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kernels_bench", ROOT / "benchmarks" / "kernels.py")
kb = importlib.util.module_from_spec(spec)
sys.modules["kernels_bench"] = kb  # its dataclass looks its module up there
spec.loader.exec_module(kb)


def row(shape, prec, m, direction, bf16_us, ours_us, packed=1_000_000, bw=4e12):
  return kb.Row(
    shape, prec, m, direction, bf16_us * 1e-6, 2 * bf16_us * 1e-6, ours_us * 1e-6, packed, bw,
    "H200", "0.11.2", "2026-11-25",
  )  # fmt: skip


def write(path, rows):
  path.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in rows))


def test_later_files_replace_repeated_rows(tmp_path):
  write(
    tmp_path / "a.jsonl",
    [row("4096x4096", "2", 1, "fwd", 20, 10), row("4096x4096", "2", 16, "fwd", 20, 10)],
  )
  write(tmp_path / "b.jsonl", [row("4096x4096", "2", 1, "fwd", 20, 4)])
  rows = kb.load_rows([tmp_path / "a.jsonl", tmp_path / "b.jsonl"])
  got = sorted((r.m, r.ours_s * 1e6) for r in rows)
  assert [m for m, _ in got] == [1, 16]
  assert [t for _, t in got] == pytest.approx([4, 10])


def test_targets_judged_per_row():
  big = "8192x28672"
  rows = [
    # decode, forward: 2 bits 20/4 = 5x and 20/10 = 2x (one row misses); backward rows ignored
    row("4096x4096", "2", 1, "fwd", 20, 4),
    row("4096x4096", "2", 16, "fwd", 20, 10),
    row("4096x4096", "2", 16, "bwd", 20, 1),
    # mixed 1.5: 30/5 = 6x and 60/10 = 6x, both meet 5x
    row(big, "mix1.5", 1, "fwd", 30, 5, packed=2_000_000),
    row(big, "mix1.5", 16, "fwd", 60, 10, packed=2_000_000),
    # 70B bandwidth: best precision per M; M = 1: max(2e6 / 5e-6, 1e6 / 1e-6) / 4e12 = 25 %,
    # M = 16: 2e6 / 10e-6 / 4e12 = 5 % (only mix1.5 timed there)
    row(big, "2", 1, "fwd", 30, 1),
    # M >= 4096: (110 + 100) / (100 + 100) = 1.05 and (120 + 110) / 210 = 1.095; a lone pass is
    # not judged
    row("4096x11008", "2", 4096, "fwd", 100, 110),
    row("4096x11008", "2", 4096, "bwd", 100, 100),
    row("4096x11008", "1", 8192, "fwd", 100, 120),
    row("4096x11008", "1", 8192, "bwd", 110, 110),
    row("4096x11008", "4", 4096, "fwd", 100, 500),
  ]
  got = {name: rest for name, *rest in kb.targets(rows)}
  assert got["M <= 16, 2 bits: >= 4x bf16"][0] == 3  # 4096x4096 x2 + 70B M = 1
  assert got["M <= 16, 2 bits: >= 4x bf16"][1:] == pytest.approx([2.0, 30.0, False])
  assert got["M <= 16, mix1.5 bits: >= 5x bf16"] == pytest.approx([2, 6.0, 6.0, True])
  assert got["M <= 16, 70B: >= 40 % of copy bw"] == pytest.approx([2, 0.05, 0.25, False])
  assert got["M >= 4096: fwd + bwd <= 1.10x bf16"] == pytest.approx([2, 230 / 210, 1.05, True])


def test_report_orders_rows_and_names_the_runs():
  rows = [
    row("8192x28672", "2", 1, "fwd", 30, 10),
    row("4096x11008", "mix1.5", 1, "bwd", 30, 10),
    row("4096x11008", "1", 16, "fwd", 30, 10),
    row("4096x11008", "1", 1, "bwd", 30, 10),
    row("4096x11008", "1", 1, "fwd", 30, 15),
  ]
  text = kb.report(rows)
  assert text.splitlines()[0] == "Measured 2026-11-25, H200, jax 0.11.2."
  table = [line.split(" | ")[:4] for line in text.splitlines() if line.startswith("| 4096x11008")]
  table += [line.split(" | ")[:4] for line in text.splitlines() if line.startswith("| 8192")]
  assert table == [
    ["| 4096x11008", "1", "1", "fwd"],
    ["| 4096x11008", "1", "1", "bwd"],
    ["| 4096x11008", "1", "16", "fwd"],
    ["| 4096x11008", "mix1.5", "1", "bwd"],
    ["| 8192x28672", "2", "1", "fwd"],
  ]
  assert "| 4096x11008 | 1 | 1 | fwd | 30.0 | 60.0 | 15.0 | 2.00x |" in text


def test_measure_appends_rows_then_reports(tmp_path):
  args = argparse.Namespace(
    shapes="128x256", ms="1", precisions="2,mix1.5", no_backward=False, rows=tmp_path / "r.jsonl"
  )
  kb.measure(args)
  rows = kb.load_rows([args.rows])
  assert {(r.precision, r.direction) for r in rows} == {
    ("2", "fwd"), ("2", "bwd"), ("mix1.5", "fwd"), ("mix1.5", "bwd")
  }  # fmt: skip
  assert all(r.ours_s > 0 and r.bf16_s > 0 and r.packed_bytes > 0 for r in rows)
  kb.plot(rows, tmp_path / "k.png")
  assert (tmp_path / "k.png").stat().st_size > 0
