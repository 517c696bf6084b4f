"""The registry of explanation methods (:mod:`attnlab.methods`): one entry per method.

An entry says what a method is called, what it needs (``attention``: the recorded
maps; ``gradients``: their gradients; ``norms``: the norm-aware maps
``‖Σ_h α f(x)‖`` of ``AttentionRecorder(..., keep_norms=True)``, recorded in the same
forward; ``reruns``: more forward/backward passes of the model; ``module``: the
model's own modules or weights), which item kinds it
supports, and how it turns one :class:`Batch` into importance ``[B, n_items]``
(rows sum to 1). Params validation, the explain and evaluate stages, the report and
the DVC plots take the method list from here, so a new method is one
:func:`register` call and nothing else::

    from attnlab.methods import register

    @register("magnitude", items=("sequence", "spacetime", "streams"), needs=(),
              summary="|x| summed per item (ignores the model)", default=False)
    def magnitude(batch):
        return batch.items.from_input(batch.x.abs())

Item kinds (an experiment has one):

* ``sequence`` — items along dim 1 of a float input (timesteps, frames); attention
  over the items, plus a leading class token when the model has one;
* ``tokens`` — the same over integer token ids (no input gradients);
* ``spacetime`` — the ``F·P`` patches of a video under divided space-time attention;
* ``streams`` — the channel groups of a multi-stream input (a fusion's streams).

Installed packages can add methods through the ``attnlab.methods`` entry-point
group: importing the entry point's module registers them. The built-in methods are in
:mod:`attnlab.methods.builtin`; the item spaces and :class:`~attnlab.items.Batch` in
:mod:`attnlab.items`; :func:`~attnlab.attribution.explain_batch` in :mod:`attnlab.attribution`.

This module imports neither torch nor the methods' maths: validating params (which
checks method names and needs) stays cheap. A method's computation runs torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from torch import Tensor

    from attnlab.items import Batch

ITEM_KINDS = ("sequence", "tokens", "spacetime", "streams")
NEEDS = ("attention", "gradients", "reruns", "module", "norms")
#: Names the explain and evaluate stages use for other arrays and the random baseline.
RESERVED = ("random", "target", "y", "rows", "position")


@dataclass
class Method:
    """One registry entry; calling it gives ``[B, n_items]`` importance, rows summing to 1."""

    name: str
    needs: frozenset[str]
    summary: str
    default: bool = True
    compute: dict[str, Callable[[Batch], Tensor]] = field(default_factory=dict)
    #: experiment kind -> the one line saying why the method cannot explain its models
    unsupported: dict[str, str] = field(default_factory=dict)

    @property
    def items(self) -> tuple[str, ...]:
        return tuple(self.compute)

    def supports(self, kind: str) -> bool:
        return kind in self.compute

    def __call__(self, batch: Batch) -> Tensor:
        from attnlab.items import to_items

        kind = batch.items.kind
        if kind not in self.compute:
            raise ValueError(f"method {self.name!r} is not defined for {kind} items; "
                             f"it supports: {', '.join(self.compute)}")
        rel = self.compute[kind](batch)
        return to_items(rel.detach().flatten(1).float(), batch.items.n_items)


_REGISTRY: dict[str, Method] = {}
_plugins_loaded = False


def register(name: str, *, items: Iterable[str], needs: Iterable[str] | None = None,
             summary: str | None = None, default: bool | None = None,
             unsupported: Mapping[str, str] | None = None, replace: bool = False) -> Callable[[Callable[[Batch], Tensor]], Callable[[Batch], Tensor]]:
    """Decorator: ``fn(batch) -> [B, n_items]`` computes method ``name`` for ``items``.

    The first registration of a name sets ``needs`` and ``summary`` (required) and
    ``default`` (whether experiments run it unless their params list methods);
    later ones add implementations for other item kinds. ``unsupported`` maps an
    experiment kind (``motion``, ``pretrained``, ...) whose models the method cannot
    explain although their item kind is listed to the one line saying why: params that
    list the method for such an experiment are refused when loaded, and the kind's
    default methods leave it out; a key ``"<kind>:<variant>"`` refuses one model variant
    of a kind (``"video:hf_timesformer"``, checked by that kind's params). ``replace``
    allows redefining a (name, item kind) pair."""
    kinds = tuple(items)
    bad = [k for k in kinds if k not in ITEM_KINDS]
    if bad or not kinds:
        raise ValueError(f"register({name!r}): items={list(kinds)}; expected some of {', '.join(ITEM_KINDS)}")

    if name in RESERVED or not name.isidentifier():
        raise ValueError(f"register({name!r}): a method name is an identifier other than {', '.join(RESERVED)}")

    def decorate(fn: Callable[[Batch], Tensor]) -> Callable[[Batch], Tensor]:
        entry = _REGISTRY.get(name)
        if entry is not None:
            given = {"needs": None if needs is None else frozenset(needs), "summary": summary, "default": default}
            differ = [k for k, v in given.items() if v is not None and v != getattr(entry, k)]
            if differ:
                raise ValueError(f"register({name!r}): {differ[0]} differs from the method's first "
                                 "registration; give it only there")
        else:
            if needs is None or summary is None:
                raise ValueError(f"register({name!r}): a new method needs 'needs' and 'summary'")
            unknown = sorted(set(needs) - set(NEEDS))
            if unknown:
                raise ValueError(f"register({name!r}): needs={unknown[0]!r}; accepted: {', '.join(NEEDS)}")
            entry = _REGISTRY[name] = Method(name, frozenset(needs), summary,
                                             True if default is None else default)
        entry.unsupported.update(unsupported or {})
        for kind in kinds:
            if kind in entry.compute and not replace:
                raise ValueError(f"method {name!r} is already registered for {kind} items")
            entry.compute[kind] = fn
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove a method (e.g. one a test registered)."""
    _REGISTRY.pop(name, None)


def _load_plugins() -> None:
    """Import the modules of the ``attnlab.methods`` entry points (once per process)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    for ep in metadata.entry_points(group="attnlab.methods"):
        try:
            ep.load()
        except Exception as err:
            raise ValueError(f"entry point {ep.name!r} = {ep.value!r} (group attnlab.methods) failed to load: "
                             f"{type(err).__name__}: {err}") from err
    _plugins_loaded = True


def registry() -> Mapping[str, Method]:
    """Every registered method by name, in registration order."""
    _load_plugins()
    return _REGISTRY


def get(name: str) -> Method:
    methods = registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(methods)}")
    return methods[name]


def names(kind: str | None = None, *, default_only: bool = False, experiment: str | None = None) -> list[str]:
    """The methods defined for item ``kind`` (all when None), leaving out those that
    cannot explain the models of experiment kind ``experiment`` (when given)."""
    return [m.name for m in registry().values()
            if (kind is None or m.supports(kind)) and (m.default or not default_only)
            and (experiment is None or experiment not in m.unsupported)]


def check_experiment(methods: Sequence[str], experiment: str) -> list[str]:
    """``methods`` if each can explain the models of experiment kind ``experiment``, else
    a ``ValueError`` naming the first that cannot, and why."""
    for name in methods:
        why = get(name).unsupported.get(experiment)
        if why is not None:
            raise ValueError(f"method {name!r} cannot explain {experiment} models: {why}")
    return list(methods)


def check(methods: Sequence[str], kind: str) -> list[str]:
    """``methods`` if every one is registered and defined for ``kind`` items, else a
    ``ValueError`` naming the first bad one and the accepted names."""
    for name in methods:
        if name not in registry() or not registry()[name].supports(kind):
            what = (f"unknown method {name!r}" if name not in registry() else
                    f"method {name!r} is not defined for {kind} items")
            raise ValueError(f"{what}; accepted for {kind} items: {', '.join(names(kind))}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods listed twice: {sorted(m for m in set(methods) if list(methods).count(m) > 1)}")
    return list(methods)

