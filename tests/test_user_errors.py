"""Bad input through the entry points (train.py, eval.py, generate.py as subprocesses): exit status
2, exactly one stderr line ``error: <what> — <fix>`` naming the problem, nothing on stdout, nothing
written. One line also means no work started first: quantization, LoftQ and training print
progress bars on stderr.

The cases run in one module fixture, each in a process forked from one of two servers that imported
the scripts' libraries once (tests/forked.py); one case also runs in a fresh interpreter, which
must report the same. Each test reads its case's result."""

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from forked import ForkServer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
PYCODE = DATA / "models" / "pycode-llama-17m"
STORIES = DATA / "models" / "stories260K" / "stories260K.bin"


def make_model_dirs(tmp: Path) -> dict[str, Path]:
  """Broken copies of pycode-llama-17m (other files linked, not copied)."""
  dirs = {}

  def copy(name: str, skip: tuple[str, ...] = ()) -> Path:
    out = tmp / name
    out.mkdir()
    for f in PYCODE.iterdir():
      if f.name not in skip:
        (out / f.name).symlink_to(f.resolve())
    return out

  dirs["no_weights"] = tmp / "no_weights"
  dirs["no_weights"].mkdir()
  shutil.copy(PYCODE / "config.json", dirs["no_weights"])
  shard = "model-00002-of-00003.safetensors"
  dirs["truncated"] = copy("truncated", skip=(shard,))
  data = (PYCODE / shard).read_bytes()
  (dirs["truncated"] / shard).write_bytes(data[: len(data) // 2])
  dirs["no_tokenizer"] = copy("no_tokenizer", skip=("tokenizer.json", "tokenizer_config.json"))
  return dirs


def make_workdirs(tmp: Path) -> dict[str, Path]:
  """A workdir with another run's checkpoints; one whose saved base has another identity."""
  dirs = {"checkpoints": tmp / "with_checkpoints", "other_base": tmp / "other_base"}
  (dirs["checkpoints"] / "checkpoints" / "20").mkdir(parents=True)
  (dirs["other_base"] / "base").mkdir(parents=True)
  identity = {"model": "elsewhere", "quant": {}, "lora": {}, "seed": 0}
  (dirs["other_base"] / "base" / "tree.json").write_text(
    json.dumps({"leaves": [], "extra": identity})
  )
  return dirs


def cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
  """{case: (command line after the python executable, text the error line must hold)}."""
  models, workdirs = make_model_dirs(tmp), make_workdirs(tmp)
  fresh = str(tmp / "never_written")
  train = ["train.py", "--config=configs/demo.py", f"--config.workdir={fresh}"]
  return {
    "config key typo": (train + ["--config.optim.learnin_rate=1"], 'did you mean "learning_rate"'),
    "config file missing": (["train.py", "--config=configs/nope.py"], "configs/nope.py"),
    "config file missing, flag and value apart": (
      ["eval.py", "--config", "configs/nope.py"],
      "configs/nope.py",
    ),
    "value of wrong type": (train + ["--config.lora.rank=big"], "big"),
    "config flag twice": (  # ml_collections would join the tuples into (1, 2, 1, 2, 4)
      train + ["--config.quant.precisions=(1,2)", "--config.quant.precisions=(1,2,4)"],
      "--config.quant.precisions is given more than once — give a tuple-valued",
    ),
    "budget out of range": (train + ["--config.quant.budget=0.5"], "budget=0.5"),
    "rank 0": (train + ["--config.lora.rank=0"], "rank=0"),
    "rank above kernel size": (train + ["--config.lora.rank=1000"], "rank 1000 exceeds"),
    "unknown lora target": (
      train + ["--config.lora.targets=('q_proj','qkv_proj')"],
      "['qkv_proj'] match no module",
    ),
    "missing model path": (train + ["--config.model.path=/nonexistent/model"], "does not exist"),
    "dir without weights": (
      train + [f"--config.model.path={models['no_weights']}"],
      "no safetensors weights",
    ),
    "truncated shard": (
      train + [f"--config.model.path={models['truncated']}"],
      "model-00002-of-00003.safetensors is not a readable safetensors file",
    ),
    "no tokenizer": (
      train + [f"--config.model.path={models['no_tokenizer']}"],
      "holds no tokenizer",
    ),
    "seq_len beyond positions": (
      train + ["--config.data.seq_len=4096"],
      "max_position_embeddings=1024",
    ),
    "missing data path": (train + ["--config.data.path=/nonexistent/data.txt"], "/nonexistent/"),
    "missing eval split": (train + ["--config.eval_data.split=validation"], "'validation'"),
    "batch larger than the data": (
      train + ["--config.data.batch_size=100000"],
      "fewer than batch_size=100000",
    ),
    "another run's checkpoints": (
      ["train.py", "--config=configs/demo.py", f"--config.workdir={workdirs['checkpoints']}"],
      "--config.train.resume=True",
    ),
    "base of other settings": (
      ["train.py", "--config=configs/demo.py", f"--config.workdir={workdirs['other_base']}"],
      "other model/quant/calib/lora/seed settings",
    ),
    "eval without a run": (
      ["eval.py", "--config=configs/demo.py", f"--config.workdir={fresh}"],
      "holds no train.py run",
    ),
    "generate without a run": (
      ["generate.py", "--config=configs/demo.py", f"--config.workdir={fresh}"],
      "holds no train.py run",
    ),
    "generate bad sampling": (
      ["generate.py", "--config=configs/demo.py", "--temperature=-1"],
      "temperature=-1",
    ),
    "missing calibration split": (
      train + ["--config.quant.calibration=kernel", "--config.calib.split=validation"],
      "config.calib: ",
    ),
    "calibration without a fit": (
      train + ["--config.quant.method=nf", "--config.quant.calibration=kernel"],
      "method 'nf' has no Lloyd-Max fit to calibrate — add --config.quant.calibration=none "
      "--config.quant.rounding=nearest --config.quant.refit=False "
      "--config.lora.loftq_weighting=none",
    ),
    "LowRA config switched to NF": (
      [
        "train.py",
        "--config=configs/llama_1p5bit.py",
        f"--config.workdir={fresh}",
        "--config.quant.method=nf",
      ],
      "add --config.quant.calibration=none --config.quant.rounding=nearest "
      "--config.quant.refit=False --config.lora.loftq_weighting=none",
    ),
    "budget above the config's precisions": (
      [
        "train.py",
        "--config=configs/llama_1p5bit.py",
        f"--config.workdir={fresh}",
        "--config.quant.budget=2.5",
      ],
      "config.quant: budget=2.5 is unreachable with precisions=(1, 2)",
    ),
    "weighted LoftQ without a calibration": (
      train + ["--config.quant.calibration=none"],
      "need it — add --config.quant.rounding=nearest --config.quant.refit=False "
      "--config.lora.loftq_weighting=none (or calibrate)",
    ),
    "no calibration sequences": (
      train + ["--config.quant.calibration=model", "--config.calib.sequences=0"],
      "sequences=0",
    ),
    "llama2.c model, bad targets": (
      train + [f"--config.model.path={STORIES}", "--config.lora.targets=('wq',)"],
      "['wq'] match no module",
    ),
  }


def run(argv: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
  )


SERVERS = 2  # one per core


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  if not PYCODE.exists():
    pytest.skip("../shared/data is not beside the project")
  tmp = tmp_path_factory.mktemp("user_errors")
  table = cases(tmp)
  names = list(table)
  servers = [ForkServer() for _ in range(SERVERS)]

  def share(i: int) -> dict[str, subprocess.CompletedProcess]:
    return {name: servers[i].run(table[name][0], ROOT) for name in names[i::SERVERS]}

  try:
    with ThreadPoolExecutor(max_workers=SERVERS) as pool:
      parts = list(pool.map(share, range(SERVERS)))
  finally:
    for server in servers:
      server.close()
  return tmp, table, {name: out for part in parts for name, out in part.items()}


def test_a_fresh_interpreter_reports_the_same(results):
  """The case that reads most before failing (model, tokenizer, data) as `python train.py ...`:
  the forked run's status, stdout and stderr are this process's."""
  _, table, done = results
  case = "batch larger than the data"
  fresh, forked = run(table[case][0]), done[case]
  assert (fresh.returncode, fresh.stdout, fresh.stderr) == (
    forked.returncode,
    forked.stdout,
    forked.stderr,
  )


CASE_NAMES = [
  "config key typo",
  "config file missing",
  "config file missing, flag and value apart",
  "value of wrong type",
  "config flag twice",
  "budget out of range",
  "rank 0",
  "rank above kernel size",
  "unknown lora target",
  "missing model path",
  "dir without weights",
  "truncated shard",
  "no tokenizer",
  "seq_len beyond positions",
  "missing data path",
  "missing eval split",
  "batch larger than the data",
  "another run's checkpoints",
  "base of other settings",
  "eval without a run",
  "generate without a run",
  "generate bad sampling",
  "missing calibration split",
  "calibration without a fit",
  "LowRA config switched to NF",
  "budget above the config's precisions",
  "weighted LoftQ without a calibration",
  "no calibration sequences",
  "llama2.c model, bad targets",
]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_and_writes_nothing(results, case):
  tmp, table, done = results
  out = done[case]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith("error: ") and " — " in lines[0], lines[0]
  assert table[case][1] in lines[0], lines[0]
  assert out.stdout.strip() == ""
  assert not (tmp / "never_written").exists()


def test_every_case_is_tested(results):
  assert sorted(results[1]) == sorted(CASE_NAMES)
