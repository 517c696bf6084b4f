"""Token sequences for causal language models: a vocabulary and four sources.

Every source returns a :class:`TokenData`: ``tokens [N, L]`` int64 right-padded with
``<pad>`` to ``L = max_len``, ``mask [N, L]`` bool (True = real token), the vocabulary
``vocab`` (the ``itos`` list) and ``group [N]``, the source document of each row (a
chorale, a help topic, a line), so that :func:`train_test_split` never puts pieces of
one document on both sides.

* :func:`planted_sequences` — a synthetic grammar with known token→token dependencies
  (``true_pairs``), the ground truth for ``VocabAttention``.
* :func:`bach_sequences` — pitch sequences of the Bach chorales in music21's corpus.
* :func:`pydoc_sequences` — English words of the help texts shipped with Python.
* :func:`file_sequences` — the user's own whitespace-separated sequences.

Sequences longer than the row length are cut into consecutive chunks (each its own
row). Vocabularies list the specials ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, then
the tokens by decreasing count (ties alphabetically). Nothing here touches a global
random state: randomness comes from ``numpy.random.default_rng(seed)``.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attnlab.io import DataError

__all__ = ["PAD", "UNK", "BOS", "Vocab", "TokenData", "planted_sequences", "bach_sequences",
           "pydoc_sequences", "file_sequences", "read_token_lines", "MAX_LINE_CHARS", "train_test_split"]

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIALS = (PAD, UNK, BOS)
REST = "rest"
_VOICES = ("soprano", "alto", "tenor", "bass")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
#: Longest line (in characters, newline excluded) :func:`read_token_lines` accepts: a
#: sequence is one line, and a longer one is almost always not a token file (a binary
#: file, a JSON dump, a text without line breaks).
MAX_LINE_CHARS = 100_000


# --------------------------------------------------------------------------- vocabulary
class Vocab:
    """Token strings ↔ ids. ``itos[0:3]`` are ``<pad>``, ``<unk>``, ``<bos>``.

    ``Vocab(itos)`` wraps an existing list (e.g. ``TokenData.vocab`` of a training
    set); :meth:`build` counts tokens. Unknown strings encode to ``<unk>``.
    """

    pad_id, unk_id, bos_id = 0, 1, 2

    def __init__(self, itos: Sequence[str]):
        itos = [str(s) for s in itos]
        if tuple(itos[:len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocab: expected the specials {list(SPECIALS)} first, got {itos[:len(SPECIALS)]}")
        if len(set(itos)) != len(itos):
            dup = sorted(s for s, c in Counter(itos).items() if c > 1)
            raise ValueError(f"vocab: duplicate tokens {dup[:10]}")
        self.itos: list[str] = itos
        self.stoi: dict[str, int] = {s: i for i, s in enumerate(itos)}

    @classmethod
    def build(cls, sequences: Iterable[Iterable[str]], *, min_count: int = 1,
              top_k: int | None = None) -> Vocab:
        """Specials + the tokens seen at least ``min_count`` times, the ``top_k`` most
        frequent of them if given; ordered by decreasing count, ties alphabetically."""
        if min_count < 1:
            raise ValueError(f"min_count={min_count}: expected >= 1")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k={top_k}: expected >= 1 or None")
        counts = Counter(tok for seq in sequences for tok in seq)
        kept = sorted((t for t, c in counts.items() if c >= min_count and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + kept[:top_k])

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens: {self.itos[:8]}{' ...' if len(self) > 8 else ''})"


# --------------------------------------------------------------------------- container
@dataclass(frozen=True)
class TokenData:
    """Right-padded token rows and what is known about them.

    Attributes:
        tokens: ``[N, L]`` int64 token ids, ``<pad>`` (0) after the end of each row.
        mask: ``[N, L]`` bool, True on real tokens.
        vocab: ``itos`` list; ``vocab[i]`` is the string of id ``i``.
        group: ``[N]`` int64, the source document of each row (rows cut from one
            document share it).
        true_pairs: planted data only: ``(query_token, key_token)`` strings of the pairs
            the grammar makes necessary (see :func:`planted_sequences`).
        true_key: planted data only: ``[N, L]`` int64; at a query position the position of
            the key it must attend to, -1 elsewhere.
        rule_mask: planted data only: ``[N, L]`` bool, True on the tokens fixed by a
            rule (the targets to score accuracy on).
        meta: source description (rules, options, file names, ...).

    ``data["tokens"]`` works as ``data.tokens``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    vocab: list[str]
    group: torch.Tensor
    true_pairs: list[tuple[str, str]] | None = None
    true_key: torch.Tensor | None = None
    rule_mask: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int]) -> TokenData:
        """The rows ``index`` (in that order), with their per-row fields."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return TokenData(self.tokens[idx], self.mask[idx], list(self.vocab), self.group[idx],
                         self.true_pairs, pick(self.true_key), pick(self.rule_mask), dict(self.meta))


def train_test_split(data: TokenData, test_fraction: float = 0.2, seed: int = 0) -> tuple[TokenData, TokenData]:
    """Split ``data`` by whole groups (documents) into train and test.

    Groups are shuffled with ``default_rng(seed)`` and taken into the test set until it
    holds at least ``test_fraction`` of the rows; rows keep their original order.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a number strictly between 0 and 1")
    group = data.group.numpy()
    ids, sizes = np.unique(group, return_counts=True)
    if len(ids) < 2:
        raise ValueError(f"train_test_split: data has {len(ids)} group(s); at least 2 are needed")
    order = np.random.default_rng(seed).permutation(len(ids))
    taken = np.cumsum(sizes[order])
    n_groups = int(np.searchsorted(taken, test_fraction * len(group))) + 1
    n_groups = min(n_groups, len(ids) - 1)                     # keep at least one group for training
    is_test = np.isin(group, ids[order[:n_groups]])
    return data.subset(np.flatnonzero(~is_test)), data.subset(np.flatnonzero(is_test))


