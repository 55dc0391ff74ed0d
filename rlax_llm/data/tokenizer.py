"""A built-in character tokenizer for synthetic tasks (no downloads).

Every character of a fixed alphabet is one token. Three special tokens come
first, so ids are stable whatever the alphabet:

  ==========  ====  =============================================
  token       id    use
  ==========  ====  =============================================
  ``<pad>``   0     padding; never produced by ``encode``
  ``<eos>``   1     end of a completion (SFT targets end with it)
  ``<bos>``   2     available, unused by the built-in tasks
  chars       3...  ``alphabet[i]`` has id ``3 + i``
  ==========  ====  =============================================

Example::

  tok = CharTokenizer()
  ids_BL, mask_BL = tok.encode_batch(["37+5=", "3-17="])   # left padded
  tok.decode(tok.encode("42", add_eos=True))                 # -> "42"
"""

from __future__ import annotations

from collections.abc import Sequence
import string

import numpy as np

__all__ = ["CharTokenizer", "DEFAULT_ALPHABET", "PAD_ID", "EOS_ID", "BOS_ID"]

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>")
_NUM_SPECIAL = len(_SPECIAL_TOKENS)

# Digits, arithmetic symbols and space, lowercase letters, light punctuation.
DEFAULT_ALPHABET = string.digits + "+-*=() " + string.ascii_lowercase + ".,:?"


