"""Real English sentences shipped with Python, labelled by where they come from.

:func:`pydoc_sentences` splits Python's own help texts (``pydoc_data.topics.topics``,
the text ``help("if")`` shows; 2,027 sentences in Python 3.11.7) into
sentences and labels each by its **help topic**. Help topics nest (``compound``
holds the texts of ``if``, ``for``, ``while``...; ``specialnames`` those of
``customization``, ``attribute-access``...), so a sentence found in several topics
gets the *largest* of them (by text length; ties by name): its chapter-like topic.
The ``n_classes - 1`` topics with the most sentences are the classes, every other
topic is ``"other"``. The label is a fact about the text (where Python ships it),
not a word it contains: no single token decides it, and there is no token-level
ground truth.

How the text becomes sentences (every rule is here, none is hand-tuned per topic):

* paragraphs are runs of lines separated by blank lines; a paragraph is prose when
  all its lines after the first share one indentation, no shallower than the first
  line's (indented code, grammar rules and tables mix indentations and are dropped), it holds no heading
  underline (``****``, ``====``), no grammar (``::=``), and does not start with
  ``>>>`` or ``...`` (doctest);
* a paragraph's lines are joined with spaces and cut after ``.``, ``!`` or ``?``
  followed by whitespace and a capital letter (or a quote or parenthesis before one);
* a sentence is kept when it has ``min_words``..``max_words`` words, starts with a
  capital letter, a quote or a parenthesis, ends with ``.``, ``!`` or ``?``, and at
  least 60% of its words are plain words (letters, optionally quoted or followed by
  punctuation), which drops code-like lines;
* each distinct sentence is kept once (:func:`sentence_topics` lists every topic
  holding it).

:func:`paragraph_split` keeps every paragraph on one side of the train/test split
(neighbouring sentences share words); :func:`encode` turns sentences into WordPiece
ids with a Hugging Face ``tokenizers`` file (``tokenizer.json``).
"""
from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Sentences", "prose_paragraphs", "split_sentences", "is_sentence", "sentence_topics",
           "pydoc_sentences", "paragraph_split", "encode", "OTHER"]

OTHER = "other"
_CUT = re.compile(r'(?<=[.!?])\s+(?=["(\u201c]?[A-Z])')
_PLAIN = re.compile(r"[\"(\u201c]*[A-Za-z][A-Za-z'\u2019-]*[\")\u201d,;:.!?]*")
_RULE = set("*=-+|~^")


@dataclass
class Sentences:
    """Labelled sentences: ``text[i]`` with class ``label[i]`` (an index into
    ``classes``), its ``topic`` (the help topic it is labelled by) and ``group`` (its
    paragraph: sentences of one paragraph stay on one side of a split)."""

    text: list[str]
    label: np.ndarray              # int64 [N]
    topic: list[str]
    group: np.ndarray              # int64 [N]
    classes: list[str]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.text)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "Sentences":
        idx = np.asarray(idx, dtype=np.int64)
        return Sentences([self.text[i] for i in idx], self.label[idx], [self.topic[i] for i in idx],
                         self.group[idx], self.classes, self.meta)


# --------------------------------------------------------------------------- text -> sentences
def prose_paragraphs(text: str) -> Iterator[str]:
    """The prose paragraphs of a help text (module docstring), each joined into one line."""
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines:
            continue
        indent = [len(line) - len(line.lstrip()) for line in lines]
        if len(set(indent[1:])) > 1 or (len(indent) > 1 and indent[1] < indent[0]):
            continue                                   # code, grammar or a table inside
        if any(set(line.strip()) <= _RULE for line in lines):
            continue                                   # a heading and its underline
        joined = " ".join(line.strip() for line in lines)
        if "::=" in joined or joined.startswith((">>>", "...")):
            continue
        yield joined


def split_sentences(paragraph: str) -> list[str]:
    """Cut a paragraph after ``.``/``!``/``?`` + whitespace + a capital (maybe quoted)."""
    return [s for s in _CUT.split(paragraph) if s]


def is_sentence(s: str, *, min_words: int = 5, max_words: int = 60) -> bool:
    """The rules of the module docstring for keeping one sentence."""
    words = s.split()
    if not min_words <= len(words) <= max_words or s[-1] not in ".!?":
        return False
    if not (s[0].isupper() or s[0] in "\"(\u201c"):
        return False
    return sum(bool(_PLAIN.fullmatch(w)) for w in words) >= 0.6 * len(words)


