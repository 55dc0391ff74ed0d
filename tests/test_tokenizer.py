"""Tests for rlax_llm.data.tokenizer."""

from hypothesis import given
from hypothesis import strategies as st
import numpy as np
import pytest

from rlax_llm.data.tokenizer import CharTokenizer
from rlax_llm.data.tokenizer import DEFAULT_ALPHABET

TOK = CharTokenizer()
_texts = st.text(alphabet=DEFAULT_ALPHABET, max_size=30)


def test_special_ids_and_vocab_size():
  assert (TOK.pad_id, TOK.eos_id, TOK.bos_id) == (0, 1, 2)
  assert TOK.vocab_size == 3 + len(DEFAULT_ALPHABET) == 50
  for char in "0123456789+-*=() abcdefghijklmnopqrstuvwxyz.,:?":
    assert char in DEFAULT_ALPHABET


def test_encode_hand_case():
  # Digits come first at ids 3..12, then "+-*=() ".
  assert TOK.encode("0") == [3]
  assert TOK.encode("9") == [12]
  assert TOK.encode("37+5=") == [6, 10, 13, 8, 16]
  assert TOK.encode("37+5=", add_eos=True) == [6, 10, 13, 8, 16, 1]
  assert TOK.encode("") == []
  assert TOK.encode("", add_eos=True) == [1]


@given(_texts)
def test_round_trip(text):
  ids = TOK.encode(text)
  assert len(ids) == len(text)
  assert all(3 <= i < TOK.vocab_size for i in ids)
  assert TOK.decode(ids) == text
  assert TOK.decode(np.asarray(ids, dtype=np.int32)) == text
  assert TOK.decode(TOK.encode(text, add_eos=True)) == text


def test_decode_stops_at_eos_and_skips_special():
  ids = [2, 6, 10, 1, 7, 0]  # <bos> 3 7 <eos> 4 <pad>
  assert TOK.decode(ids) == "37"
  assert TOK.decode(ids, stop_at_eos=False) == "374"
  assert TOK.decode(ids, skip_special=False) == "<bos>37"
  assert (TOK.decode(ids, stop_at_eos=False, skip_special=False)
          == "<bos>37<eos>4<pad>")
  assert TOK.decode(np.array([0, 0, 6], dtype=np.int64)) == "3"
  assert TOK.decode([]) == ""


def test_unknown_character_error_names_char_and_position():
  with pytest.raises(ValueError, match=r"'%' at position 2") as err:
    TOK.encode("12%3")
  assert "alphabet" in str(err.value)
  with pytest.raises(ValueError, match=r"'A' at position 0"):
    TOK.encode("Abc")
  with pytest.raises(TypeError, match="expects a str"):
    TOK.encode(42)


@pytest.mark.parametrize("bad", [[50], [-1], [3, 999]])
def test_decode_rejects_ids_outside_vocab(bad):
  with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
    TOK.decode(bad)


def test_decode_rejects_wrong_shape_and_dtype():
  with pytest.raises(ValueError, match="decode_batch"):
    TOK.decode(np.zeros((2, 3), dtype=np.int32))
  with pytest.raises(ValueError, match="integer"):
    TOK.decode(np.array([3.0, 4.0]))


def test_encode_batch_left_and_right_padding():
  ids, mask = TOK.encode_batch(["37+5=", "8"])
  np.testing.assert_array_equal(
      ids, [[6, 10, 13, 8, 16], [0, 0, 0, 0, 11]])
  np.testing.assert_array_equal(
      mask, [[1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
  assert ids.dtype == np.int32 and mask.dtype == bool

  ids, mask = TOK.encode_batch(["37", "8"], pad_side="right", add_eos=True,
                               max_length=4)
  np.testing.assert_array_equal(ids, [[6, 10, 1, 0], [11, 1, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])


def test_encode_batch_empty_inputs():
  ids, mask = TOK.encode_batch([])
  assert ids.shape == (0, 0) and mask.shape == (0, 0)
  ids, mask = TOK.encode_batch(["", "1"], max_length=3)
  np.testing.assert_array_equal(ids, [[0, 0, 0], [0, 0, 4]])
  np.testing.assert_array_equal(mask, [[0, 0, 0], [0, 0, 1]])


def test_encode_batch_too_long_error_names_text_and_limit():
  with pytest.raises(ValueError) as err:
    TOK.encode_batch(["1+1=", "12345+6=", "2"], max_length=5)
  message = str(err.value)
  assert "Text 1" in message
  assert "8 tokens" in message
  assert "max_length=5" in message
  assert "Raise max_length" in message and "shorten the prompt" in message


def test_encode_batch_argument_errors():
  with pytest.raises(ValueError, match="pad_side"):
    TOK.encode_batch(["1"], pad_side="middle")
  with pytest.raises(TypeError, match="wrap it in a list"):
    TOK.encode_batch("1+1=")
  with pytest.raises(ValueError, match="max_length"):
    TOK.encode_batch(["1"], max_length=-1)


@given(st.lists(_texts, min_size=1, max_size=6),
       st.sampled_from(["left", "right"]), st.booleans())
def test_batch_round_trip(texts, pad_side, add_eos):
  ids, mask = TOK.encode_batch(texts, pad_side=pad_side, add_eos=add_eos)
  lengths = [len(t) + add_eos for t in texts]
  assert ids.shape == (len(texts), max(lengths))
  np.testing.assert_array_equal(mask.sum(axis=1), lengths)
  np.testing.assert_array_equal(ids[~mask], 0)
  assert TOK.decode_batch(ids) == texts
  assert TOK.decode_batch(ids, mask) == texts
  assert TOK.decode_batch(ids.tolist()) == texts


def test_decode_batch_mask_drops_positions():
  ids = np.array([[6, 10, 11], [4, 5, 1]])
  mask = np.array([[1, 0, 1], [1, 1, 1]], dtype=bool)
  assert TOK.decode_batch(ids, mask) == ["38", "12"]
  assert TOK.decode_batch(ids, mask, stop_at_eos=False,
                          skip_special=False) == ["38", "12<eos>"]
  with pytest.raises(ValueError, match="same shape"):
    TOK.decode_batch(ids, mask[:, :2])


def test_custom_alphabet():
  tok = CharTokenizer("ab")
  assert tok.vocab_size == 5
  assert tok.encode("ba", add_eos=True) == [4, 3, 1]
  with pytest.raises(ValueError, match="repeats the character 'a'"):
    CharTokenizer("aba")
  with pytest.raises(ValueError, match="empty"):
    CharTokenizer("")
