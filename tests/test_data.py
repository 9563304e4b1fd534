"""Tests for lowra_jax.data.

Packing and batching are checked against brute-force oracles on synthetic token streams; the
sources are checked on the bundled material in ``../shared/data`` (oasst1 schema sample against
hand-derived threads, WikiText against encoding the file's text directly, the networkx task's
``<|endoftext|>`` documents against counts read off the files).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lowra_jax import data
from lowra_jax.data import DataConfig
from lowra_jax.models.tokenizer import load_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PYCODE = DATA / "models" / "pycode-llama-17m"
OASST1 = DATA / "oasst1" / "sample.jsonl"
WIKITEXT = DATA / "wikitext-2"
NETWORKX = DATA / "pycode"

needs_shared = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} (shared material) is absent")


class CharTokenizer:
  """Duck-typed `Tokenizer`: one id per character (its code point + 10), BOS 1, EOS 2."""

  bos_id, eos_id = 1, 2

  def encode_batch(self, texts, *, bos, eos):
    return [[1] * bos + [ord(c) + 10 for c in t] + [2] * eos for t in texts]


@pytest.fixture(scope="module")
def tok():
  if not PYCODE.is_dir():
    pytest.skip(f"{PYCODE} is absent")
  return load_tokenizer(PYCODE)


def oracle_blocks(tokens: list[int], seq_len: int) -> np.ndarray:
  """Brute force: walk the stream in steps of seq_len, keep every full window of seq_len + 1."""
  rows = []
  start = 0
  while start + seq_len + 1 <= len(tokens):
    rows.append(tokens[start : start + seq_len + 1])
    start += seq_len
  return np.array(rows, dtype=np.int32).reshape(-1, seq_len + 1)


def synthetic_blocks(num: int, seq_len: int = 4) -> np.ndarray:
  """[num, seq_len + 1] blocks whose rows are distinguishable (row i starts with i * seq_len)."""
  return data.pack(np.arange(num * seq_len + 1, dtype=np.int32), seq_len)


def take(iterator, n: int) -> list[dict[str, np.ndarray]]:
  return [next(iterator) for _ in range(n)]


# --- packing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_bos, add_eos", [(True, True), (True, False), (False, False)])
def test_tokenize_and_pack_match_oracle(add_bos, add_eos):
  rng = np.random.default_rng(0)
  docs = ["".join(chr(97 + c) for c in rng.integers(0, 26, n)) for n in rng.integers(0, 40, 30)]
  documents = data.datasets.Dataset.from_dict({"text": docs})
  tokens = data.tokenize(documents, CharTokenizer(), add_bos=add_bos, add_eos=add_eos)
  stream = [t for d in docs for t in [1] * add_bos + [ord(c) + 10 for c in d] + [2] * add_eos]
  assert tokens.dtype == np.int32
  np.testing.assert_array_equal(tokens, stream)
  for seq_len in (1, 3, 7, 16, len(stream) - 1, len(stream), len(stream) + 5):
    blocks = data.pack(tokens, seq_len)
    expected = oracle_blocks(stream, seq_len)
    assert blocks.shape == expected.shape == (data.num_blocks(len(stream), seq_len), seq_len + 1)
    np.testing.assert_array_equal(blocks, expected)


def test_targets_are_inputs_shifted_by_one():
  blocks = synthetic_blocks(12)
  for batch in take(data.batches(blocks, batch_size=3, seed=0), 8) + list(
    data.eval_batches(blocks, 5)
  ):
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    np.testing.assert_array_equal(batch["targets"] - batch["inputs"], 1)  # arange stream


def test_eval_batches_cover_blocks_in_order():
  blocks = synthetic_blocks(11)
  got = list(data.eval_batches(blocks, 4))
  assert [b["inputs"].shape for b in got] == [(4, 4), (4, 4), (3, 4)]
  np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in got]), blocks[:, :-1])
  np.testing.assert_array_equal(np.concatenate([b["targets"] for b in got]), blocks[:, 1:])


# --- order, determinism, resume ------------------------------------------------------------------


def first_tokens(batches: list[dict[str, np.ndarray]]) -> list[list[int]]:
  return [b["inputs"][:, 0].tolist() for b in batches]


def test_same_seed_same_batches_other_seed_other_order():
  blocks = synthetic_blocks(40)
  run = lambda seed: first_tokens(take(data.batches(blocks, batch_size=2, seed=seed), 50))
  assert run(0) == run(0)
  assert run(0) != run(1)


def test_epochs_are_reshuffled_permutations():
  blocks = synthetic_blocks(10)
  per_epoch = data.batches_per_epoch(blocks, 3)
  assert per_epoch == 3
  epochs = np.array(first_tokens(take(data.batches(blocks, batch_size=3, seed=7), 4 * per_epoch)))
  epochs = epochs.reshape(4, per_epoch * 3) // 4  # block indices, epoch by epoch
  for order in epochs:
    assert len(set(order.tolist())) == per_epoch * 3  # no block twice in an epoch
  assert len({tuple(order) for order in epochs}) > 1
  np.testing.assert_array_equal(epochs[1], data.epoch_order(10, 7, 1)[:9])


def test_resume_reproduces_the_continuation_across_epochs():
  blocks = synthetic_blocks(10)
  full = take(data.batches(blocks, batch_size=3, seed=3), 11)  # 3 batches/epoch: 3+ epochs
  for start in range(11):
    resumed = take(data.batches(blocks, batch_size=3, seed=3, start=start), 11 - start)
    for got, want in zip(resumed, full[start:], strict=True):
      np.testing.assert_array_equal(got["inputs"], want["inputs"])
      np.testing.assert_array_equal(got["targets"], want["targets"])


# --- sources -------------------------------------------------------------------------------------

THREAD_1 = (
  "### Human: How do I reverse a list in Python without changing the original?"
  " ### Assistant: Use slicing: `reversed_copy = my_list[::-1]`. It builds a new list and leaves"
  " `my_list` as it was."
  " ### Human: Is slicing slower than reversed()?"
  " ### Assistant: Both are linear in the length of the list; for most lists the difference is"
  " negligible."
)
THREAD_2 = (
  "### Human: Give me three tips for writing a good commit message."
  " ### Assistant: 1. Keep the subject line short and imperative. 2. Explain why, not only what."
  " 3. Wrap the body at about 72 characters."
)


@needs_shared
def test_oasst1_sample_best_threads():
  documents = data.load_documents(DataConfig("oasst1", str(OASST1)))
  assert list(documents["text"]) == [THREAD_1, THREAD_2]  # the deleted root 9 is skipped


def message(mid, parent, role, rank=None, deleted=False):
  """One oasst1 row (only the columns the thread builder reads); its text names it."""
  fields = ("message_id", "parent_id", "role", "text", "rank", "deleted")
  return dict(zip(fields, (mid, parent, role, f"{role} {mid}", rank, deleted), strict=True))


def test_oasst1_rank_rules_from_jsonl(tmp_path):
  rows = [
    message("r", None, "prompter"),
    message("a_none", "r", "assistant", rank=None),
    message("a_del", "r", "assistant", rank=0, deleted=True),
    message("a_1", "r", "assistant", rank=1),
    message("p", "a_1", "prompter"),  # unanswered follow-up: dropped
    message("lonely", None, "prompter"),  # no answer at all: no document
    message("r2", None, "prompter"),
    message("b_none", "r2", "assistant"),  # only unranked replies: the first one
    message("b_none2", "r2", "assistant"),
  ]
  path = tmp_path / "tree.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  documents = data.load_documents(DataConfig("oasst1", str(path)))
  assert list(documents["text"]) == [
    "### Human: prompter r ### Assistant: assistant a_1",
    "### Human: prompter r2 ### Assistant: assistant b_none",
  ]


@needs_shared
def test_wikitext_local_tokens_equal_encoding_the_file(tok):
  path = WIKITEXT / "wiki.test.raw"
  packed = data.load(DataConfig("wikitext", str(path)), tok)
  expected = tok.encode(path.read_text(encoding="utf-8").removesuffix("\n"), bos=True, eos=True)
  assert packed.num_documents == 1
  assert packed.num_tokens == len(expected)
  np.testing.assert_array_equal(packed.tokens, expected)
  assert packed.num_blocks == (len(expected) - 1) // 512
  assert packed.blocks.shape == (packed.num_blocks, 513)


@needs_shared
def test_wikitext_directory_picks_the_split_file():
  (valid,) = data.load_documents(DataConfig("wikitext", str(WIKITEXT), split="valid"))["text"]
  assert valid == (WIKITEXT / "valid.txt").read_text(encoding="utf-8").removesuffix("\n")
  with pytest.raises(ValueError, match="several formats"):
    data.load_documents(DataConfig("wikitext", str(WIKITEXT), split="test"))


@needs_shared
@pytest.mark.parametrize("split, count", [("train", 335), ("eval", 47)])
def test_networkx_documents_split_at_endoftext(split, count):
  path = NETWORKX / f"networkx_{split}.txt"
  assert path.read_text(encoding="utf-8").count(data.ENDOFTEXT) == count - 1
  for config in (
    DataConfig("text", str(path)),
    DataConfig("text", str(NETWORKX), split=split),
    DataConfig("text", str(path), separator=data.ENDOFTEXT),
  ):
    documents = data.load_documents(config)["text"]
    assert len(documents) == count
    assert all(data.ENDOFTEXT not in d and d == d.strip() for d in documents)


@needs_shared
def test_networkx_eval_tokens_are_per_document(tok):
  path = NETWORKX / "networkx_eval.txt"
  packed = data.load(DataConfig("text", str(path), max_documents=5, add_eos=False), tok)
  docs = [d.strip() for d in path.read_text(encoding="utf-8").split(data.ENDOFTEXT)][:5]
  expected = [t for ids in tok.encode_batch(docs, bos=True, eos=False) for t in ids]
  assert packed.num_documents == 5
  np.testing.assert_array_equal(packed.tokens, expected)


def test_plain_text_separators(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("first doc\nstill first\n\n  \n\nsecond;;third\n\n\n")
  load = lambda **kw: list(data.load_documents(DataConfig("text", str(path), **kw))["text"])
  assert load() == ["first doc\nstill first", "second;;third"]
  assert load(separator=";;") == ["first doc\nstill first\n\n  \n\nsecond", "third"]
  assert load(max_documents=1) == ["first doc\nstill first"]


# --- errors --------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
  missing = tmp_path / "nope.txt"
  for name in data.NAMES:
    with pytest.raises(FileNotFoundError, match="nope.txt"):
      data.load_documents(DataConfig(name, str(missing)))
  with pytest.raises(FileNotFoundError, match="split 'train'"):
    data.load_documents(DataConfig("text", str(tmp_path)))


@pytest.mark.parametrize(
  "kwargs, match",
  [
    ({"name": "c4"}, "name='c4' — use one of wikitext, oasst1, text"),
    ({"seq_len": 0}, "seq_len=0 — use a value >= 1"),
    ({"batch_size": 0}, "batch_size=0 — use a value >= 1"),
    ({"seed": -1}, "seed=-1 — use a seed >= 0"),
    ({"max_documents": 0}, "max_documents=0 — use a count >= 1"),
    ({"separator": ""}, "separator is empty"),
  ],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    DataConfig(**{"name": "text", "path": "x.txt", **kwargs})


def test_too_little_data_errors(tmp_path):
  path = tmp_path / "tiny.txt"
  path.write_text("abc")
  with pytest.raises(ValueError, match="fewer than seq_len"):
    data.load(DataConfig("text", str(path), seq_len=5), CharTokenizer())
  with pytest.raises(ValueError, match="cannot fill one batch"):
    next(data.batches(synthetic_blocks(2), batch_size=3, seed=0))
  with pytest.raises(ValueError, match="holds no text documents"):
    path.write_text("\n\n")
    data.load_documents(DataConfig("text", str(path)))


HUB_ROWS = {
  "wikitext": [{"text": " = A = \n"}, {"text": ""}, {"text": " b \n"}],
  "oasst1": [message("q", None, "prompter"), message("a", "q", "assistant", rank=0)],
}


@pytest.mark.parametrize(
  "name, path, subset, call, document",
  [
    ("wikitext", "wikitext", None, ("wikitext", "wikitext-2-raw-v1"), " = A = \n\n b "),
    ("wikitext", "Salesforce/wikitext", "wikitext-103-raw-v1", None, " = A = \n\n b "),
    (
      "oasst1",
      "OpenAssistant/oasst1",
      None,
      None,
      "### Human: prompter q ### Assistant: assistant a",
    ),
  ],
)
def test_hub_names_go_to_load_dataset(monkeypatch, name, path, subset, call, document):
  calls = []

  def fake_load_dataset(*args, **kwargs):
    calls.append((args, kwargs))
    return data.datasets.Dataset.from_list(HUB_ROWS[name])

  monkeypatch.setattr(data.datasets, "load_dataset", fake_load_dataset)
  documents = data.load_documents(DataConfig(name, path, split="validation", subset=subset))
  assert calls == [(call or (path, subset), {"split": "validation"})]
  assert list(documents["text"]) == [document]