class CharTokenizer:
  """Maps each character of ``alphabet`` to one token id.

  Attributes:
    alphabet: The supported characters, in id order (``alphabet[i]`` has id
      ``3 + i``).
  """

  def __init__(self, alphabet: str = DEFAULT_ALPHABET):
    """Builds the vocabulary.

    Args:
      alphabet: Non-empty string of distinct characters to support.

    Raises:
      TypeError: If ``alphabet`` is not a string.
      ValueError: If ``alphabet`` is empty or repeats a character.
    """
    if not isinstance(alphabet, str):
      raise TypeError(
          f"CharTokenizer alphabet must be a str, got {type(alphabet).__name__}."
      )
    if not alphabet:
      raise ValueError(
          "CharTokenizer alphabet is empty; pass the characters your task "
          "uses, or leave it at DEFAULT_ALPHABET."
      )
    seen = set()
    for char in alphabet:
      if char in seen:
        raise ValueError(
            f"CharTokenizer alphabet repeats the character {char!r}; each "
            "character must appear once so that its id is unique."
        )
      seen.add(char)
    self.alphabet = alphabet
    self._char_to_id = {c: _NUM_SPECIAL + i for i, c in enumerate(alphabet)}
    self._id_to_str = list(_SPECIAL_TOKENS) + list(alphabet)

  def __repr__(self) -> str:
    return f"CharTokenizer(alphabet={self.alphabet!r})"

  @property
  def vocab_size(self) -> int:
    """Number of ids: the 3 special tokens plus one per character."""
    return len(self._id_to_str)

  @property
  def pad_id(self) -> int:
    """Id of the padding token (0)."""
    return PAD_ID

  @property
  def eos_id(self) -> int:
    """Id of the end-of-sequence token (1)."""
    return EOS_ID

  @property
  def bos_id(self) -> int:
    """Id of the beginning-of-sequence token (2)."""
    return BOS_ID

  def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
    """Encodes a string, one id per character.

    Args:
      text: String made of characters of ``alphabet``.
      add_eos: Whether to append ``eos_id``.

    Returns:
      The ids, of length ``len(text) + add_eos``.

    Raises:
      TypeError: If ``text`` is not a string.
      ValueError: If ``text`` holds a character outside ``alphabet``.
    """
    if not isinstance(text, str):
      raise TypeError(
          f"CharTokenizer.encode expects a str, got {type(text).__name__}."
      )
    char_to_id = self._char_to_id
    try:
      ids = [char_to_id[c] for c in text]
    except KeyError:
      pos = next(i for i, c in enumerate(text) if c not in char_to_id)
      raise ValueError(
          f"Character {text[pos]!r} at position {pos} of {_preview(text)} is "
          f"not in the tokenizer alphabet {self.alphabet!r}. Remove it from "
          "the text or build CharTokenizer(alphabet=...) with it included."
      ) from None
    if add_eos:
      ids.append(EOS_ID)
    return ids

  def save_pretrained(self, path: str) -> list[str]:
    """Writes this vocabulary as a Hugging Face fast tokenizer.

    `tokenizer.json` (a merge-free BPE over the characters, so each character
    is one token with this tokenizer's id; special tokens `<pad>`, `<eos>`,
    `<bos>` at ids 0-2), `tokenizer_config.json` and
    `generation_config.json`. `rlax_llm.models.hf_tokenizer.HFTokenizer` and
    transformers' `PreTrainedTokenizerFast` read them back with the same ids.
    Needs the `tokenizers` package (the `hf` extra).

    Returns:
      The file names written.
    """
    import json  # pylint: disable=g-import-not-at-top
    import os  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer, decoders, models  # pylint: disable=g-import-not-at-top
    from tokenizers import AddedToken  # pylint: disable=g-import-not-at-top
    vocab = {t: i for i, t in enumerate(self._id_to_str)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in _SPECIAL_TOKENS])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast",
              "pad_token": "<pad>", "eos_token": "<eos>",
              "bos_token": "<bos>", "model_max_length": 1 << 20,
              "clean_up_tokenization_spaces": False,
              "rlax_llm_alphabet": self.alphabet}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
      json.dump({"eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
                 "bos_token_id": BOS_ID}, f, indent=2)
    return ["tokenizer.json", "tokenizer_config.json",
            "generation_config.json"]

  def decode(
      self,
      ids: Sequence[int] | np.ndarray,
      *,
      stop_at_eos: bool = True,
      skip_special: bool = True,
  ) -> str:
    """Decodes ids back to a string.

    Args:
      ids: 1-D sequence or integer array of token ids.
      stop_at_eos: Whether to drop the first ``eos_id`` and everything after.
      skip_special: Whether to drop special tokens; if False they are written
        as ``<pad>``, ``<eos>`` and ``<bos>``.

    Returns:
      The decoded string.

    Raises:
      ValueError: If ``ids`` is not 1-D, not integer, or holds an id outside
        ``[0, vocab_size)``.
    """
    ids_list = self._as_id_list(ids)
    if stop_at_eos and EOS_ID in ids_list:
      ids_list = ids_list[: ids_list.index(EOS_ID)]
    table = self._id_to_str
    if skip_special:
      return "".join(table[i] for i in ids_list if i >= _NUM_SPECIAL)
    return "".join(table[i] for i in ids_list)

  def encode_batch(
      self,
      texts: Sequence[str],
      *,
      max_length: int | None = None,
      pad_side: str = "left",
      add_eos: bool = False,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and pads a batch of strings.

    Prompts are usually left padded (``pad_side="left"``) so that generation
    continues from the last column of every row.

    Args:
      texts: B strings.
      max_length: Length L of the padded rows; defaults to the longest encoded
        text (EOS included).
      pad_side: ``"left"`` or ``"right"``: where the ``pad_id`` columns go.
      add_eos: Whether to append ``eos_id`` to every text.

    Returns:
      ``(ids_BL, mask_BL)``: int32 ids padded with ``pad_id`` and a bool mask,
      True on real tokens.

    Raises:
      TypeError: If ``texts`` is a single string rather than a sequence.
      ValueError: On a bad ``pad_side`` or ``max_length``, a text longer than
        ``max_length``, or a character outside the alphabet.
    """
    if isinstance(texts, str):
      raise TypeError(
          "CharTokenizer.encode_batch expects a sequence of strings, got a "
          "single str; wrap it in a list: encode_batch([text])."
      )
    if pad_side not in ("left", "right"):
      raise ValueError(
          f"pad_side must be 'left' or 'right', got {pad_side!r}."
      )
    if max_length is not None and (
        isinstance(max_length, bool)
        or not isinstance(max_length, (int, np.integer))
        or max_length < 0
    ):
      raise ValueError(
          f"max_length must be a non-negative int or None, got {max_length!r}."
      )
    encoded = [self.encode(t, add_eos=add_eos) for t in texts]
    longest = max((len(e) for e in encoded), default=0)
    length = longest if max_length is None else int(max_length)
    for i, e in enumerate(encoded):
      if len(e) > length:
        raise ValueError(
            f"Text {i} ({_preview(texts[i])}) encodes to {len(e)} tokens"
            f"{' (EOS included)' if add_eos else ''}, more than max_length="
            f"{length}. Raise max_length (e.g. to the task's "
            "max_prompt_length) or shorten the prompt."
        )
    ids_BL = np.full((len(encoded), length), PAD_ID, dtype=np.int32)
    mask_BL = np.zeros((len(encoded), length), dtype=bool)
    for i, e in enumerate(encoded):
      if not e:
        continue
      cols = slice(length - len(e), length) if pad_side == "left" else slice(
          0, len(e))
      ids_BL[i, cols] = e
      mask_BL[i, cols] = True
    return ids_BL, mask_BL

  def decode_batch(
      self,
      ids_BL: np.ndarray | Sequence[Sequence[int]],
      mask_BL: np.ndarray | None = None,
      **kwargs,
  ) -> list[str]:
    """Decodes each row of a batch.

    Args:
      ids_BL: [B, L] integer ids (array or list of rows).
      mask_BL: Optional [B, L] bool mask; positions where it is False are
        dropped before decoding.
      **kwargs: ``stop_at_eos`` and ``skip_special``, as in ``decode``.

    Returns:
      B strings.

    Raises:
      ValueError: If ``mask_BL`` does not match the shape of ``ids_BL``, or
        on bad ids (see ``decode``).
    """
    if mask_BL is None:
      return [self.decode(row, **kwargs) for row in ids_BL]
    ids_arr = np.asarray(ids_BL)
    mask_arr = np.asarray(mask_BL)
    if ids_arr.ndim != 2 or mask_arr.shape != ids_arr.shape:
      raise ValueError(
          f"decode_batch needs 2-D ids_BL and a mask_BL of the same shape, "
          f"got ids {ids_arr.shape} and mask {mask_arr.shape}."
      )
    mask_arr = mask_arr.astype(bool)
    return [
        self.decode(row[keep], **kwargs) for row, keep in zip(ids_arr, mask_arr)
    ]

  def _as_id_list(self, ids) -> list[int]:
    """Validates ``ids`` and returns them as a list of Python ints."""
    arr = np.asarray(ids)
    if arr.size == 0:
      return []
    if arr.ndim != 1:
      raise ValueError(
          f"decode expects a 1-D sequence of ids, got shape {arr.shape}; use "
          "decode_batch for a [B, L] batch."
      )
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(
          f"decode expects integer token ids, got dtype {arr.dtype}."
      )
    ids_list = arr.astype(np.int64).tolist()
    bad = [(i, v) for i, v in enumerate(ids_list)
           if v < 0 or v >= self.vocab_size]
    if bad:
      pos, value = bad[0]
      raise ValueError(
          f"Token id {value} at position {pos} is outside the vocabulary "
          f"[0, {self.vocab_size}) of this CharTokenizer; check that the ids "
          "come from a model whose vocab_size matches the tokenizer."
      )
    return ids_list


def _preview(text: str, limit: int = 40) -> str:
  """Returns a short repr of ``text`` for error messages."""
  if len(text) <= limit:
    return repr(text)
  return repr(text[:limit]) + f"... (length {len(text)})"
