"""Data pipeline: text sources -> documents -> token stream -> packed blocks -> batches.

    data = load(DataConfig(name="text", path="../shared/data/pycode/networkx_train.txt"), tok)
    for step, batch in enumerate(batches(data.blocks, batch_size=1, seed=0, start=pos), pos):
      ...  # batch["inputs"], batch["targets"]: int32 [B, T]; resume later from step + 1

Every stage goes through Hugging Face ``datasets`` (hub names and local files both load with
``datasets.load_dataset``; splitting and tokenization are ``Dataset.map(batched=True)``):

1. **Documents** (`load_documents`): a ``Dataset`` with one ``"text"`` column, one row per document.

   * ``wikitext`` -- hub ``wikitext`` (subset ``wikitext-2-raw-v1`` unless ``subset`` says
     otherwise) or local WikiText files (``wiki.test.raw`` raw, ``valid.txt``/``test.txt``
     tokenized).  As in the standard perplexity recipe the whole split is *one* document: its lines,
     without their line breaks, joined with ``"\\n"`` (for a local file this is the file's text).
   * ``oasst1`` -- hub ``OpenAssistant/oasst1`` or local json/jsonl files with its schema
     (``message_id``, ``parent_id``, ``role``, ``text``, ``rank``, ``deleted``).  One document per
     non-deleted root prompter message: the best-ranked thread below it in Guanaco format
     ``"### Human: q ### Assistant: a ### Human: ..."`` (see `best_thread`).
   * ``text`` -- local plain-text files, each split into documents at ``separator``.

   A local ``path`` is a file or a directory; a directory contributes its files whose name holds
   ``split`` as a ``.``/``_``/``-``-separated part (``networkx_train.txt`` for ``train``).  For a
   single file ``split`` is not used.

2. **Tokens** (`tokenize`): every document encoded on its own, with BOS/EOS as ``add_bos`` /
   ``add_eos`` ask, and the results concatenated in document order: int32 ``[N]``.

3. **Blocks** (`pack`): windows of ``seq_len + 1`` tokens at a stride of ``seq_len``, so that
   consecutive blocks share one token and every token but the first is a target exactly once:
   ``block i = tokens[i * seq_len : i * seq_len + seq_len + 1]``, ``num_blocks = (N - 1) //
   seq_len``; the tail that does not fill a block is dropped.  ``inputs = block[:-1]``,
   ``targets = block[1:]``.

4. **Batches**: `batches` yields ``{"inputs", "targets"}`` int32 ``[batch_size, seq_len]`` forever,
   epoch after epoch, each epoch in the order of a permutation of the blocks drawn from
   ``(seed, epoch)``; an epoch is ``num_blocks // batch_size`` batches (the blocks left over by the
   permutation are skipped that epoch).  The position is just the number of batches consumed so
   far: ``batches(..., start=position)`` yields exactly what the uninterrupted iterator would have
   yielded after ``position`` batches, which is all a checkpoint needs to store.  `eval_batches`
   yields every block once, in order, without shuffling.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc

from lowra_jax.models.tokenizer import Tokenizer

NAMES = ("wikitext", "oasst1", "text")
HUB_SUBSETS = {"wikitext": "wikitext-2-raw-v1"}
ENDOFTEXT = "<|endoftext|>"
OASST1_COLUMNS = ("message_id", "parent_id", "role", "text", "rank", "deleted")
_BLANK_LINES = re.compile(r"\n\s*\n")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w-]*(/[\w.-]+)?")
_TURN_PREFIX = {"prompter": "### Human: ", "assistant": "### Assistant: "}
_TURN_SEPARATOR = " "


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to cut it.

  name: source format, one of `NAMES` ("wikitext", "oasst1", "text").
  path: local file or directory, or (wikitext, oasst1) a hub dataset name such as ``wikitext`` or
    ``OpenAssistant/oasst1``.
  split: hub split, or the split name that picks files in a local directory.
  subset: hub configuration; for wikitext it defaults to ``wikitext-2-raw-v1``.
  seq_len: tokens per training example T (blocks hold T + 1 tokens).
  batch_size: examples per batch B.
  seed: seed of the per-epoch shuffle (>= 0).
  separator: for "text" files, the string between documents; None splits at ``<|endoftext|>`` in
    files that contain it and at blank lines otherwise.
  add_bos, add_eos: put BOS before / EOS after every document.
  max_documents: keep only the first documents (None: all).
  """

  name: str
  path: str
  split: str = "train"
  subset: str | None = None
  seq_len: int = 512
  batch_size: int = 1
  seed: int = 0
  separator: str | None = None
  add_bos: bool = True
  add_eos: bool = True
  max_documents: int | None = None

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f"name={self.name!r} — use one of {', '.join(NAMES)}.")
    for field in ("seq_len", "batch_size"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)} — use a value >= 1.")
    if self.seed < 0:
      raise ValueError(f"seed={self.seed} — use a seed >= 0.")
    if self.max_documents is not None and self.max_documents < 1:
      raise ValueError(f"max_documents={self.max_documents} — use a count >= 1, or None for all.")
    if self.separator == "":
      raise ValueError("separator is empty — use None for the default.")


