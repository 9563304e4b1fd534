"""Quality vs bits: every method x bit budget x seed fine-tuned on the two bundled tasks (resumable).

Each row is one `train.py` run (plus, on stories260K, one `eval.py` run on TinyStories); the exact
commands are stored with the result, so any row can be reproduced by hand from the project root.

    python benchmarks/sweep.py --out=runs/sweep --workers=8      # run or continue every row
    python benchmarks/sweep.py --out=runs/sweep --list           # rows and their commands
    python benchmarks/sweep.py --out=runs/sweep --report --figures=docs/figures

Tasks (`--data` is the root of the bundled material, ../shared/data by default):
  pycode   pycode-llama-17m fine-tuned on networkx_train.txt, perplexity on all of networkx_eval.txt.
  stories  stories260K fine-tuned on WikiText-2 *valid* (the train split is not available here),
           perplexity on all of WikiText-2 test; also TinyStories perplexity (first 128 windows) of
           the bf16 base, the quantized base and the fine-tuned model.
Methods, all with the default config's hyper-parameters (rank 16, AdamW 2e-4, 1000 steps of
1 x 512 tokens, seed 0; seeds 1 and 2 as well at 2 and 1.5 bits):
  lora_bf16     LoRA over the unquantized base (configs/lora_bf16.py).
  qlora         NF-k base, B = 0 adapters, k = 4, 3, 2 (configs/qlora_nf2.py).
  loftq         NF-k base + LoftQ (5 rounds) adapters at 4, 3, 2 bits; fractional budgets put the
                first decoder layers at 4 bits and the rest at 2 (LoftQ's mixed precision),
                rounded to whole layers (configs/loftq_nf2.py + quant.layer_bits).
  lowra_loftq   LowRA at a code-bit budget + LoftQ adapters (configs/llama_1p5bit.py: channels at
                1 or 2 bits up to 2 bits, at 1, 2 or 4 bits above; levels refitted below 2 bits).
  lowra_qlora   LowRA at a code-bit budget + B = 0 adapters.
Results: OUT/results.jsonl (one line per finished row), OUT/logs/<row>.log, train.py workdirs
under --workdirs (default OUT/runs). On a GPU machine without network (benchmarks/gpu_setup.sh,
material under .carry/data): `--data=.carry/data --workdirs=/tmp/sweep --workers=8`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from lowra_jax import cli
from lowra_jax.quantize.config import (
  recommended_calibration,
  recommended_precisions,
  recommended_refit,
  recommended_rounding,
)

ROOT = Path(__file__).resolve().parents[1]
NF_BITS = (4, 3, 2)
LOFTQ_BITS = (4, 3, 2.5, 2.25, 2)
LOWRA_BITS = (4, 3, 2.5, 2.25, 2.0, 1.75, 1.5, 1.25, 1.15)
SEEDED_BITS = (2, 1.5)  # rows run with seeds 0, 1, 2
SEEDS = (0, 1, 2)
METHODS = ("lora_bf16", "qlora", "loftq", "lowra_loftq", "lowra_qlora")
CONFIGS = {
  "lora_bf16": "configs/lora_bf16.py",
  "qlora": "configs/qlora_nf2.py",
  "loftq": "configs/loftq_nf2.py",
  "lowra_loftq": "configs/llama_1p5bit.py",
  "lowra_qlora": "configs/llama_1p5bit.py",
}
LABELS = {
  "lora_bf16": "LoRA (bf16 base)",
  "qlora": "QLoRA (NF-k)",
  "loftq": "LoftQ (NF-k)",
  "lowra_loftq": "LowRA + LoftQ init",
  "lowra_qlora": "LowRA + QLoRA init",
}


@dataclasses.dataclass(frozen=True)
class Task:
  model: str  # relative to the data root
  layers: int
  flags: tuple[str, ...]  # data flags, "{data}" stands for the data root
  tinystories: bool = False


TASKS = {
  "pycode": Task(
    "models/pycode-llama-17m",
    8,
    ("--config.data.path={data}/pycode", "--config.eval_data.path={data}/pycode"),
  ),
  "stories": Task(
    "models/stories260K/stories260K.bin",
    5,
    (
      "--config.data.name=wikitext",
      "--config.data.path={data}/wikitext-2/valid.txt",
      "--config.eval_data.name=wikitext",
      "--config.eval_data.path={data}/wikitext-2/test.txt",
    ),
    tinystories=True,
  ),
}


@dataclasses.dataclass(frozen=True)
class Row:
  task: str
  method: str
  bits: float  # nominal code bits per weight (16 for the bf16 base)
  seed: int

  @property
  def key(self) -> str:
    return f"{self.task}-{self.method}-{self.bits:g}-s{self.seed}"


def loftq_layer_bits(bits: float, layers: int) -> tuple[int, int]:
  """(base bits, number of leading layers at 4 bits) of LoftQ's mixed NF at a nominal budget."""
  if bits == int(bits):
    return int(bits), 0
  return 2, round((bits - 2) / 2 * layers)


