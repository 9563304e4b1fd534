"""Bad input to a benchmark script is one line: ``error: <what> — <fix>`` on stderr, exit status 2,
no traceback, nothing written. One case per kind of check (a name not among a list's choices, a
count that is not positive, a library's range check, a missing input file, a missing optional
dependency), on different scripts; the scripts run concurrently."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTEROP_NEEDS = ("torch", "transformers", "peft")


def interop_missing() -> str:
  """What interop.py names here: the first of its modules not installed, else the missing file."""
  missing = [m for m in INTEROP_NEEDS if importlib.util.find_spec(m) is None]
  return missing[0] if missing else "summary.json"


# name -> (script and arguments, "{out}" standing for the case's empty output directory; a piece
# of text the error must name)
CASES = {
  "unknown_precision": (["kernels.py", "--precisions=2,3bit", "--rows={out}/rows.jsonl"], "'3bit'"),
  "negative_batch": (["generate.py", "--shape=tiny", "--batches=1,-8", "--out={out}/g.json"], "-8"),
  "zero_steps_per_sync": (["generate.py", "--shape=tiny", "--steps_per_sync=0"], "--steps_per_sync"),
  "unknown_method": (
    ["model_step.py", "--shape=tiny", "--methods=bf16,nf5", "--out={out}/m.json"],
    "'nf5'",
  ),
  "budget_out_of_range": (["quant_speed.py", "--layers=1", "--width=64", "--budget=0.5"], "0.5"),
  "missing_input_file": (["lora_init.py", "--text={out}/none.txt"], "none.txt"),
  "malformed_shape": (["low_rank.py", "--shapes=4096x4096,4096y"], "'4096y'"),
  "missing_dependency_or_run": (["interop.py", "--workdir={out}/run"], interop_missing()),
  "unknown_tuning_field": (
    ["generate.py", "--shape=tiny", '--tuning={{"dense_from": 1}}', "--out={out}/g.json"],
    "no field 'dense_from'",
  ),
  "precisions_below_a_budget": (
    ["generate.py", "--shape=tiny", "--methods=lowra2", "--precisions=1", "--out={out}/g.json"],
    "budget=2.0 is unreachable",
  ),
  "report_of_a_directory": (["kernels.py", "--report", "{out}"], "is a directory"),
  "plot_from_a_directory": (
    ["model_step.py", "--plot={out}/m.png", "--plot_from={out}"],
    "is a directory",
  ),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
  """Every case's (output directory, exit status, stderr), the scripts all launched at once."""
  procs = {}
  for name, (argv, _) in CASES.items():
    out = tmp_path_factory.mktemp(name)
    script, *args = (a.format(out=out) for a in argv)
    cmd = [sys.executable, f"benchmarks/{script}", *args]
    pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    procs[name] = out, subprocess.Popen(cmd, cwd=ROOT, **pipes)
  done = {}
  for name, (out, proc) in procs.items():
    stderr = proc.communicate(timeout=300)[1]
    done[name] = out, proc.returncode, stderr
  return done


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_writes_nothing(results, name):
  out, returncode, stderr = results[name]
  lines = stderr.splitlines()
  assert returncode == 2, stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  assert " — " in lines[0] and CASES[name][1] in lines[0], lines[0]
  assert list(out.iterdir()) == []