@dataclasses.dataclass(frozen=True)
class PackedData:
  """A tokenized source: ``tokens`` int32 [num_tokens] and its ``blocks`` of ``seq_len + 1``."""

  tokens: np.ndarray
  seq_len: int
  num_documents: int

  @property
  def num_tokens(self) -> int:
    return len(self.tokens)

  @property
  def blocks(self) -> np.ndarray:
    """int32 [num_blocks, seq_len + 1], a read-only view of ``tokens`` (see `pack`)."""
    return pack(self.tokens, self.seq_len)

  @property
  def num_blocks(self) -> int:
    return num_blocks(self.num_tokens, self.seq_len)


def load(config: DataConfig, tokenizer: Tokenizer) -> PackedData:
  """Documents of ``config``, tokenized and ready to pack; at least one block or ValueError."""
  documents = load_documents(config)
  tokens = tokenize(documents, tokenizer, add_bos=config.add_bos, add_eos=config.add_eos)
  if num_blocks(len(tokens), config.seq_len) == 0:
    raise ValueError(
      f"{config.path} ({config.split}) gives {len(tokens)} tokens, fewer than seq_len + 1 = "
      f"{config.seq_len + 1} — lower seq_len or add data."
    )
  return PackedData(tokens, config.seq_len, len(documents))


def load_documents(config: DataConfig) -> datasets.Dataset:
  """The documents of ``config``: a ``Dataset`` with one string column ``"text"``."""
  loader = {"wikitext": _wikitext, "oasst1": _oasst1, "text": _plain_text}[config.name]
  documents = loader(config)
  if len(documents) == 0:
    raise ValueError(
      f"{config.path} ({config.split}) holds no {config.name} documents — check data.name, "
      "data.path and data.split"
    )
  if config.max_documents is not None:
    documents = documents.select(range(min(config.max_documents, len(documents))))
  return documents


def tokenize(
  documents: datasets.Dataset, tokenizer: Tokenizer, *, add_bos: bool, add_eos: bool
) -> np.ndarray:
  """int32 [N]: every ``documents["text"]`` encoded on its own, concatenated in order."""
  encoded = documents.map(
    lambda batch: {"ids": tokenizer.encode_batch(batch["text"], bos=add_bos, eos=add_eos)},
    batched=True,
    remove_columns=documents.column_names,
    keep_in_memory=True,
  )
  return pc.list_flatten(encoded.data.column("ids")).to_numpy().astype(np.int32)


def num_blocks(num_tokens: int, seq_len: int) -> int:
  """Blocks of ``seq_len + 1`` tokens at stride ``seq_len`` that fit in ``num_tokens``."""
  return max(num_tokens - 1, 0) // seq_len