def rows() -> list[Row]:
  """Every row, seed 0 first (so a partial sweep covers every method and budget)."""
  out = []
  for seed in SEEDS:
    for task, spec in TASKS.items():
      grid = [("lora_bf16", 16)] + [("qlora", b) for b in NF_BITS]
      seen = set()
      for b in LOFTQ_BITS:  # fractional budgets rounded to whole layers can coincide
        if loftq_layer_bits(b, spec.layers) not in seen:
          seen.add(loftq_layer_bits(b, spec.layers))
          grid.append(("loftq", b))
      grid += [(m, b) for b in LOWRA_BITS for m in ("lowra_loftq", "lowra_qlora")]
      out += [Row(task, m, b, seed) for m, b in grid if seed == 0 or b in SEEDED_BITS]
  return out


def method_flags(row: Row) -> list[str]:
  if row.method in ("qlora", "loftq"):
    base, first = loftq_layer_bits(row.bits, TASKS[row.task].layers)
    flags = [f"--config.quant.bits={base}"]
    if first:
      pattern = "layers/(" + "|".join(str(i) for i in range(first)) + ")/"
      flags.append(f"--config.quant.layer_bits=(({pattern!r}, 4),)")
    return flags
  if row.method.startswith("lowra"):
    flags = [f"--config.quant.budget={row.bits:g}", f"--config.lora.init={row.method[6:]}"]
    if recommended_precisions(row.bits) != recommended_precisions(1.5):  # the config's budget
      flags.append(f"--config.quant.precisions={recommended_precisions(row.bits)}".replace(" ", ""))
    if recommended_refit(row.bits) != recommended_refit(1.5):
      flags.append(f"--config.quant.refit={recommended_refit(row.bits)}")
    if recommended_calibration(row.bits) != recommended_calibration(1.5):
      flags.append(f"--config.quant.calibration={recommended_calibration(row.bits)}")
    if recommended_rounding(row.bits) != recommended_rounding(1.5):
      flags.append(f"--config.quant.rounding={recommended_rounding(row.bits)}")
    return flags
  return []


def train_command(row: Row, data: str, workdir: Path, extra: tuple[str, ...] = ()) -> list[str]:
  """The row's train.py command; a flag in `extra` replaces the row's flag of the same key."""
  spec = TASKS[row.task]
  flags = [
    f"--config={CONFIGS[row.method]}",
    f"--config.model.path={data}/{spec.model}",
    *(f.format(data=data) for f in spec.flags),
    *method_flags(row),
    f"--config.train.seed={row.seed}",
    f"--config.data.seed={row.seed}",
    "--config.train.eval_blocks=0",
    "--config.train.resume=True",
    f"--config.workdir={workdir}",
  ]
  replaced = {e.split("=", 1)[0] for e in extra}
  return ["python", "train.py", *(f for f in flags if f.split("=", 1)[0] not in replaced), *extra]


# Flags of a row's train.py command that its TinyStories eval.py command replaces or does not take.
_NOT_FOR_EVAL = ("--config.eval_data", "--config.train.eval_blocks", "--config.train.resume")


def tinystories_command(train_cmd: list[str], data: str) -> list[str]:
  """eval.py on the run's workdir with TinyStories as the evaluation text."""
  return [
    "python",
    "eval.py",
    # The seed stays: it is part of what the run's quantized base was made with.
    *[a for a in train_cmd[2:] if not a.startswith(_NOT_FOR_EVAL)],
    "--config.eval_data.name=text",
    f"--config.eval_data.path={data}/tinystories/tinystories_val.txt",
    "--config.train.eval_blocks=128",
  ]


