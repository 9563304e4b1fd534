"""Tokenizers for LLaMA models behind one small interface, all served by HF ``tokenizers``.

Two on-disk formats are understood by :func:`load_tokenizer`:

* **Hugging Face model directories** holding ``tokenizer.json`` and/or ``tokenizer_config.json``.
  They are loaded with ``transformers.AutoTokenizer.from_pretrained`` from the local directory only
  (no hub access, no remote code); the result must be a fast (Rust-backed) tokenizer.
* **llama2.c tokenizer files** (``tok*.bin``, e.g. ``tok512.bin`` next to ``stories260K.bin``), the
  binary export of a sentencepiece BPE model written by karpathy/llama2.c's ``tokenizer.py``:
  a little-endian ``int32 max_token_length``, then for every token ``float32 score``,
  ``int32 length`` and ``length`` bytes of the UTF-8 piece, until the end of the file (the vocab
  size is not stored).  The export replaces sentencepiece's "▁" by a plain space and stores BOS/EOS
  as ``"\\n<s>\\n"`` / ``"\\n</s>\\n"``; id 0 is ``<unk>`` and ids 3..258 are the byte-fallback
  pieces ``<0x00>``..``<0xFF>``.  Such a file is turned into a ``tokenizers`` BPE model the way
  transformers' ``LlamaConverter`` converts a sentencepiece model: every split of a vocab piece into
  two vocab pieces is a merge, ranked by the merged piece's score, so BPE reproduces llama2.c's
  "merge the adjacent pair with the best-scoring concatenation" loop, with byte fallback for
  characters outside the vocab and sentencepiece's "▁" prefix/space handling.

Both kinds are wrapped as ``transformers.PreTrainedTokenizerFast`` (available as
:attr:`Tokenizer.hf`).  Nothing here unpickles: ``tokenizer.json`` is JSON and ``tok*.bin`` is
parsed with ``struct``.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Without torch, `import transformers` prints "PyTorch was not found..."; tokenizers need no torch.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from tokenizers import Tokenizer as _RustTokenizer
from tokenizers import decoders, models, normalizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_HF_FILES = ("tokenizer.json", "tokenizer_config.json")
_LLAMA2C_GLOB = "tok*.bin"
_SPIECE_SPACE = "▁"
_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 of a llama2.c export
_N_BYTE_PIECES = 256  # ids 3..258
_FIRST_NORMAL_ID = len(_SPECIALS) + _N_BYTE_PIECES


@dataclass(frozen=True)
class Tokenizer:
  """A fast HF tokenizer with explicit control of BOS/EOS.

  ``encode`` never lets the tokenizer add special tokens itself and treats special-token strings
  inside the text (``"<s>"``, ...) as plain text, like sentencepiece and llama2.c do: BOS/EOS ids
  appear only where ``bos``/``eos`` ask for them.
  """

  hf: PreTrainedTokenizerFast

  @property
  def bos_id(self) -> int | None:
    """Id of the beginning-of-sequence token, ``None`` when the tokenizer has none."""
    return self.hf.bos_token_id

  @property
  def eos_id(self) -> int | None:
    """Id of the end-of-sequence token, ``None`` when the tokenizer has none."""
    return self.hf.eos_token_id

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included."""
    return len(self.hf)

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of ``text``, with BOS prepended / EOS appended when asked."""
    return self.encode_batch([text], bos=bos, eos=eos)[0]

  def encode_batch(
    self, texts: Sequence[str], *, bos: bool = True, eos: bool = False
  ) -> list[list[int]]:
    """Token ids of every text of ``texts`` (one batched call into the Rust tokenizer)."""
    prefix = [self._special_id("bos", self.bos_id)] if bos else []
    suffix = [self._special_id("eos", self.eos_id)] if eos else []
    if not texts:
      return []
    encoded = self.hf(list(texts), add_special_tokens=False, split_special_tokens=True)
    return [prefix + ids + suffix for ids in encoded["input_ids"]]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ``ids``; special tokens (BOS, EOS, ...) are dropped."""
    return self.hf.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

  def _special_id(self, name: str, token_id: int | None) -> int:
    if token_id is None:
      raise ValueError(
        f"tokenizer {self.hf.name_or_path!r} has no {name.upper()} token; pass {name}=False"
      )
    return token_id


