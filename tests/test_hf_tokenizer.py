"""HFTokenizer against transformers' PreTrainedTokenizerFast on the same files."""

import json

import jinja2
import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from rlax_llm.models.hf_tokenizer import HFTokenizer  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]

TEMPLATE = (
    "{%- set ns = namespace(system=false) -%}\n"
    "{%- for message in messages %}\n"
    "  {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "    {{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "  {%- endif %}\n"
    "  {%- if message['role'] == 'system' %}{% set ns.system = true %}"
    "{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message.meta is defined %}{{ message.meta | tojson }}\n{% endif %}"
    "{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}\n"
    "<|im_start|>assistant\n"
    "{% endif %}\n"
    "{% if not ns.system and messages | length > 3 %}{{ eos_token }}"
    "{% endif %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 30? The answer is 42.",
    "Déjà vu: naïve café owners count 7 × 6 = 42 apples.",
    "A group of samples per prompt shares one prefill.",
    "Reinforcement learning with verifiable rewards.",
] * 3

TEXTS = ["the answer is 42", "café prompt", "", "What is 7 × 6?",
         "<|im_start|>user\nhi<|im_end|>"]


def _write(path, *, generation_config=None, pad_token="<pad>"):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
      add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=SPECIALS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.save(str(path / "tokenizer.json"))
  config = dict(chat_template=TEMPLATE, eos_token="<|im_end|>",
                bos_token=None, tokenizer_class="PreTrainedTokenizerFast")
  if pad_token:
    config["pad_token"] = pad_token
  (path / "tokenizer_config.json").write_text(json.dumps(config))
  if generation_config is not None:
    (path / "generation_config.json").write_text(json.dumps(generation_config))
  return tok


@pytest.fixture
def files(tmp_path):
  raw = _write(tmp_path)
  ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  return tmp_path, raw, ref


def test_encode_decode_match_transformers(files):
  path, raw, ref = files
  tok = HFTokenizer.from_pretrained(path)
  assert tok.vocab_size == len(ref) == raw.get_vocab_size()
  assert tok.eos_id == ref.convert_tokens_to_ids("<|im_end|>") == 2
  assert tok.pad_id == ref.pad_token_id == 3
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.encode(text, add_eos=True) == ids + [2]
  ids = tok.encode("café prompt")
  assert len(ids) > 2 and tok.decode(ids) == "café prompt"


def test_encode_batch_pads_like_transformers(files):
  path, _, ref = files
  tok = HFTokenizer.from_pretrained(path)
  for side in ("left", "right"):
    ids, mask = tok.encode_batch(TEXTS, pad_side=side)
    ref.padding_side = side
    want = ref(TEXTS, padding=True, add_special_tokens=False,
               return_tensors="np")
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"].astype(bool))
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert tok.decode_batch(ids, mask) == [
        ref.decode(r, skip_special_tokens=True) for r in
        [tok.encode(t) for t in TEXTS]]
  ids, mask = tok.encode_batch(["the answer"], max_length=8, add_eos=True,
                               pad_side="right")
  n = mask.sum()
  assert ids[0, n - 1] == tok.eos_id and (ids[0, n:] == tok.pad_id).all()
  with pytest.raises(ValueError, match="max_length=2"):
    tok.encode_batch(["the quick brown fox"], max_length=2)


def test_decode_cuts_at_eos(files):
  tok = HFTokenizer.from_pretrained(files[0])
  ids = tok.encode("the answer is 42") + [tok.eos_id] + tok.encode("junk")
  assert tok.decode(ids) == "the answer is 42"
  assert tok.decode(ids, stop_at_eos=False) == "the answer is 42junk"
  assert tok.decode_batch(np.asarray([ids]))[0] == "the answer is 42"


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(files, add_generation_prompt):
  path, _, ref = files
  tok = HFTokenizer.from_pretrained(path)
  conversations = [
      [{"role": "user", "content": "  What is 7 × 6?  "}],
      [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "hi", "meta": {"lang": "français",
                                                   "tag": "<b>"}},
       {"role": "assistant", "content": "42"},
       {"role": "user", "content": "again"}],
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
       {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
  ]
  for messages in conversations:
    text = tok.apply_chat_template(messages,
                                   add_generation_prompt=add_generation_prompt)
    want = ref.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    assert text == want
    assert tok.encode(text) == ref.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt,
        return_dict=False)
  text = tok.apply_chat_template(conversations[1])
  assert '{"lang": "français", "tag": "<b>"}' in text  # tojson, no escaping
  assert text.endswith("<|im_start|>assistant\n") and "<|im_end|>" not in (
      text[-30:].split("assistant")[-1])
  assert tok.apply_chat_template(conversations[2]).endswith("<|im_end|>")


def test_template_errors(files):
  tok = HFTokenizer.from_pretrained(files[0])
  with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
    tok.apply_chat_template([{"role": "robot", "content": "x"}])
  tok.chat_template = None
  with pytest.raises(ValueError, match="no chat template"):
    tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_generation_config_ids_take_precedence(tmp_path):
  _write(tmp_path, generation_config=dict(eos_token_id=[0, 2],
                                          pad_token_id=1), pad_token=None)
  tok = HFTokenizer.from_pretrained(tmp_path)
  assert (tok.eos_id, tok.pad_id, tok.stop_ids) == (0, 1, (0, 2))
  ids = tok.encode("the answer") + [2] + tok.encode("junk")
  assert tok.decode(ids) == "the answer"  # every EOS id stops decoding


def test_pad_falls_back_to_eos(tmp_path):
  _write(tmp_path, pad_token=None)
  tok = HFTokenizer.from_pretrained(tmp_path)
  assert tok.pad_id == tok.eos_id == 2


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    HFTokenizer.from_pretrained(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    HFTokenizer.from_pretrained(tmp_path)
  _write(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      dict(eos_token="<|not_there|>")))
  with pytest.raises(ValueError, match="not_there.*not in the vocabulary"):
    HFTokenizer.from_pretrained(tmp_path)