def sentence_topics(topics: dict[str, str], *, min_words: int = 5,
                    max_words: int = 60) -> dict[str, tuple[set[str], int]]:
    """Every distinct kept sentence -> (the topics holding it, its paragraph number).
    Topics are read in name order; a sentence's paragraph is the first one it is seen in."""
    out: dict[str, tuple[set[str], int]] = {}
    paragraph = 0
    for name in sorted(topics):
        for par in prose_paragraphs(topics[name]):
            for s in split_sentences(par):
                if is_sentence(s, min_words=min_words, max_words=max_words):
                    out.setdefault(s, (set(), paragraph))[0].add(name)
            paragraph += 1
    return out


def pydoc_sentences(*, n_classes: int = 6, min_words: int = 5, max_words: int = 60,
                    topics: dict[str, str] | None = None) -> Sentences:
    """Python's help texts as labelled sentences (module docstring). ``topics``
    defaults to ``pydoc_data.topics.topics`` (it changes with the Python version,
    recorded in ``meta``). Classes: the ``n_classes - 1`` topics with the most
    sentences (ties by name), then ``"other"``."""
    if n_classes < 2:
        raise ValueError(f"n_classes={n_classes}: expected at least 2 (the largest topics and 'other')")
    if topics is None:
        from pydoc_data.topics import topics
    size = {name: len(text) for name, text in topics.items()}
    found = sentence_topics(topics, min_words=min_words, max_words=max_words)
    text = list(found)
    topic = [max(found[s][0], key=lambda name: (size[name], name)) for s in text]
    counts = Counter(topic)
    named = sorted(counts, key=lambda name: (-counts[name], name))[:n_classes - 1]
    if len(named) < n_classes - 1:
        raise ValueError(f"n_classes={n_classes}: the text has sentences from only {len(counts)} topics")
    classes = [*named, OTHER]
    label = np.array([classes.index(t) if t in named else len(named) for t in topic], dtype=np.int64)
    group = np.array([found[s][1] for s in text], dtype=np.int64)
    meta = {"source": "pydoc", "python": ".".join(map(str, sys.version_info[:3])),
            "label_rule": "the largest pydoc help topic (by text length) holding the sentence; the "
                          f"{n_classes - 1} topics with the most sentences are classes, the rest '{OTHER}'",
            "topic_counts": dict(counts.most_common()), "n_sentences": len(text)}
    return Sentences(text, label, topic, group, classes, meta)


def paragraph_split(data: Sentences, test_fraction: float, seed: int) -> tuple[Sentences, Sentences]:
    """Whole paragraphs, shuffled with ``default_rng(seed)``, go to the test set until it
    holds at least ``test_fraction`` of the sentences; sentences keep their order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a number strictly between 0 and 1")
    ids, sizes = np.unique(data.group, return_counts=True)
    if len(ids) < 2:
        raise ValueError(f"paragraph_split: {len(ids)} paragraph(s); at least 2 are needed")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_test = min(int(np.searchsorted(np.cumsum(sizes[order]), test_fraction * len(data))) + 1, len(ids) - 1)
    is_test = np.isin(data.group, ids[order[:n_test]])
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))


# --------------------------------------------------------------------------- sentences -> ids
def encode(sentences: Sequence[str], tokenizer_file: str | Path, max_len: int
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """WordPiece ids ``[N, L]`` (int64, ``[CLS] ... [SEP]`` then ``[PAD]``), the mask of
    real tokens ``[N, L]`` (bool) and the number of sentences cut to ``max_len``
    tokens. ``L`` is the longest encoded sentence (at most ``max_len``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    pad = tok.token_to_id("[PAD]")
    if pad is None:
        raise ValueError(f"{tokenizer_file}: the tokenizer has no [PAD] token")
    encodings = tok.encode_batch(list(sentences))
    width = max(len(e.ids) for e in encodings)
    ids = torch.full((len(encodings), width), pad, dtype=torch.int64)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, e in enumerate(encodings):
        ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.int64)
        mask[i, :len(e.ids)] = True
    return ids, mask, sum(bool(e.overflowing) for e in encodings)
