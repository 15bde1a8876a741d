"""Tiny text corpora: verse lines, labelled sentences, and the vocabulary that covers both."""

from __future__ import annotations

import numpy as np

# Hamlet III.1 without punctuation, so that every word is in the word tokenizer's vocabulary.
VERSE = ["To be or not to be that is the question", "Whether tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune", "Or to take arms against a sea of troubles"]
WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "over", "under", "mat", "hill", "tree", "and", "then"]
MOODS = ("bad awful dull poor", "good great lovely fine")  # label 0, label 1
VOCABULARY = sorted({w for line in VERSE for w in line.split()} | set(WORDS)
                    | {w for mood in MOODS for w in mood.split()})


def sentences(count: int, seed: int) -> list[tuple[str, int]]:
  """``(text, label)``: random words with one mood word that decides the label."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    label = int(rng.integers(2))
    words = list(rng.choice(WORDS, size=int(rng.integers(4, 9))))
    words.insert(int(rng.integers(len(words) + 1)), rng.choice(MOODS[label].split()))
    out.append((" ".join(words), label))
  return out