def pack(tokens: np.ndarray, seq_len: int) -> np.ndarray:
  """[num_blocks, seq_len + 1] read-only view: row i is ``tokens[i*seq_len : (i+1)*seq_len + 1]``."""
  count = num_blocks(len(tokens), seq_len)
  if count == 0:
    return np.empty((0, seq_len + 1), tokens.dtype)
  return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:count]


def batches_per_epoch(blocks: np.ndarray, batch_size: int) -> int:
  """Full batches in one pass over ``blocks`` (the remainder is skipped each epoch)."""
  return len(blocks) // batch_size


def epoch_order(num: int, seed: int, epoch: int) -> np.ndarray:
  """int64 [num]: the permutation of the blocks for ``epoch``, drawn from ``(seed, epoch)``."""
  return np.random.default_rng((seed, epoch)).permutation(num)


def batches(
  blocks: np.ndarray, *, batch_size: int, seed: int, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """Shuffled training batches forever, from batch number ``start`` (batches consumed so far).

  Yields ``{"inputs": int32 [B, T], "targets": int32 [B, T]}`` with ``targets`` the inputs shifted
  left by one token.  Batch k is batch ``k % per_epoch`` of epoch ``k // per_epoch``, so the
  stream from ``start=k`` equals the stream from 0 with its first k batches dropped.
  """
  per_epoch = batches_per_epoch(blocks, batch_size)
  if per_epoch == 0:
    raise ValueError(
      f"{len(blocks)} blocks cannot fill one batch of {batch_size} — lower batch_size or seq_len."
    )
  if start < 0:
    raise ValueError(f"start is a count of batches already consumed, >= 0; got {start}.")
  epoch, first = divmod(start, per_epoch)
  while True:
    order = epoch_order(len(blocks), seed, epoch)
    for b in range(first, per_epoch):
      yield _split(blocks[order[b * batch_size : (b + 1) * batch_size]])
    epoch, first = epoch + 1, 0


def eval_batches(blocks: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every block once, in order: ``{"inputs", "targets"}`` int32 [B, T]; the last B may be less."""
  for lo in range(0, len(blocks), batch_size):
    yield _split(blocks[lo : lo + batch_size])


def _split(rows: np.ndarray) -> dict[str, np.ndarray]:
  """[B, T + 1] blocks -> inputs [B, T] and targets [B, T], contiguous int32."""
  return {
    "inputs": np.ascontiguousarray(rows[:, :-1], np.int32),
    "targets": np.ascontiguousarray(rows[:, 1:], np.int32),
  }


# --- sources -------------------------------------------------------------------------------------


def _is_hub(config: DataConfig) -> bool:
  """``path`` names a hub dataset: no such local path, hub-capable source, ``owner/name`` shape."""
  path = config.path
  return (
    config.name != "text"
    and not Path(path).exists()
    and _HUB_ID.fullmatch(path) is not None
    and not Path(path).suffix
  )


def _local_files(config: DataConfig) -> list[str]:
  """The local files of ``config``: ``path`` itself, or its directory's files for ``split``."""
  path = Path(config.path)
  if not path.exists():
    raise FileNotFoundError(f"data path {path} does not exist — set data.path to a file or dir.")
  if path.is_file():
    return [str(path)]
  files = sorted(
    p for p in path.iterdir() if p.is_file() and config.split in re.split(r"[._-]", p.name)
  )
  if not files:
    raise FileNotFoundError(
      f"no file for split {config.split!r} in {path} (names must hold it, e.g. "
      f"{config.split}.txt) — set data.split or point data.path at a file."
    )
  if len({p.suffix for p in files}) > 1:
    names = ", ".join(p.name for p in files)
    raise ValueError(
      f"{path} holds {config.split!r} in several formats ({names}) — point data.path at one file."
    )
  return [str(p) for p in files]


def check_source(config: DataConfig) -> None:
  """Reads nothing: a local source's files exist and hold its split (FileNotFoundError /
  ValueError as `load`); hub names are checked when loaded."""
  if not _is_hub(config):
    _local_files(config)


def _load(config: DataConfig, builder: str, **kwargs) -> datasets.Dataset:
  """``load_dataset`` on the hub name, or on the local files with the packaged ``builder``."""
  if _is_hub(config):
    subset = config.subset or HUB_SUBSETS.get(config.name)
    return datasets.load_dataset(config.path, subset, split=config.split)
  return datasets.load_dataset(builder, data_files=_local_files(config), split="train", **kwargs)


def _wikitext(config: DataConfig) -> datasets.Dataset:
  """The split as one document: its lines without line breaks, joined with "\\n"."""
  lines = _load(config, "text")["text"]
  return datasets.Dataset.from_dict({"text": ["\n".join(line.rstrip("\n") for line in lines)]})


def _plain_text(config: DataConfig) -> datasets.Dataset:
  """Each file read whole, then split into stripped, non-empty documents at the separator."""
  files = _load(config, "text", sample_by="document")
  return files.map(
    lambda batch: {"text": [d for text in batch["text"] for d in _split_documents(text, config)]},
    batched=True,
    remove_columns=files.column_names,
    keep_in_memory=True,
  )


def _split_documents(text: str, config: DataConfig) -> list[str]:
  """Documents of one file's ``text`` (see `DataConfig.separator`)."""
  if config.separator is not None:
    parts = text.split(config.separator)
  elif ENDOFTEXT in text:
    parts = text.split(ENDOFTEXT)
  else:
    parts = _BLANK_LINES.split(text)
  return [part.strip() for part in parts if part.strip()]


def _oasst1(config: DataConfig) -> datasets.Dataset:
  """One best-ranked Guanaco-format thread per non-deleted root prompter message."""
  messages = _load(config, "json")
  missing = [c for c in OASST1_COLUMNS if c not in messages.column_names]
  if missing:
    raise ValueError(
      f"{config.path} lacks oasst1 columns {', '.join(missing)} — point data.path at oasst1 rows"
    )
  messages = messages.select_columns(list(OASST1_COLUMNS)).to_list()
  return datasets.Dataset.from_dict({"text": best_threads(messages)})


def best_threads(messages: list[dict]) -> list[str]:
  """Guanaco-format text of the best-ranked thread below every non-deleted root prompter message.

  ``messages`` are oasst1 rows (dicts with at least `OASST1_COLUMNS`), roots in their order.
  """
  replies: dict[str, list[dict]] = {}
  for m in messages:
    if m["parent_id"] is not None and not m["deleted"]:
      replies.setdefault(m["parent_id"], []).append(m)
  roots = [
    m for m in messages if m["parent_id"] is None and m["role"] == "prompter" and not m["deleted"]
  ]
  threads = [best_thread(root, replies) for root in roots]
  return [t for t in threads if t]


def best_thread(root: dict, replies: dict[str, list[dict]]) -> str:
  """From ``root``, follow the best reply (lowest ``rank``; None ranks last) until there is none.

  ``replies`` maps a message id to its non-deleted replies; ties keep the first reply.  Turns are
  ``"### Human: " + text`` / ``"### Assistant: " + text`` joined with a space (the
  openassistant-guanaco set joins them without one).  Trailing prompter turns are dropped, so a
  thread ends with an assistant turn; a root without an answer gives "".
  """
  path = [root]
  while children := replies.get(path[-1]["message_id"]):
    path.append(min(children, key=lambda m: (m["rank"] is None, m["rank"] or 0)))
  while path and path[-1]["role"] != "assistant":
    path.pop()
  return _TURN_SEPARATOR.join(_TURN_PREFIX[m["role"]] + m["text"] for m in path)