def load_tokenizer(path: str | Path) -> Tokenizer:
  """Load the tokenizer at ``path``.

  ``path`` is an HF model directory (with ``tokenizer.json`` / ``tokenizer_config.json``), a
  llama2.c tokenizer file ``tok*.bin``, or a directory holding exactly one ``tok*.bin`` (a llama2.c
  model directory).  Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for anything
  else that is not one of these.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"tokenizer path {path} does not exist — check the path")
  if path.is_dir():
    if any((path / name).is_file() for name in _HF_FILES):
      return Tokenizer(_load_hf(path))
    candidates = sorted(p for p in path.glob(_LLAMA2C_GLOB) if p.is_file())
    if len(candidates) == 1:
      return Tokenizer(_load_llama2c(candidates[0]))
    if len(candidates) > 1:
      names = ", ".join(p.name for p in candidates)
      raise ValueError(f"{path} holds several llama2.c tokenizers ({names}) — keep one of them")
    raise ValueError(
      f"{path} holds no tokenizer — add {' or '.join(_HF_FILES)} (HF) or a llama2.c "
      f"{_LLAMA2C_GLOB} file"
    )
  if path.match(_LLAMA2C_GLOB):
    return Tokenizer(_load_llama2c(path))
  raise ValueError(
    f"{path} is not a tokenizer — pass an HF model directory or a llama2.c {_LLAMA2C_GLOB} file"
  )


def _load_hf(directory: Path) -> PreTrainedTokenizerFast:
  """``AutoTokenizer`` on a local directory: no hub, no remote code, fast tokenizers only."""
  hf = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
  if not isinstance(hf, PreTrainedTokenizerFast):
    raise ValueError(
      f"{directory}: transformers loaded a {type(hf).__name__}, not a fast tokenizer — add a "
      "tokenizer.json"
    )
  return hf


def _read_llama2c_pieces(path: Path) -> list[tuple[str, float]]:
  """``(piece, score)`` per token id of a llama2.c ``tokenizer.bin`` file, validated."""
  data = path.read_bytes()
  if len(data) < 4:
    raise ValueError(f"llama2.c tokenizer {path} is truncated: {len(data)} bytes, no header")
  (max_len,) = struct.unpack_from("<i", data, 0)
  if max_len <= 0:
    raise ValueError(f"llama2.c tokenizer {path}: bad header max_token_length={max_len}")
  pieces = []
  offset = 4
  while offset < len(data):
    token_id = len(pieces)
    if offset + 8 > len(data):
      raise ValueError(
        f"llama2.c tokenizer {path} is truncated inside the header of token {token_id}"
      )
    score, length = struct.unpack_from("<fi", data, offset)
    offset += 8
    if not 0 < length <= max_len:
      raise ValueError(
        f"llama2.c tokenizer {path}: token {token_id} has length {length}, expected 1..{max_len}"
      )
    if offset + length > len(data):
      raise ValueError(
        f"llama2.c tokenizer {path} is truncated inside the piece of token {token_id}"
      )
    try:
      piece = data[offset : offset + length].decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"llama2.c tokenizer {path}: token {token_id} is not UTF-8 ({e})") from None
    offset += length
    pieces.append((piece, score))
  _check_llama2c_layout(path, [p for p, _ in pieces])
  return pieces


def _check_llama2c_layout(path: Path, pieces: list[str]) -> None:
  """The id layout that llama2.c's ``run.c`` hard-codes: specials 0..2, byte pieces 3..258."""
  expected = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(_N_BYTE_PIECES)]
  if len(pieces) <= len(expected):
    raise ValueError(
      f"llama2.c tokenizer {path} has {len(pieces)} tokens, expected more than {len(expected)} "
      "(3 specials, 256 byte pieces, then the merged pieces): truncated?"
    )
  for token_id, (got, want) in enumerate(zip(pieces, expected)):
    if got != want:
      raise ValueError(f"llama2.c tokenizer {path}: token {token_id} is {got!r}, expected {want!r}")


def _bpe_merges(
  vocab: dict[str, int], scores: list[float], mergeable: range
) -> list[tuple[str, str]]:
  """sentencepiece-BPE merges: every split of a mergeable piece into two mergeable pieces.

  Ranked by the merged piece's score (best first), ties by the merged piece's id, then by the split
  position, as transformers' ``generate_merges`` does when given the scores.  Ranking by score is
  what makes BPE's lowest-rank-first merging equal llama2.c's best-score-first merge loop.
  """
  id_to_piece = {i: p for p, i in vocab.items()}
  ranked = []
  for merged_id in mergeable:
    merged = id_to_piece[merged_id]
    for cut in range(1, len(merged)):
      left, right = merged[:cut], merged[cut:]
      if vocab.get(left, -1) in mergeable and vocab.get(right, -1) in mergeable:
        ranked.append((-scores[merged_id], merged_id, cut, left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _load_llama2c(path: Path) -> PreTrainedTokenizerFast:
  """Build a byte-fallback BPE ``tokenizers`` model from a llama2.c ``tok*.bin`` file."""
  pieces = _read_llama2c_pieces(path)
  names = list(_SPECIALS) + [p.replace(" ", _SPIECE_SPACE) for p, _ in pieces[len(_SPECIALS) :]]
  vocab = {name: token_id for token_id, name in enumerate(names)}
  if len(vocab) != len(names):
    raise ValueError(f"llama2.c tokenizer {path} has duplicate pieces")
  normal_ids = range(_FIRST_NORMAL_ID, len(names))
  merges = _bpe_merges(vocab, [s for _, s in pieces], normal_ids)
  rust = _RustTokenizer(
    models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True, unk_token=_SPECIALS[0])
  )
  rust.normalizer = normalizers.Sequence(
    [normalizers.Prepend(_SPIECE_SPACE), normalizers.Replace(" ", _SPIECE_SPACE)]
  )
  rust.decoder = decoders.Sequence(
    [
      decoders.Replace(_SPIECE_SPACE, " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  return PreTrainedTokenizerFast(
    tokenizer_object=rust,
    unk_token=_SPECIALS[0],
    bos_token=_SPECIALS[1],
    eos_token=_SPECIALS[2],
    add_bos_token=True,
    add_eos_token=False,
    name_or_path=str(path),
  )
