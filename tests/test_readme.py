"""The README's Python examples run as written (from the project root, with ../shared beside it)."""

import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
  not (ROOT / ".." / "shared" / "data").exists(), reason="../shared/data is not beside the project"
)
def test_readme_python_blocks_run(monkeypatch, capfd):
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
  assert blocks, "README has no python examples"
  monkeypatch.chdir(ROOT)
  namespace = {}
  for block in blocks:
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
  # Warning-free: e.g. arrays closed over by a jitted function are constant-folded by XLA, which
  # logs "Constant folding an instruction is taking > 2s" on stderr (captured at the fd level).
  err = capfd.readouterr().err
  assert "slow_operation_alarm" not in err and "Constant folding" not in err, err[-2000:]
  assert "Traceback" not in err and "Warning" not in err, err[-2000:]
  assert namespace["quantize"].bits_per_param(namespace["qparams"]).code <= 1.5 + 1e-9
  assert namespace["y"].shape[-1] == 1024
  init = namespace["init"]
  assert init.errors[-1] < init.quant_error  # LoftQ adapters reduce the base's error
  assert 0 < float(namespace["loss"]) < 10
  assert jax.tree.structure(namespace["grads"]) == jax.tree.structure(namespace["adapters"])
