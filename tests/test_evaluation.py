"""Evaluation statistics: unbiased pass@k and majority voting."""

import math

import numpy as np

from rlax_llm.training.evaluation import _majority_correct, pass_at_k


def test_pass_at_k_matches_the_combinatorial_formula():
  for n in (1, 4, 9):
    for c in range(n + 1):
      for k in range(1, n + 1):
        want = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        np.testing.assert_allclose(pass_at_k(np.array([c]), n, k)[0], want,
                                   atol=1e-12)
  np.testing.assert_allclose(pass_at_k(np.array([1, 0, 4]), 4, 2),
                             [0.5, 0.0, 1.0])


def test_majority_vote_uses_the_most_frequent_answer():
  texts = ["1", " 2", "1 ", "3",   # "1" twice: wrong
           "2", "1", "5", "6"]     # all once: the first ("2") wins the tie
  rewards = np.array([[0, 1, 0, 0], [1, 0, 0, 0]], np.float32)
  np.testing.assert_array_equal(_majority_correct(texts, rewards, 4), [0, 1])
