"""What an attention store holds: which layers, heads, query rows and dtype.

A leaf (plain Python, no torch): the params schema validates ``extract.*`` with it when
the params are loaded, :mod:`attnlab.store` writes and reads it as file attributes, and
:class:`~attnlab.capture.AttentionRecorder` parses its ``layers``/``heads``/``rows`` the
same way. :meth:`Selection.require` is the one refusal: a stage (or params that ask a
stage) needing attention the store does not hold gets one line naming the ``extract`` knob.
"""
from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from attnlab.io import DataError

#: Storage dtypes of the attention store (see :data:`attnlab.store.STORE_DTYPES`).
DTYPES = ("float16", "float32", "bfloat16")


def selection_spec(value: Any, name: str, words: Sequence[str]) -> str | tuple[int, ...]:
    """A ``layers``/``heads``/``rows`` setting: one of ``words`` (``None`` is ``"all"``),
    an int, or a non-empty list of distinct ints (a tensor or array: its ``tolist()``);
    ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return "all"
    if isinstance(value, str):
        if value not in words:
            raise ValueError(f"{name}={value!r}: expected {', '.join(repr(w) for w in words)} or a list of indices")
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    try:
        items = list(value)
    except TypeError:
        items = []
    try:
        if not items or any(isinstance(i, bool) for i in items):
            raise TypeError
        items = [operator.index(i) for i in items]           # ints, numpy integers
    except TypeError:
        raise ValueError(f"{name}={value!r}: expected {', '.join(repr(w) for w in words)} or a non-empty list of "
                         "integer indices") from None
    if len(set(items)) != len(items):
        raise ValueError(f"{name}={items}: index {next(i for i in items if items.count(i) > 1)} is listed twice")
    return tuple(items)


class MissingAttention(DataError):
    """A stage (or a params file) asks the attention store for what it does not hold:
    one line naming what is needed, what the store holds, and the ``extract`` knob
    to change."""


def show(value: str | tuple[int, ...]) -> str:
    """A setting as written in params.yaml: ``all``, ``cls``, ``[0, 3]``."""
    return value if isinstance(value, str) else json.dumps(list(value))


@dataclass(frozen=True)
class Selection:
    """What an attention store keeps of each recorded entry ``[B, H, Lq, Lk]``.

    Args (each also a params key of the ``extract`` stage, ``extract.<name>``):
        layers: ``"all"`` or the entries (attention calls, in call order; negative
            counts from the end) to keep.
        heads: ``"all"``, a list of head indices, or ``"mean"``: the mean over heads
            (``H = 1``).
        rows: ``"all"``, ``"cls"`` (query row 0, the class token: all a class-token
            readout of one layer needs), or a list of query rows (negative counts from
            the end of each entry's ``Lq``).
        dtype: ``"float16"`` (default), ``"float32"`` or ``"bfloat16"``.
    """

    layers: str | tuple[int, ...] = "all"
    heads: str | tuple[int, ...] = "all"
    rows: str | tuple[int, ...] = "all"
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name, words in (("layers", ("all",)), ("heads", ("all", "mean")), ("rows", ("all", "cls"))):
            object.__setattr__(self, name, selection_spec(getattr(self, name), name, words))
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")

    @property
    def full(self) -> bool:
        """Every layer, head and query row is kept (at any dtype)."""
        return self.layers == self.heads == self.rows == "all"

    @property
    def row_indices(self) -> tuple[int, ...] | None:
        """The kept query rows (None: all)."""
        return None if self.rows == "all" else (0,) if self.rows == "cls" else self.rows

    def knob(self, name: str) -> str:
        return f"extract.{name}: {show(getattr(self, name))}"

    def pick_layers(self, n_entries: int) -> list[int]:
        """Positions (call indices) of the kept entries among ``n_entries`` recorded ones."""
        if self.layers == "all":
            return list(range(n_entries))
        bad = [i for i in self.layers if not -n_entries <= i < n_entries]
        if bad:
            raise ValueError(f"layers: entry {bad[0]} does not exist; the model records {n_entries} attention "
                             f"calls per forward (0..{n_entries - 1}, or negative from the end)")
        picked = sorted(i % n_entries for i in self.layers)
        if len(set(picked)) != len(picked):
            raise ValueError(f"layers={list(self.layers)}: names one entry twice for a model with {n_entries}")
        return picked

    def to_attrs(self) -> dict[str, str]:
        return {"layers": json.dumps(_json(self.layers)), "heads": json.dumps(_json(self.heads)),
                "rows": json.dumps(_json(self.rows)), "dtype": self.dtype}

    @classmethod
    def from_attrs(cls, attrs: Any, default_dtype: str = "float16") -> "Selection":
        """The selection a file's attributes describe; a file without them holds everything."""
        get = lambda k: json.loads(attrs[k]) if k in attrs else "all"  # noqa: E731
        return cls(layers=get("layers"), heads=get("heads"), rows=get("rows"),
                   dtype=str(attrs["dtype"]) if "dtype" in attrs else default_dtype)

    def require(self, what: str, *, layers: str | Iterable[int] | None = "all",
                rows: str | Iterable[int] | None = "all", heads: str = "any",
                num_layers: int | None = None) -> None:
        """Raise :class:`MissingAttention` when ``what`` (e.g. ``"aggregate.attention
        'rollout'"``) needs attention this selection does not keep. Needs: ``layers``
        (``"all"``, call indices, or None: whichever are stored), query ``rows`` (``"all"``,
        indices, or None), ``heads``: ``"any"`` (their mean will do), ``"each"`` (each
        kept head's own map: not the mean) or ``"all"`` (every head's own map).
        With ``num_layers`` unknown (params load time), layers are compared only when
        both sides count from the same end; the stage checks again with the store."""
        if heads not in ("any", "each", "all"):
            raise ValueError(f"heads={heads!r}: expected 'any', 'each' or 'all'")
        need_layers = layers if layers in ("all", None) else tuple(layers)
        need_rows = rows if rows in ("all", None) else tuple(rows)
        parts = []
        if need_rows is not None:
            parts.append("every query row" if need_rows == "all" else
                         f"query row{'s' * (len(need_rows) > 1)} {list(need_rows)}")
        if need_layers is not None:
            parts.append("every layer" if need_layers == "all" else
                         f"layer{'s' * (len(need_layers) > 1)} {', '.join(map(str, need_layers))}")
        need = " of ".join(parts) or "attention"
        need += {"any": "", "each": ", head by head", "all": ", every head"}[heads]
        held_rows = self.row_indices
        if held_rows is not None and need_rows is not None and (need_rows == "all" or
                                                                not set(need_rows) <= set(held_rows)):
            self._refuse(what, need, f"query rows {list(held_rows)}", "rows",
                         "all" if need_rows == "all" else f"all (or a list including {list(need_rows)})")
        if self.layers != "all" and need_layers is not None:
            missing = self._missing_layers(need_layers, num_layers)
            if missing:
                self._refuse(what, need, f"layers {list(self.layers)}", "layers",
                             "all" if need_layers == "all" else f"all (or a list including {missing})")
        if heads != "any" and self.heads == "mean" or heads == "all" and self.heads != "all":
            self._refuse(what, need, "the mean over heads" if self.heads == "mean" else f"heads {list(self.heads)}",
                         "heads", "all")

    def _missing_layers(self, need: str | tuple[int, ...], num_layers: int | None) -> list[int]:
        held = set(self.layers)
        if need == "all":
            return ["all"] if num_layers is None or set(self.pick_layers(num_layers)) != set(range(num_layers)) \
                else []
        if num_layers is not None:
            held = set(self.pick_layers(num_layers))
            return [i for i in need if i % num_layers not in held]
        comparable = [i for i in need if all((i < 0) == (h < 0) for h in held)]
        return [i for i in comparable if i not in held]

    def _refuse(self, what: str, need: str, held: str, knob: str, fix: str) -> None:
        raise MissingAttention(f"{what} needs {need}; the store holds {held} ({self.knob(knob)}); "
                               f"set extract.{knob}: {fix}")


def _json(value: str | tuple[int, ...]) -> str | list[int]:
    return value if isinstance(value, str) else list(value)


