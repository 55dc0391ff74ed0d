"""Hugging Face tokenizers and chat templates, with `CharTokenizer`'s interface.

`HFTokenizer.from_pretrained(path)` reads a local directory:

  ========================  ==================================================
  tokenizer.json            the fast tokenizer (through the `tokenizers` library)
  tokenizer_config.json     optional: `chat_template`, special tokens
                            (`eos_token`, `pad_token`, `bos_token`, ...)
  generation_config.json    optional: `eos_token_id` (int or list) and
                            `pad_token_id`, which take precedence
  chat_template.jinja       optional: the chat template as its own file
  ========================  ==================================================

Chat templates render with jinja2 the way transformers renders them: a
sandboxed environment with `trim_blocks` and `lstrip_blocks`, the loop-control
extension, a `tojson` filter that leaves non-ASCII and HTML characters as they
are, and the globals `raise_exception`, `strftime_now`; the special tokens
(`bos_token`, `eos_token`, ...) are template variables.

Example::

  tok = HFTokenizer.from_pretrained("/ckpt/Qwen2.5-0.5B-Instruct")
  text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}])
  ids_BL, mask_BL = tok.encode_batch([text], pad_side="left")
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import datetime
import json
import os
from typing import Any

import numpy as np

__all__ = ["HFTokenizer", "render_chat_template"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token",
                 "pad_token", "cls_token", "mask_token")


def _token_content(value) -> str | None:
  """A special token entry of tokenizer_config.json as a string."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, Mapping) and "content" in value:
    return value["content"]
  return None