def parse_eval_table(stdout: str) -> dict[str, float]:
  """eval.py's markdown table -> {row name: perplexity}."""
  rows = [line.split("|") for line in stdout.splitlines() if line.startswith("| ")][1:]
  return {r[1].strip(): float(r[4]) for r in rows}


def run_row(row: Row, data: str, out: Path, workdirs: Path, extra: tuple[str, ...]) -> dict:
  workdir = workdirs / row.key
  cmd = train_command(row, data, workdir, extra)
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_CPP_MIN_LOG_LEVEL="2")
  log = out / "logs" / f"{row.key}.log"
  t0 = time.perf_counter()
  with log.open("w") as f:
    done = subprocess.run([sys.executable, *cmd[1:]], cwd=ROOT, env=env, stdout=f, stderr=f)
  result = {**dataclasses.asdict(row), "key": row.key, "command": shlex.join(cmd)}
  if done.returncode:
    return {**result, "error": log.read_text()[-2000:]}
  result.update(json.loads((workdir / "summary.json").read_text()))
  if TASKS[row.task].tinystories:
    ecmd = tinystories_command(cmd, data)
    done = subprocess.run(
      [sys.executable, *ecmd[1:]], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
      return {**result, "error": done.stderr[-2000:]}
    result["tinystories_command"] = shlex.join(ecmd)
    result["tinystories_ppl"] = parse_eval_table(done.stdout)
  return {**result, "seconds": time.perf_counter() - t0}


def load_results(out: Path) -> dict[str, dict]:
  """The newest successful result per row key."""
  path = out / "results.jsonl"
  results = {}
  if path.exists():
    fix = "remove or repair that line (each finished row is one JSON object)"
    for r in cli.read_json_lines("--out", path, fix):
      if isinstance(r, dict) and "key" in r and "error" not in r:
        results[r["key"]] = r
  return results


def run_all(
  todo: list[Row],
  data: str,
  out: Path,
  workdirs: Path,
  workers: int,
  deadline: float,
  extra: tuple[str, ...],
) -> None:
  (out / "logs").mkdir(parents=True, exist_ok=True)
  lock = threading.Lock()
  start = time.perf_counter()

  def job(row: Row) -> None:
    if time.perf_counter() - start > deadline:
      return  # leave it for the next invocation
    result = run_row(row, data, out, workdirs, extra)
    with lock, (out / "results.jsonl").open("a") as f:
      f.write(json.dumps(result) + "\n")
      status = "FAILED" if "error" in result else f"ppl {math.exp(result['final_eval_loss']):.3f}"
      print(f"[{time.perf_counter() - start:5.0f} s] {row.key}: {status}", flush=True)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(job, todo))


def aggregate(results: dict[str, dict]) -> dict[tuple, dict]:
  """(task, method, bits) -> perplexities over seeds (mean, std, n) and the seed-0 row."""
  groups = defaultdict(list)
  for r in results.values():
    groups[(r["task"], r["method"], r["bits"])].append(r)
  table = {}
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["seed"])
    final = np.exp([r["final_eval_loss"] for r in rs])
    table[key] = {
      "row": rs[0],
      "n": len(rs),
      "mean": float(final.mean()),
      "std": float(final.std(ddof=1)) if len(rs) > 1 else 0.0,
    }
  return table


