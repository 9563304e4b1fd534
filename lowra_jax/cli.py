"""What the entry points (train.py, eval.py, generate.py, benchmarks) share: quiet libraries and
bad input reported as one line.

    if __name__ == "__main__":
      cli.run(main)                # absl flags; or cli.guard(main) for argparse scripts

Input problems raise `UserError("what is wrong — how to fix it")`; `run` / `guard` print it as
``error: <message>`` on stderr and exit with status 2, without a traceback. Every other exception
is a bug and keeps its traceback. `user_errors` turns the ValueError / FileNotFoundError a
validating library function raises into a `UserError` at the boundary where the input is known
to come from the user; `parse_list`, `positive`, `existing`, `output_file` and `require_modules`
check an argparse script's arguments up front, before anything heavy runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(ValueError):
  """Bad input: the message says what is wrong and, after " — ", how to fix it."""


@contextlib.contextmanager
def user_errors(prefix: str = "", types=(ValueError, FileNotFoundError)) -> Iterator[None]:
  """Re-raises exceptions of `types` inside the block as `UserError(prefix + message)`."""
  try:
    yield
  except UserError:
    raise
  except types as e:
    raise UserError(prefix + _message(e)) from None


def _message(e: BaseException) -> str:
  """One line of an exception's text (KeyError quotes its argument; ml_collections nests one)."""
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  for _ in range(2):  # ml_collections: AttributeError(KeyError("'key'\nDid you mean ..."))
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
      text = text[1:-1].encode().decode("unicode_escape")
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _config_flag_error(e: BaseException, argv: list[str]) -> UserError:
  """A `UserError` for a failed `--config...` flag: names the flag and ml_collections' hint."""
  text = _message(e)
  missing = re.match(r"'?([\w.]+)'? Did you mean (.*)", text)
  if missing or isinstance(e, (KeyError, AttributeError)):
    key = missing.group(1) if missing else text.strip("'")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), key)
    hint = f"did you mean {missing.group(2)}" if missing else "check it against the config file"
    return UserError(f"{flag}: the config has no key {key!r} — {hint}")
  return UserError(f"{text} — check the --config flags")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing with `UserError`s for bad flags (a typo'd config key, a bad value, a
  config file that does not load, a tuple-valued config flag given twice)."""
  from absl import flags

  for arg, after in zip(argv, [*argv[1:], None]):  # ml_collections reports a missing file only
    # when the config is first read; --config=FILE or --config FILE
    value = arg.split("=", 1)[1] if arg.startswith("--config=") else None
    value = after if arg == "--config" and after is not None else value
    file = None if value is None else value.split(":")[0]
    if file is not None and not Path(file).is_file():
      raise UserError(
        f"config file {file} does not exist — pass one of configs/*.py, "
        "e.g. --config=configs/llama_1p5bit.py"
      )
  seen = {}  # a repeated config flag's last value wins, but a tuple's are joined: (1, 2) + (3,)
  for arg in argv[1:]:
    key, _, value = arg.partition("=")
    if key.startswith("--config.") and key in seen and "(" in value + seen[key]:
      raise UserError(f"{key} is given more than once — give a tuple-valued config flag once")
    seen[key] = value
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    raise UserError(f"{_message(e)} — see --helpfull for the flags") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise _config_flag_error(e, argv) from None


def parse_list(text: str, flag: str, choices: Collection[str] = (), convert=str) -> list:
  """The comma-separated items of `flag`'s value `text`, each `convert`ed (e.g. `int`) and, given
  `choices`, one of them."""
  items = [item.strip() for item in text.split(",") if item.strip()]
  valid = f": {', '.join(choices)}" if choices else ""
  if not items:
    raise UserError(f"{flag} is empty — give comma-separated values{valid}")
  out = []
  for item in items:
    if choices and item not in choices:
      raise UserError(f"{flag}: unknown {item!r} — choose from {', '.join(choices)}")
    try:
      out.append(convert(item))
    except ValueError:
      kind = convert.__name__
      raise UserError(
        f"{flag}: {item!r} is not a valid {kind} — give comma-separated {kind}s"
      ) from None
  return out


def positive(flag: str, *values) -> None:
  """A `UserError` unless each of `flag`'s `values` is above 0."""
  for value in values:
    if value <= 0:
      raise UserError(f"{flag}: {value} is not positive — give a value above 0")


def existing(flag: str, path, fix: str = "check the path") -> Path:
  """`flag`'s input `path`, which must exist."""
  path = Path(path)
  if not path.exists():
    raise UserError(f"{flag}: {path} does not exist — {fix}")
  return path


def input_file(flag: str, path, fix: str = "check the path") -> Path:
  """`flag`'s input file `path`: it must exist and not be a directory."""
  path = existing(flag, path, fix)
  if path.is_dir():
    raise UserError(f"{flag}: {path} is a directory — name a file; {fix}")
  return path


def read_json_lines(flag: str, path, fix: str) -> list:
  """The JSON value of each line of `flag`'s file `path` (blank lines skipped); a `UserError`
  naming the first line that is not JSON."""
  out = []
  for i, line in enumerate(input_file(flag, path, fix).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      out.append(json.loads(line))
    except ValueError:
      raise UserError(f"{flag}: {path} line {i} is not JSON — {fix}") from None
  return out


def output_file(flag: str, path) -> Path:
  """`flag`'s output file `path`: not a directory, in a writable directory."""
  path = Path(path)
  if path.is_dir():
    raise UserError(f"{flag}: {path} is a directory — name a file")
  if not (path.parent.is_dir() and os.access(path.parent, os.W_OK)):
    raise UserError(
      f"{flag}: {path.parent} is not a writable directory — create it or write elsewhere"
    )
  return path


def require_modules(script: str, *modules: str) -> None:
  """A `UserError` naming the `modules` (pip names = import names) `script` needs that are not
  installed; nothing is imported."""
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    raise UserError(
      f"{script} needs {', '.join(missing)} (not installed here) — pip install {' '.join(missing)}"
    )


def _report(e: UserError) -> None:
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def quiet_libraries() -> None:
  """No per-map progress bars from datasets, no INFO logs from Orbax/absl."""
  import datasets
  from absl import logging

  datasets.disable_progress_bars()
  logging.set_verbosity(logging.WARNING)


def run(main: Callable[[list[str]], None]) -> None:
  """`absl.app.run(main)` with one-line user errors, from flag parsing to the end of `main`."""
  from absl import app

  def parse(argv):
    try:
      return parse_flags(argv)
    except UserError as e:
      _report(e)

  def wrapped(argv):
    quiet_libraries()
    try:
      main(argv)
    except UserError as e:
      _report(e)

  app.run(wrapped, flags_parser=parse)


def guard(main: Callable[[], None]) -> None:
  """Calls `main()` (an argparse script) with one-line user errors."""
  quiet_libraries()
  try:
    main()
  except UserError as e:
    _report(e)
