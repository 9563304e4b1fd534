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


def row(shape, prec, m, direction, bf16_us, ours_us, packed=1_000_000, bw=4e12, layout="planes"):
  return kb.Row(
    shape, prec, m, direction, bf16_us * 1e-6, 2 * bf16_us * 1e-6, ours_us * 1e-6, packed, bw,
    "H200", "0.11.2", "2026-11-25", layout,
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
    # decode, forward: 2 bits 20/4 = 5x and 20/10 = 2x; backward rows ignored
    row("4096x4096", "2", 1, "fwd", 20, 4),
    row("4096x4096", "2", 16, "fwd", 20, 10),
    row("4096x4096", "2", 16, "bwd", 20, 1),
    # the word layout where it is faster replaces the planes' row (20/4 = 5x), where it is
    # slower it is ignored (30/3 = 10x against the planes' 30x)
    row("4096x4096", "2", 16, "fwd", 20, 4, layout="words"),
    row(big, "2", 1, "fwd", 30, 3, layout="words"),
    # mixed 1.5: 30/5 = 6x and 60/10 = 6x, both meet 5x
    row(big, "mix1.5", 1, "fwd", 30, 5, packed=2_000_000),
    row(big, "mix1.5", 16, "fwd", 60, 10, packed=2_000_000),
    row(big, "2", 1, "fwd", 30, 1),
    # M = 32-64: 40/25 = 1.6x
    row("4096x11008", "2", 64, "fwd", 40, 25),
    # M >= 4096: (110 + 100) / (100 + 100) = 1.05 and (120 + 110) / 210 = 1.095; a lone pass is
    # not judged, nor a words row
    row("4096x11008", "2", 4096, "fwd", 100, 110),
    row("4096x11008", "2", 4096, "bwd", 100, 100),
    row("4096x11008", "2", 4096, "fwd", 100, 50, layout="words"),
    row("4096x11008", "1", 8192, "fwd", 100, 120),
    row("4096x11008", "1", 8192, "bwd", 110, 110),
    row("4096x11008", "4", 4096, "fwd", 100, 500),
  ]
  got = {name: rest for name, *rest in kb.targets(rows)}
  # packed bytes / time / copy bw at M = 1: 1e6 / 4e-6 / 4e12 = 6.25 %, 1e6 / 1e-6 / 4e12 = 25 %
  assert got["M = 1, 2 bits: >= 50 % of copy bw"] == pytest.approx([2, 0.0625, 0.25, False])
  assert got["M = 1, mix1.5 bits: >= 50 % of copy bw"] == pytest.approx([1, 0.1, 0.1, False])
  assert got["M <= 16, 2 bits: >= 4x bf16"] == pytest.approx([3, 5.0, 30.0, True])
  assert got["M <= 16, mix1.5 bits: >= 5x bf16"] == pytest.approx([2, 6.0, 6.0, True])
  assert "M <= 16, 4 bits: >= 2.5x bf16" not in got  # no 4-bit row at M <= 16
  assert got["M = 32-64, 2 bits: >= 2x bf16"] == pytest.approx([1, 1.6, 1.6, False])
  assert got["M >= 4096: fwd + bwd <= 1.10x bf16"] == pytest.approx([2, 230 / 210, 1.05, True])


def test_rows_without_a_layout_are_the_planes(tmp_path):
  line = dataclasses.asdict(row("4096x4096", "2", 1, "fwd", 20, 4))
  del line["layout"]  # written before the word layout existed
  (tmp_path / "old.jsonl").write_text(json.dumps(line) + "\n")
  write(tmp_path / "new.jsonl", [row("4096x4096", "2", 1, "fwd", 20, 2, layout="words")])
  rows = kb.load_rows([tmp_path / "old.jsonl", tmp_path / "new.jsonl"])
  got = sorted((r.layout, r.ours_s * 1e6) for r in rows)
  assert [layout for layout, _ in got] == ["planes", "words"]
  assert [us for _, us in got] == pytest.approx([4.0, 2.0])


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
  assert "| 4096x11008 | 1 | 1 | fwd | planes | 30.0 | 60.0 | 15.0 | 2.00x |" in text


def test_report_marks_rows_without_the_xla_timing(tmp_path):
  untimed = dataclasses.replace(row("4096x4096", "2", 1, "fwd", 20, 5), xla_s=None)  # --no-xla
  write(tmp_path / "r.jsonl", [untimed])
  text = kb.report(kb.load_rows([tmp_path / "r.jsonl"]))
  assert "| 4096x4096 | 2 | 1 | fwd | planes | 20.0 | — | 5.0 | 4.00x |" in text


def test_measure_appends_rows_then_reports(tmp_path):
  args = argparse.Namespace(
    shapes="128x256", ms="1,8", precisions="2,4", no_backward=False, rows=tmp_path / "r.jsonl",
    layouts="planes,words", no_xla=False,
  )  # fmt: skip
  kb.measure(args)
  rows = kb.load_rows([args.rows])
  planes = {(p, m, d, "planes") for p in ("2", "4") for m in (1, 8) for d in ("fwd", "bwd")}
  # words: the forward at M <= 4 (the word layout holds 1- to 4-bit codes)
  assert {(r.precision, r.m, r.direction, r.layout) for r in rows} == planes | {
    ("2", 1, "fwd", "words"), ("4", 1, "fwd", "words")
  }
  assert all(r.ours_s > 0 and r.bf16_s > 0 and r.packed_bytes > 0 for r in rows)
  kb.plot(rows, tmp_path / "k.png")
  assert (tmp_path / "k.png").stat().st_size > 0