def _compile_template(template: str):
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext as jinja_ext  # pylint: disable=g-import-not-at-top
  from jinja2 import sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class GenerationTag(jinja_ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` and renders its body."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_render"), [], [],
                                    body).set_lineno(lineno)

    def _render(self, caller):
      return caller()

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[GenerationTag, jinja_ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(template)


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]],
                         *, add_generation_prompt: bool = True,
                         **variables) -> str:
  """Renders a chat template for one conversation.

  Args:
    template: the jinja2 source (`tokenizer_config.json`'s `chat_template`).
    messages: dicts with at least "role" and "content".
    add_generation_prompt: append the header that opens the assistant's turn.
    **variables: further template variables (`bos_token`, `tools`, ...).

  Returns:
    The rendered text.

  Raises:
    TypeError: when a message is not a dict.
    jinja2.TemplateError: when the template raises (e.g. a role it rejects).
  """
  for m in messages:
    if not isinstance(m, Mapping):
      raise TypeError(f"Chat messages must be dicts with 'role' and "
                      f"'content', got {m!r}.")
  variables.setdefault("tools", None)
  variables.setdefault("documents", None)
  return _compile_template(template).render(
      messages=[dict(m) for m in messages],
      add_generation_prompt=add_generation_prompt, **variables)


class HFTokenizer:
  """A `tokenizers` tokenizer with ids, padding and chat templates.

  Attributes:
    tokenizer: the underlying `tokenizers.Tokenizer`.
    chat_template: the jinja2 chat template, or None.
    special_tokens: template variables such as "eos_token" -> its text.
  """

  def __init__(self, tokenizer, *, eos_id: int, pad_id: int,
               bos_id: int | None = None, chat_template: str | None = None,
               special_tokens: Mapping[str, str] | None = None,
               stop_ids: Sequence[int] = ()):
    """Wraps a `tokenizers.Tokenizer`.

    Args:
      tokenizer: the `tokenizers.Tokenizer`.
      eos_id: id that ends a completion.
      pad_id: id used for padding (masked out; may equal `eos_id`).
      bos_id: optional beginning-of-sequence id.
      chat_template: jinja2 chat template source.
      special_tokens: template variables naming special tokens.
      stop_ids: further ids that also end a completion in `decode`.
    """
    self.tokenizer = tokenizer
    self._eos_id = int(eos_id)
    self._pad_id = int(pad_id)
    self._bos_id = None if bos_id is None else int(bos_id)
    self.chat_template = chat_template
    self.special_tokens = dict(special_tokens or {})
    self.stop_ids = tuple(dict.fromkeys([self._eos_id, *map(int, stop_ids)]))

  @classmethod
  def from_pretrained(cls, path) -> "HFTokenizer":
    """Reads `tokenizer.json` and the optional config files of `path`.

    Raises:
      FileNotFoundError: when `path` or its `tokenizer.json` is missing.
      ValueError: when no EOS token can be determined, or a named special
        token is not in the vocabulary.
    """
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isdir(path):
      raise FileNotFoundError(f"Tokenizer directory {path!r} does not exist.")
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f"{path!r} has no tokenizer.json; only fast (tokenizers-library) "
          "tokenizers are read. Save one with transformers' "
          "PreTrainedTokenizerFast.save_pretrained.")
    tok = tokenizers.Tokenizer.from_file(file)
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))
    special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
    special = {}
    for key in _SPECIAL_KEYS:
      value = _token_content(config.get(key))
      if value is None:
        value = _token_content(special_map.get(key))
      if value is not None:
        special[key] = value
    template = config.get("chat_template")
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.isfile(jinja_file):
      with open(jinja_file) as f:
        template = f.read()
    if isinstance(template, list):  # named templates: use "default"
      named = {t["name"]: t["template"] for t in template}
      template = named.get("default", next(iter(named.values()), None))

    def token_id(key):
      if key not in special:
        return None
      idx = tok.token_to_id(special[key])
      if idx is None:
        raise ValueError(f"{key}={special[key]!r} from the tokenizer config "
                         f"is not in the vocabulary of {file}.")
      return idx

    eos = gen.get("eos_token_id")
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not eos_ids and token_id("eos_token") is not None:
      eos_ids = [token_id("eos_token")]
    if not eos_ids:
      raise ValueError(
          f"No EOS token for {path!r}: set eos_token_id in "
          "generation_config.json or eos_token in tokenizer_config.json.")
    pad = gen.get("pad_token_id")
    if pad is None:
      pad = token_id("pad_token")
    if pad is None:
      pad = eos_ids[0]
    bos = gen.get("bos_token_id")
    if bos is None:
      bos = token_id("bos_token")
    return cls(tok, eos_id=eos_ids[0], pad_id=pad, bos_id=bos,
               chat_template=template, special_tokens=special,
               stop_ids=eos_ids[1:])

  def __repr__(self) -> str:
    return (f"HFTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"pad_id={self.pad_id})")

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def bos_id(self) -> int | None:
    return self._bos_id

  def encode(self, text: str, *, add_eos: bool = False,
             add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`.

    Args:
      text: the string (chat-template output included: special tokens in it
        map to their ids).
      add_eos: append `eos_id`.
      add_special_tokens: apply the tokenizer's post-processor (e.g. a BOS
        prefix); off by default, as for rendered chat templates.
    """
    if not isinstance(text, str):
      raise TypeError(f"HFTokenizer.encode expects a str, got "
                      f"{type(text).__name__}.")
    ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    return ids + [self.eos_id] if add_eos else ids

  def decode(self, ids, *, stop_at_eos: bool = True,
             skip_special: bool = True) -> str:
    """Text of 1-D `ids`, cut at the first stop id when `stop_at_eos`."""
    arr = np.asarray(ids)
    if arr.ndim > 1:
      raise ValueError(f"decode expects a 1-D sequence of ids, got shape "
                       f"{arr.shape}; use decode_batch for a [B, L] batch.")
    ids_list = arr.astype(np.int64).reshape(-1).tolist()
    if stop_at_eos:
      for i, t in enumerate(ids_list):
        if t in self.stop_ids:
          ids_list = ids_list[:i]
          break
    bad = [t for t in ids_list if not 0 <= t < self.vocab_size]
    if bad:
      raise ValueError(f"Token id {bad[0]} is outside the vocabulary [0, "
                       f"{self.vocab_size}); the model's vocab_size may "
                       "exceed the tokenizer's (padded embedding rows).")
    return self.tokenizer.decode(ids_list, skip_special_tokens=skip_special)

  def encode_batch(self, texts: Sequence[str], *,
                   max_length: int | None = None, pad_side: str = "left",
                   add_eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and pads B texts into (ids_BL int32, mask_BL bool).

    Args:
      texts: B strings.
      max_length: L; defaults to the longest encoding.
      pad_side: "left" (prompts) or "right".
      add_eos: append `eos_id` to each text.

    Raises:
      ValueError: bad `pad_side`, or a text longer than `max_length`.
    """
    if isinstance(texts, str):
      raise TypeError("encode_batch expects a sequence of strings, got a "
                      "single str; wrap it in a list: encode_batch([text]).")
    if pad_side not in ("left", "right"):
      raise ValueError(f"pad_side must be 'left' or 'right', got "
                       f"{pad_side!r}.")
    encoded = [e.ids for e in self.tokenizer.encode_batch(
        list(texts), add_special_tokens=False)]
    if add_eos:
      encoded = [e + [self.eos_id] for e in encoded]
    longest = max((len(e) for e in encoded), default=0)
    length = longest if max_length is None else int(max_length)
    for i, e in enumerate(encoded):
      if len(e) > length:
        raise ValueError(
            f"Text {i} ({texts[i][:40]!r}) encodes to {len(e)} tokens, more "
            f"than max_length={length}. Raise max_length or shorten the text.")
    ids = np.full((len(encoded), length), self.pad_id, np.int32)
    mask = np.zeros((len(encoded), length), bool)
    for i, e in enumerate(encoded):
      if e:
        cols = (slice(length - len(e), length) if pad_side == "left"
                else slice(0, len(e)))
        ids[i, cols] = e
        mask[i, cols] = True
    return ids, mask

  def decode_batch(self, ids_BL, mask_BL=None, **kwargs) -> list[str]:
    """Decodes each row, dropping positions where `mask_BL` is False."""
    ids = np.asarray(ids_BL)
    if mask_BL is None:
      return [self.decode(row, **kwargs) for row in ids]
    mask = np.asarray(mask_BL).astype(bool)
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"decode_batch needs 2-D ids_BL and a mask_BL of the "
                       f"same shape, got {ids.shape} and {mask.shape}.")
    return [self.decode(r[m], **kwargs) for r, m in zip(ids, mask)]

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                          add_generation_prompt: bool = True,
                          **variables) -> str:
    """Renders `messages` with the chat template (returns text).

    Raises:
      ValueError: when the tokenizer has no chat template.
    """
    if self.chat_template is None:
      raise ValueError("This tokenizer has no chat template: add "
                       "'chat_template' to tokenizer_config.json (or a "
                       "chat_template.jinja file), or format prompts as plain "
                       "text.")
    return render_chat_template(self.chat_template, messages,
                                add_generation_prompt=add_generation_prompt,
                                **{**self.special_tokens, **variables})


def _read_json(file: str) -> dict[str, Any]:
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from e