# --------------------------------------------------------------------------- helpers
def _check_max_len(max_len: int, add_bos: bool) -> None:
    if max_len < 1 + int(add_bos):
        raise ValueError(f"max_len={max_len}: expected >= {1 + int(add_bos)}")


def _pack(docs: Sequence[Sequence[str]], vocab: Vocab, max_len: int, add_bos: bool,
          meta: dict[str, Any]) -> TokenData:
    """Cut each document into chunks of ``max_len`` (``<bos>`` first if ``add_bos``),
    encode, and right-pad; empty documents give no row."""
    step = max_len - int(add_bos)
    rows, group = [], []
    for g, doc in enumerate(docs):
        ids = vocab.encode(doc)
        for start in range(0, len(ids), step):
            rows.append(([vocab.bos_id] if add_bos else []) + ids[start:start + step])
            group.append(g)
    tokens = torch.full((len(rows), max_len), vocab.pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), max_len), dtype=torch.bool)
    for r, ids in enumerate(rows):
        tokens[r, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        mask[r, :len(ids)] = True
    return TokenData(tokens, mask, list(vocab.itos), torch.tensor(group, dtype=torch.int64), meta=meta)


# --------------------------------------------------------------------------- planted
def planted_sequences(n: int, *, vocab_size: int = 40, length: int = 32, n_rules: int = 8,
                      plants_per_seq: int = 3, p_present: float = 0.5, seed: int = 0) -> TokenData:
    """Random filler tokens with planted "was trigger ``a_r`` seen?" questions.

    The ``vocab_size - 3`` content tokens ``w00, w01, ...`` are split at random (by
    ``seed``) into ``n_rules`` triggers ``a_r``, ``n_rules`` probes ``b_r``, two answers
    ``yes``/``no`` and fillers. Each rule ``r`` is a pair ``(a_r, b_r)``. A sequence is
    uniform fillers in which ``plants_per_seq`` distinct rules are planted: the probe
    ``b_r`` at a random position ``q`` (``1 <= q <= length - 2``) followed by the answer
    at ``q + 1``, and, with probability ``p_present``, the trigger ``a_r`` at a random
    position ``p < q``. The grammar, checked token by token in the tests:

    * the token after ``b_r`` is ``yes`` if ``a_r`` occurs before it, else ``no``;
    * triggers, probes and answers occur nowhere else (each rule at most once a row).

    So the answer at ``q + 1`` is predictable only by looking, from the probe at ``q``
    (the query whose output predicts ``q + 1``), for ``a_r`` among the earlier keys.
    The true pair in the ``VocabAttention`` sense (query token at ``i`` attending to
    key token at ``j <= i``) is ``(b_r, a_r)``: ``true_pairs`` lists them,
    ``true_key[row, q] = p`` where the trigger is present (-1 elsewhere), and
    ``rule_mask`` is True on the answers (score accuracy there; chance is
    ``max(p_present, 1 - p_present)``). The rules are in ``meta["rules"]``.
    """
    n_content = vocab_size - len(SPECIALS)
    n_fillers = n_content - 2 * n_rules - 2
    if n < 1:
        raise ValueError(f"n={n}: expected >= 1")
    if n_rules < 1:
        raise ValueError(f"n_rules={n_rules}: expected >= 1")
    if n_fillers < 1:
        raise ValueError(f"vocab_size={vocab_size}: expected >= {len(SPECIALS) + 2 * n_rules + 3} "
                         f"(3 specials, 2 tokens per rule, 2 answers, 1 filler) for n_rules={n_rules}")
    if not 1 <= plants_per_seq <= n_rules:
        raise ValueError(f"plants_per_seq={plants_per_seq}: expected 1..n_rules={n_rules}")
    if length < 3 * plants_per_seq + 2:
        raise ValueError(f"length={length}: expected >= {3 * plants_per_seq + 2} for plants_per_seq={plants_per_seq}")
    if not 0.0 <= p_present <= 1.0:
        raise ValueError(f"p_present={p_present}: expected a probability in [0, 1]")

    rng = np.random.default_rng(seed)
    itos = list(SPECIALS) + [f"w{i:02d}" for i in range(n_content)]
    roles = rng.permutation(n_content) + len(SPECIALS)          # content ids in random order
    trigger, probe = roles[:n_rules], roles[n_rules:2 * n_rules]
    yes_id, no_id = int(roles[2 * n_rules]), int(roles[2 * n_rules + 1])
    fillers = roles[2 * n_rules + 2:]

    tokens = np.empty((n, length), dtype=np.int64)
    true_key = np.full((n, length), -1, dtype=np.int64)
    rule_mask = np.zeros((n, length), dtype=bool)
    for row in range(n):
        for _attempt in range(1000):
            placed = _plant_row(rng, length, n_rules, plants_per_seq, p_present)
            if placed is not None:
                break
        else:  # pragma: no cover - length >= 3 * plants + 2 makes this vanishingly rare
            raise RuntimeError(f"planted_sequences: could not place {plants_per_seq} rules in length {length}")
        tokens[row] = rng.choice(fillers, size=length)
        for r, q, p in placed:
            tokens[row, q] = probe[r]
            tokens[row, q + 1] = yes_id if p >= 0 else no_id
            rule_mask[row, q + 1] = True
            if p >= 0:
                tokens[row, p] = trigger[r]
                true_key[row, q] = p

    rules = [{"trigger": itos[a], "probe": itos[b]} for a, b in zip(trigger, probe)]
    meta = {"source": "planted", "seed": seed, "rules": rules, "yes": itos[yes_id], "no": itos[no_id],
            "fillers": [itos[f] for f in sorted(fillers)], "plants_per_seq": plants_per_seq,
            "p_present": p_present}
    return TokenData(torch.from_numpy(tokens), torch.ones((n, length), dtype=torch.bool), itos,
                     torch.arange(n, dtype=torch.int64),
                     true_pairs=[(r["probe"], r["trigger"]) for r in rules],
                     true_key=torch.from_numpy(true_key), rule_mask=torch.from_numpy(rule_mask), meta=meta)


def _plant_row(rng: np.random.Generator, length: int, n_rules: int, plants: int,
               p_present: float) -> list[tuple[int, int, int]] | None:
    """``[(rule, probe position q, trigger position p or -1)]`` on distinct positions."""
    free = np.ones(length, dtype=bool)
    out = []
    for r in rng.choice(n_rules, size=plants, replace=False):
        present = bool(rng.random() < p_present)
        q_ok = free[1:length - 1] & free[2:length]                  # q in 1..length-2, q and q+1 free
        if present:                                                 # a free p < q must exist
            q_ok &= np.cumsum(free)[0:length - 2] > 0
        qs = np.flatnonzero(q_ok) + 1
        if len(qs) == 0:
            return None
        q = int(rng.choice(qs))
        free[q] = free[q + 1] = False
        p = -1
        if present:
            p = int(rng.choice(np.flatnonzero(free[:q])))
            free[p] = False
        out.append((int(r), q, p))
    return out


# --------------------------------------------------------------------------- bach
def bach_sequences(*, voices: str = "soprano", max_len: int = 64, limit: int | None = None,
                   rests: str = "drop", min_count: int = 1, add_bos: bool = False,
                   cache: str | os.PathLike | None = None, progress: bool = True) -> TokenData:
    """Pitch sequences of the Bach chorales bundled with music21 (offline).

    The chorales are the MusicXML files of ``music21.corpus.getComposer("bach")``
    (sorted by name) that have a part named Soprano/Alto/Tenor/Bass — 409 chorales in
    music21 10.5; the 3 Humdrum duplicates and the one keyboard piece are skipped. A
    token is a note's spelled pitch with octave (``pitch.nameWithOctave``: ``"C5"``,
    ``"F#4"``, ``"B-3"``; enharmonic spellings stay distinct); durations are ignored,
    a note tied over from the previous one is not repeated, grace notes are dropped
    (a chord, which vocal parts do not have, would give its highest pitch).

    Args:
        voices: ``"soprano"`` (one row group per chorale: its first soprano part) or
            ``"all"`` (each vocal part — soprano, alto, tenor, bass — as a sequence; the
            four voices of a chorale share a ``group``). Instrumental parts are ignored.
        limit: parse only the first ``limit`` chorales.
        rests: ``"drop"`` (melodies only) or ``"token"`` (a ``"rest"`` token; a run of
            rests gives one).
        min_count: pitches seen fewer times map to ``<unk>``.
        cache: a JSON file of the parsed sequences: read if it was written for the same
            ``limit`` and music21 version, else (re)written. No cache unless given.
        progress: a tqdm bar (stderr) over the chorales; a full parse takes about a minute.

    Parsing bypasses music21's own pickle cache (``forceSource=True``).
    """
    if voices not in ("soprano", "all"):
        raise ValueError(f"voices={voices!r}: expected 'soprano' or 'all'")
    if rests not in ("drop", "token"):
        raise ValueError(f"rests={rests!r}: expected 'drop' or 'token'")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: expected >= 1 or None")
    _check_max_len(max_len, add_bos)
    chorales = _load_chorales(limit, cache, progress)              # [(name, [(voice, tokens)])]
    if not chorales:
        raise ValueError("bach_sequences: music21's corpus has no Bach chorales (is it installed?)")

    docs = []
    for _name, parts in chorales:
        chosen = [toks for voice, toks in parts if voices == "all" or voice == "soprano"]
        if voices == "soprano":
            chosen = chosen[:1]
        docs.append([[t for t in toks if rests == "token" or t != REST] for toks in chosen])
    vocab = Vocab.build((toks for doc in docs for toks in doc), min_count=min_count)
    flat = [toks for doc in docs for toks in doc]
    data = _pack(flat, vocab, max_len, add_bos, meta={})
    # group = chorale index (voices of one chorale share it), not sequence index
    chorale_of_seq = torch.tensor([c for c, doc in enumerate(docs) for _ in doc], dtype=torch.int64)
    meta = {"source": "bach", "voices": voices, "rests": rests, "chorales": [n for n, _ in chorales]}
    return TokenData(data.tokens, data.mask, data.vocab, chorale_of_seq[data.group], meta=meta)


def _load_chorales(limit: int | None, cache: str | os.PathLike | None,
                   progress: bool) -> list[tuple[str, list[tuple[str, list[str]]]]]:
    import music21
    from music21 import corpus

    key = {"format": 1, "music21": music21.__version__, "limit": limit}
    if cache is not None and Path(cache).is_file():
        stored = json.loads(Path(cache).read_text())
        if stored.get("key") == key:
            return [(name, [(v, list(t)) for v, t in parts]) for name, parts in stored["chorales"]]

    paths = sorted(corpus.getComposer("bach", fileExtensions=("mxl", "xml")), key=lambda p: p.name)
    from tqdm.auto import tqdm

    chorales = []
    bar = tqdm(total=limit or len(paths), desc="bach chorales", unit="file", disable=not progress)
    for path in paths:
        if limit is not None and len(chorales) >= limit:
            break
        score = corpus.parse(path, forceSource=True)
        parts = [(v, _part_tokens(part)) for part in score.parts if (v := _voice_of(part.partName))]
        bar.update(1)
        if parts:
            chorales.append((path.stem, parts))
    bar.close()

    if cache is not None:
        tmp = Path(f"{cache}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "chorales": chorales}))
        os.replace(tmp, cache)
    return chorales


def _voice_of(part_name: str | None) -> str | None:
    """'Soprano', 'Soprano 1', 'Soprano\\rOboe 1,2' -> 'soprano'; instruments -> None."""
    words = (part_name or "").lower().split()
    return words[0] if words and words[0] in _VOICES else None


def _part_tokens(part) -> list[str]:
    out: list[str] = []
    for el in part.flatten().notesAndRests:
        if el.isRest:
            if not out or out[-1] != REST:
                out.append(REST)
            continue
        if el.duration.isGrace or (el.tie is not None and el.tie.type in ("stop", "continue")):
            continue
        pitch = max(el.pitches, key=lambda p: p.ps)                 # a Note has one pitch
        out.append(pitch.nameWithOctave)
    return out


# --------------------------------------------------------------------------- pydoc
def pydoc_sequences(*, top_k: int = 500, max_len: int = 64, add_bos: bool = False) -> TokenData:
    """Lower-cased English words of Python's help texts (``pydoc_data.topics.topics``).

    Each help topic (sorted by name) is one document; a word is a run of letters with at
    most one inner apostrophe (``"don't"``), so digits, punctuation and underscores
    separate words and are dropped. The ``top_k`` most frequent words form the
    vocabulary (``len(vocab) == top_k + 3``), every other word is ``<unk>``.
    """
    from pydoc_data.topics import topics

    _check_max_len(max_len, add_bos)
    docs = [_WORD.findall(topics[name].lower()) for name in sorted(topics)]
    vocab = Vocab.build(docs, top_k=top_k)
    return _pack(docs, vocab, max_len, add_bos, meta={"source": "pydoc", "topics": sorted(topics)})


# --------------------------------------------------------------------------- file
def read_token_lines(path: str | os.PathLike, *, what: str = "prepare.path",
                     max_chars: int = MAX_LINE_CHARS) -> list[list[str]]:
    """The sequences of a user's token file: one per line, tokens separated by whitespace.

    The file must be UTF-8 (a leading byte-order mark is dropped); blank lines are
    skipped; a line may hold at most ``max_chars`` characters (newline excluded). Lines
    are read one at a time, never more than ``4·max_chars`` bytes at once, so a huge file
    without line breaks is refused without being loaded.

    Args:
        path: the text file.
        what: how the caller names the file (a params key, a command-line option); it
            starts every error message.
        max_chars: the longest line accepted.

    Returns:
        One list of token strings per non-blank line, in file order.

    Raises:
        attnlab.io.DataError: (a ``ValueError``) one line naming ``what``, the file and,
            where it applies, the line number: a missing, unreadable or empty file (or one
            of blank lines only), bytes that are not UTF-8, a line over ``max_chars``.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars={max_chars!r}: expected a positive int")
    where = f"{what}: {os.fspath(path)}"
    limit = 4 * max_chars + 2          # bytes: max_chars UTF-8 characters (at most 4 bytes each) + "\r\n"
    too_long = (lambda number: DataError(f"{where}, line {number}: longer than {max_chars:,} characters (one "
                                         "sequence per line, tokens separated by whitespace); is this a token file?"))
    docs: list[list[str]] = []
    try:
        with open(path, "rb") as f:
            for number in itertools.count(1):
                raw = f.readline(limit)
                if not raw:
                    break
                if len(raw) == limit and not raw.endswith(b"\n"):
                    raise too_long(number)      # the line goes on: more than max_chars characters
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{where}, line {number}: not UTF-8 (byte 0x{raw[err.start]:02x} at byte "
                                    f"{err.start + 1} of the line); save the file as UTF-8 text") from None
                if number == 1:
                    text = text.removeprefix("\ufeff")
                if len(text.rstrip("\r\n")) > max_chars:
                    raise too_long(number)
                tokens = text.split()
                if tokens:
                    docs.append(tokens)
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{where}: is a directory, expected a text file (one sequence per line)") from None
    except OSError as err:
        raise DataError(f"{where}: cannot read it ({err.strerror or err})") from None
    if not docs:
        raise DataError(f"{where}: no sequences (the file is empty or holds only blank lines); expected one "
                        "sequence per line, tokens separated by whitespace")
    return docs


def file_sequences(path: str | os.PathLike, *, max_len: int = 64, vocab: Vocab | Sequence[str] | None = None,
                   min_count: int = 1, top_k: int | None = None, add_bos: bool = False,
                   what: str = "prepare.path") -> TokenData:
    """The user's sequences: one per line, tokens separated by whitespace.

    The file is read and checked by :func:`read_token_lines` (errors start with
    ``what``). Blank lines are skipped; a line longer than the row length is cut into
    chunks (rows of the same ``group``). The vocabulary is built from the file
    (``min_count``, ``top_k`` as in :meth:`Vocab.build`) unless ``vocab`` (a
    :class:`Vocab` or an ``itos`` list such as a training set's ``TokenData.vocab``) is
    given; tokens outside it map to ``<unk>``.
    """
    _check_max_len(max_len, add_bos)
    if vocab is not None and (min_count != 1 or top_k is not None):
        raise ValueError("file_sequences: give either vocab or min_count/top_k, not both")
    path = Path(path)
    docs = read_token_lines(path, what=what)
    if vocab is None:
        vocab = Vocab.build(docs, min_count=min_count, top_k=top_k)
    else:
        vocab = vocab if isinstance(vocab, Vocab) else Vocab(vocab)
        if not any(tok in vocab.stoi for doc in docs for tok in doc):
            raise DataError(f"{what}: {path}: none of its {sum(map(len, docs)):,} tokens is in the vocabulary "
                            f"({len(vocab) - len(SPECIALS):,} tokens, e.g. {vocab.itos[len(SPECIALS):][:3]}): "
                            "every one would be <unk>; is it the data the model was trained on?")
    return _pack(docs, vocab, max_len, add_bos, meta={"source": "file", "path": str(path)})