def report(results: dict[str, dict]) -> str:
  table = aggregate(results)
  lines = []
  for task in TASKS:
    lines += [
      f"\n#### {task}\n",
      "| method | bits | code bits | total bits | ppl quantized base | ppl at init "
      "| ppl fine-tuned (mean ± std, n) | peak GB |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
      for (t, m, bits), g in sorted(table.items(), key=lambda kv: -kv[0][2]):
        if (t, m) != (task, method):
          continue
        r = g["row"]
        spread = f" ± {g['std']:.3f} ({g['n']})" if g["n"] > 1 else ""
        peak = r.get("peak_memory_bytes")
        lines.append(
          f"| {LABELS[m]} | {bits:g} | {r['code_bits']:.3f} | {r['total_bits']:.3f} "
          f"| {math.exp(r['base_eval_loss']):.2f} | {math.exp(r['init_eval_loss']):.2f} "
          f"| **{g['mean']:.3f}**{spread} | {f'{peak / 1e9:.2f}' if peak else 'n/a'} |"
        )
    if TASKS[task].tinystories:
      lines += [
        f"\n#### {task}: TinyStories perplexity (seed 0)\n",
        "| method | bits | code bits | bf16 base | quantized base | after WikiText fine-tuning |",
        "|---|---|---|---|---|---|",
      ]
      for (t, m, bits), g in sorted(table.items(), key=lambda kv: (kv[0][1], -kv[0][2])):
        ppl = g["row"].get("tinystories_ppl")
        if t != task or not ppl:
          continue
        tuned = next(v for k, v in ppl.items() if k.startswith("+ adapters"))
        quant = ppl.get("quantized base", ppl["bf16 base"])
        lines.append(
          f"| {LABELS[m]} | {bits:g} | {g['row']['code_bits']:.3f} | {ppl['bf16 base']:.3f} "
          f"| {quant:.3f} | {tuned:.3f} |"
        )
  return "\n".join(lines)


def plot(results: dict[str, dict], figures: Path) -> list[Path]:
  """docs/figures/sweep_<task>.png: fine-tuned perplexity vs code bits and vs total bits."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  table = aggregate(results)
  figures.mkdir(parents=True, exist_ok=True)
  paths = []
  for task in TASKS:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, xkey in zip(axes, ("code_bits", "total_bits"), strict=True):
      for method in METHODS[1:]:
        pts = sorted(
          (g["row"][xkey], g["mean"], g["std"])
          for (t, m, _), g in table.items()
          if (t, m) == (task, method)
        )
        if pts:
          x, y, e = map(np.asarray, zip(*pts, strict=True))
          ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, label=LABELS[method])
      ref = table.get((task, "lora_bf16", 16))
      if ref:
        ax.axhline(ref["mean"], color="k", ls="--", lw=1, label=LABELS["lora_bf16"])
      ax.set_xlabel(xkey.replace("_", " ") + " per quantized weight")
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
      ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
      ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity after fine-tuning")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: perplexity after LoRA fine-tuning vs bits (lower is better)")
    fig.tight_layout()
    path = figures / f"sweep_{task}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
  parser.add_argument("--workdirs", type=Path, help="train.py workdirs (default OUT/runs)")
  parser.add_argument("--data", default="../shared/data", help="root of the bundled material")
  parser.add_argument("--workers", type=int, default=1, help="rows run at the same time")
  parser.add_argument("--deadline_s", type=float, default=math.inf, help="start no row after this")
  parser.add_argument(
    "--only", default="", help="only rows whose key contains one of these (comma-separated)"
  )
  parser.add_argument(
    "--extra", default="", help="flags added to every train.py command (e.g. for a smoke test)"
  )
  parser.add_argument("--list", action="store_true", help="print the rows and their commands")
  parser.add_argument("--report", action="store_true", help="print the tables, do not run")
  parser.add_argument("--figures", type=Path, help="with --report: write the plots here")
  args = parser.parse_args()
  cli.positive("--workers", args.workers)
  try:
    extra = tuple(shlex.split(args.extra))
  except ValueError as e:
    raise cli.UserError(f"--extra: {e} in {args.extra!r} — quote it as in a shell") from None
  workdirs = args.workdirs or args.out / "runs"
  results = load_results(args.out)
  only = args.only.split(",")
  todo = [r for r in rows() if any(o in r.key for o in only)]
  if not todo:
    raise cli.UserError(f"--only={args.only} matches no row — see --list for the row keys")
  if args.list:
    for r in todo:
      workdir = workdirs / r.key
      print(f"{r.key}{' (done)' if r.key in results else ''}:")
      print("  " + shlex.join(train_command(r, args.data, workdir, extra)))
    return
  if args.report:
    if not results:
      raise cli.UserError(
        f"{args.out / 'results.jsonl'} holds no finished row — run the sweep first or pass its --out"
      )
    print(report(results))
    if args.figures:
      for path in plot(results, args.figures):
        print(f"wrote {path}")
    return
  for task in dict.fromkeys(r.task for r in todo):
    cli.existing("--data", ROOT / args.data / TASKS[task].model, "pass the bundled material's root")
  todo = [r for r in todo if r.key not in results]
  print(f"{len(todo)} rows to run ({len(results)} done) with {args.workers} workers", flush=True)
  run_all(todo, args.data, args.out, workdirs, args.workers, args.deadline_s, extra)
  print(report(load_results(args.out)))


if __name__ == "__main__":
  cli.guard(main)
