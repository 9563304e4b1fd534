"""Entry-point scripts run as real child processes, forked from a server that has imported their
libraries once (jax, flax, orbax, transformers, lowra_jax: ~5 s of CPU a `python script.py`).

Each run is a fresh fork of the server as it was after those imports (no jax backend started, no
flag defined), with its own stdout / stderr files, working directory, argv and sys.path[0] as
`python script.py` would set them, and a real exit status: what a bad-input test checks (status,
stderr lines, nothing on stdout, nothing written) is the process's own. `python -c` style
differences (`__main__` made by runpy) do not reach the scripts' behaviour; a fresh interpreter
still runs one case of each test file that uses this, to show the two agree.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

# What train.py, eval.py and generate.py import themselves, nothing else: a library imported here
# first could print at import (transformers without torch does, unless lowra_jax quiets it first)
# where the scripts' own imports print nothing.
PRELOAD = (
  "jax",
  "jax.numpy",
  "numpy",
  "absl.flags",
  "ml_collections.config_flags",
  "tqdm.auto",
  "lowra_jax.base",
  "lowra_jax.cli",
  "lowra_jax.data",
  "lowra_jax.export",
  "lowra_jax.generate",
  "lowra_jax.lora",
  "lowra_jax.preflight",
  "lowra_jax.reporting",
  "lowra_jax.run_config",
  "lowra_jax.sharding",
  "lowra_jax.train_lib",
  "lowra_jax.checkpoint",
  "lowra_jax.quantize",
)

SERVER = r"""
import atexit, importlib, json, os, runpy, sys
for name in json.loads(sys.argv[1]):
  importlib.import_module(name)
from jax._src import xla_bridge
assert not xla_bridge._backends, "a preloaded module started a jax backend: forking is unsafe"
requests, replies = sys.stdin, os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # whatever else prints goes to the server's stderr, not into the replies
for line in requests:
  req = json.loads(line)
  sys.stdout.flush(); sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    os.close(replies.fileno())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
      f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
      os.dup2(f, fd)
      os.close(f)
    os.chdir(req["cwd"])
    script = os.path.abspath(req["argv"][0])
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
      runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:
      sys.excepthook(*sys.exc_info())
      code = 1
    try:
      atexit._run_exitfuncs()
    finally:
      sys.stdout.flush(); sys.stderr.flush()
      os._exit(code & 0xFF)
  _, status = os.waitpid(pid, 0)
  replies.write(json.dumps(os.waitstatus_to_exitcode(status)) + "\n")
  replies.flush()
"""


class ForkServer:
  """`run(argv, cwd)` ~ `subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True,
  text=True)`, one run at a time (use several servers for concurrency)."""

  def __init__(self, preload: tuple[str, ...] = PRELOAD):
    self._tmp = tempfile.TemporaryDirectory(prefix="forked-")
    self._proc = subprocess.Popen(
      [sys.executable, "-c", SERVER, json.dumps(list(preload))],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
    )
    self._count = 0

  def run(self, argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    self._count += 1
    out, err = (Path(self._tmp.name) / f"{self._count}.{s}" for s in ("out", "err"))
    req = {"argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": str(out), "stderr": str(err)}
    self._proc.stdin.write(json.dumps(req) + "\n")
    self._proc.stdin.flush()
    reply = self._proc.stdout.readline()
    assert reply, f"fork server died (exit status {self._proc.wait(timeout)})"
    return subprocess.CompletedProcess(
      [sys.executable, *argv], json.loads(reply), out.read_text(), err.read_text()
    )

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
    self._tmp.cleanup()
