"""Tests for lowra_jax.models.tokenizer.

The llama2.c tokenizer is checked against an independent oracle: a direct python port of
llama2.c's ``encode`` (run.c) that reads ``tok*.bin`` with ``struct`` and merges by score, with no
``tokenizers`` involved.  The HF tokenizer of pycode-llama-17m is checked against its own
``tokenizer.json`` / ``config.json``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lowra_jax.models.tokenizer import Tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
STORIES = DATA / "models" / "stories260K"
TOK512 = STORIES / "tok512.bin"
PYCODE = DATA / "models" / "pycode-llama-17m"
TINYSTORIES = DATA / "tinystories" / "tinystories_val.txt"
NETWORKX = DATA / "pycode" / "networkx_eval.txt"

EDGE_CASES = [
  "",
  " ",
  "a",
  "   leading spaces",
  "trailing spaces   ",
  "  both  ",
  "line one\nline two\n\nafter a blank line\n",
  "\n",
  "naïve café 日本",
  "emoji 🙂 and tab\there",
  "<s> literal specials </s> <unk>",
  "<0x41> is not a byte",
  "He shouted, \u00e2\u20ac\u0153Hi!\u00e2\u20ac\u009d",  # TinyStories mojibake
  "Once upon a time, there was a little girl named Lily.",
]


def _need(path: Path) -> Path:
  if not path.exists():
    pytest.skip(f"../shared/data not present ({path.name} missing); real-data test skipped")
  return path


def _one_line(excinfo: pytest.ExceptionInfo) -> str:
  message = str(excinfo.value)
  assert message and "\n" not in message
  return message


# --- reference: llama2.c's encode (run.c), ported literally ---


def _read_tok_bin(path: Path) -> tuple[list[str], list[float]]:
  data = path.read_bytes()
  offset, pieces, scores = 4, [], []
  while offset < len(data):
    score, length = struct.unpack_from("<fi", data, offset)
    offset += 8
    pieces.append(data[offset : offset + length].decode("utf-8"))
    scores.append(score)
    offset += length
  return pieces, scores


def _reference_encode(
  text: str, pieces: list[str], scores: list[float], bos: bool, eos: bool
) -> list[int]:
  """run.c ``encode``: dummy prefix, codepoint lookup with byte fallback, best-score merges."""
  lookup = {piece: i for i, piece in enumerate(pieces)}
  tokens = [1] if bos else []
  if text:
    tokens.append(lookup[" "])
  for char in text:
    if char in lookup:
      tokens.append(lookup[char])
    else:
      tokens.extend(byte + 3 for byte in char.encode("utf-8"))
  while True:
    best_score, best_id, best_idx = -1e10, -1, -1
    for i in range(len(tokens) - 1):
      merged = lookup.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
      if merged is not None and scores[merged] > best_score:
        best_score, best_id, best_idx = scores[merged], merged, i
    if best_idx == -1:
      break
    tokens[best_idx : best_idx + 2] = [best_id]
  if eos:
    tokens.append(2)
  return tokens


@pytest.fixture(scope="module")
def stories_tok() -> Tokenizer:
  return load_tokenizer(_need(TOK512))


@pytest.fixture(scope="module")
def reference() -> tuple[list[str], list[float]]:
  return _read_tok_bin(_need(TOK512))


@pytest.fixture(scope="module")
def tinystories_lines() -> list[str]:
  lines = [line for line in _need(TINYSTORIES).read_text("utf-8").splitlines() if line]
  non_ascii = [line for line in lines if not line.isascii()]
  return lines[:400] + non_ascii


# --- llama2.c tokenizer ---


def test_llama2c_matches_reference_on_tinystories(stories_tok, reference, tinystories_lines):
  assert any(not line.isascii() for line in tinystories_lines)
  got = stories_tok.encode_batch(tinystories_lines, bos=True, eos=True)
  for line, ids in zip(tinystories_lines, got):
    assert ids == _reference_encode(line, *reference, bos=True, eos=True), line
    assert stories_tok.decode(ids) == line


@pytest.mark.parametrize("text", EDGE_CASES)
def test_llama2c_matches_reference_on_edge_cases(stories_tok, reference, text):
  ids = stories_tok.encode(text, bos=False)
  assert ids == _reference_encode(text, *reference, bos=False, eos=False)
  assert stories_tok.decode(ids) == text
  assert stories_tok.decode(stories_tok.encode(text, bos=True, eos=True)) == text


def test_llama2c_byte_fallback_and_specials(stories_tok, reference):
  pieces, _ = reference
  hf = stories_tok.hf
  assert (stories_tok.bos_id, stories_tok.eos_id, stories_tok.vocab_size) == (1, 2, 512)
  assert hf.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
  assert hf.convert_ids_to_tokens(pieces.index(" ")) == "▁"
  # "日" is not in the vocab: its three UTF-8 bytes, as byte pieces (byte + 3), after "▁".
  assert stories_tok.encode("日", bos=False) == [pieces.index(" ")] + [b + 3 for b in "日".encode()]
  # Specials come only from the flags, never from the text.
  assert stories_tok.encode("", bos=True, eos=True) == [1, 2]
  assert stories_tok.encode("", bos=False) == []
  assert 1 not in stories_tok.encode("<s>", bos=False)


def test_llama2c_bos_not_doubled(stories_tok):
  text = "The cat sat."
  ids = stories_tok.encode(text)
  assert ids[0] == 1 and ids.count(1) == 1
  assert stories_tok.hf(text)["input_ids"] == ids  # hf behaves like LlamaTokenizerFast: BOS once
  assert stories_tok.encode_batch([text, ""], bos=False, eos=True) == [ids[1:] + [2], [2]]
  assert stories_tok.encode_batch([]) == []


def test_llama2c_directory_and_file_agree(stories_tok):
  from_dir = load_tokenizer(_need(STORIES))
  text = "Lily and Ben went to the park."
  assert from_dir.encode(text) == stories_tok.encode(text)


def _write_tok_bin(path: Path, normal: list[tuple[str, float]]) -> None:
  specials = [("<unk>", 0.0), ("\n<s>\n", 0.0), ("\n</s>\n", 0.0)]
  byte_pieces = [(f"<0x{b:02X}>", 0.0) for b in range(256)]
  records = specials + byte_pieces + normal
  body = b"".join(struct.pack("<fi", score, len(p.encode())) + p.encode() for p, score in records)
  path.write_bytes(struct.pack("<i", max(len(p.encode()) for p, _ in records)) + body)


def test_llama2c_merges_follow_scores_not_ids(tmp_path):
  # Scores out of id order: "yz" (higher id, better score) must be merged before "xy", and "abc"
  # comes from "a" + "bc" or "ab" + "c", then " " + "abc" from the merged pieces.
  normal = [(" ", -10.0), ("a", -11.0), ("b", -12.0), ("c", -13.0)]
  normal += [("x", -14.0), ("y", -15.0), ("z", -16.0), ("xy", -7.0), ("yz", -6.0)]
  normal += [("ab", -2.0), ("bc", -1.0), ("abc", -3.0), (" abc", -4.0), ("ca", -5.0)]
  path = tmp_path / "tok_custom.bin"
  _write_tok_bin(path, normal)
  tok = load_tokenizer(path)
  reference = _read_tok_bin(path)
  for text in ["abc", "ab", "abcabc", "cab ab", "abc abc ca", "abd", "bcab c", "xyz", "xyzxy z"]:
    assert tok.encode(text) == _reference_encode(text, *reference, bos=True, eos=False), text
    assert tok.decode(tok.encode(text)) == text
  assert tok.hf.convert_ids_to_tokens(tok.encode("xyz", bos=False)) == ["▁", "x", "yz"]
  assert tok.hf.convert_ids_to_tokens(tok.encode("abc", bos=False)) == ["▁abc"]
  assert tok.vocab_size == 259 + len(normal)


# --- HF tokenizer (pycode-llama-17m) ---


@pytest.fixture(scope="module")
def pycode_tok() -> Tokenizer:
  return load_tokenizer(_need(PYCODE))


def test_hf_ids_match_config(pycode_tok):
  config = json.loads((PYCODE / "config.json").read_text())
  assert pycode_tok.bos_id == config["bos_token_id"] == 1
  assert pycode_tok.eos_id == config["eos_token_id"] == 2
  assert pycode_tok.vocab_size == config["vocab_size"] == 4096


def test_hf_round_trip_on_networkx(pycode_tok):
  text = _need(NETWORKX).read_text("utf-8")
  lines = [line for line in text.splitlines()[:400] if line.strip()][::10]
  lines += ["    return G  ", "\ttabbed\n", "", "ünïcödé → ∞"]
  for line, ids in zip(lines, pycode_tok.encode_batch(lines, bos=True, eos=True)):
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert pycode_tok.decode(ids) == line
  document = text[:20_000]
  ids = pycode_tok.encode(document, bos=False)
  assert pycode_tok.decode(ids) == document
  assert len(ids) < len(document) / 2  # a real BPE, not bytes


def test_hf_bos_eos_flags(pycode_tok):
  text = "import networkx as nx\n"
  body = pycode_tok.encode(text, bos=False)
  assert 1 not in body and 2 not in body
  assert pycode_tok.encode(text) == [1] + body
  assert pycode_tok.encode(text, eos=True) == [1] + body + [2]
  assert pycode_tok.encode(text, bos=False, eos=True) == body + [2]
  # The tokenizer.json post-processor adds BOS itself; encode must not add a second one.
  assert pycode_tok.hf(text)["input_ids"] == pycode_tok.encode(text)
  assert pycode_tok.encode_batch([text, text], bos=False) == [body, body]


def test_hf_endoftext_is_plain_text(pycode_tok):
  spec = json.loads((PYCODE / "tokenizer.json").read_text())
  assert "<|endoftext|>" not in {t["content"] for t in spec["added_tokens"]}
  assert "<|endoftext|>" not in spec["model"]["vocab"]
  # So the document separator of networkx_*.txt is ordinary text, split into BPE pieces.
  ids = pycode_tok.encode("\n<|endoftext|>\n", bos=False)
  assert len(ids) > 1 and not {0, 1, 2} & set(ids)
  assert pycode_tok.decode(ids) == "\n<|endoftext|>\n"
  # Special-token strings in the text are text too (the flags alone insert BOS/EOS).
  assert not {1, 2} & set(pycode_tok.encode("<s> </s>", bos=False))


# --- errors ---


def test_missing_path(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError) as excinfo:
    load_tokenizer(missing)
  assert str(missing) in _one_line(excinfo)


def test_directory_without_tokenizer(tmp_path):
  (tmp_path / "weights.safetensors").write_bytes(b"")
  with pytest.raises(ValueError) as excinfo:
    load_tokenizer(tmp_path)
  message = _one_line(excinfo)
  assert str(tmp_path) in message and "tokenizer.json" in message and "tok*.bin" in message


def test_not_a_tokenizer_file(tmp_path):
  model = tmp_path / "stories260K.bin"
  model.write_bytes(b"\0" * 64)
  with pytest.raises(ValueError) as excinfo:
    load_tokenizer(model)
  assert str(model) in _one_line(excinfo)


def test_several_llama2c_tokenizers(tmp_path):
  for name in ("tok512.bin", "tok4096.bin"):
    (tmp_path / name).write_bytes(b"")
  with pytest.raises(ValueError, match="several") as excinfo:
    load_tokenizer(tmp_path)
  _one_line(excinfo)


@pytest.mark.parametrize(
  "cut", [2, 4 + 3, 4 + 8 + 2, -1, -5], ids=["header", "record", "piece", "last-byte", "last-rec"]
)
def test_truncated_llama2c_file(tmp_path, cut):
  data = _need(TOK512).read_bytes()
  path = tmp_path / "tok512.bin"
  path.write_bytes(data[:cut])
  with pytest.raises(ValueError, match="truncated") as excinfo:
    load_tokenizer(path)
  assert str(path) in _one_line(excinfo)


def test_llama2c_file_cut_at_a_record_boundary(tmp_path):
  # Only the first 100 records: well formed, but the byte-fallback pieces 3..258 are incomplete.
  data = _need(TOK512).read_bytes()
  offset = 4
  for _ in range(100):
    offset += 8 + struct.unpack_from("<i", data, offset + 4)[0]
  path = tmp_path / "tok512.bin"
  path.write_bytes(data[:offset])
  with pytest.raises(ValueError, match="100 tokens") as excinfo:
    load_tokenizer(path)
  assert str(path) in _one_line(excinfo)


def test_shuffled_llama2c_layout(tmp_path):
  path = tmp_path / "tok_bad.bin"
  _write_tok_bin(path, [("a", -1.0)])
  data = bytearray(path.read_bytes())
  data[data.index(b"<0x00>") : data.index(b"<0x00>") + 6] = b"<0x01>"
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="token 3") as excinfo:
    load_tokenizer(path)
  assert str(path) in _one_line(excinfo)
