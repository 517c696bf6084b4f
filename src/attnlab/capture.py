"""Recording attention probabilities (and their gradients) from any PyTorch model.

Recordable modules, each through an adapter chosen by the module's type:

* ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoder``/``Decoder`` layers, whose
  attention is otherwise hidden behind ``need_weights=False`` and fused fast paths);
* :class:`AttentionProbs`, the marker the project's own attention modules call on
  their softmax output;
* Hugging Face ``transformers`` attention modules (detected by type, without importing
  ``transformers``): those that dispatch through ``ALL_ATTENTION_FUNCTIONS`` (BERT,
  RoBERTa, ViT and their relatives, self- and cross-attention), under the ``eager`` and
  ``sdpa`` implementations, and TimeSformer's ``TimesformerSelfAttention`` (its spatial
  and its temporal attention). While such a module runs, its one softmax call (eager)
  is recorded as it is, or its one ``scaled_dot_product_attention`` call (sdpa) is
  computed explicitly (the same maths, the probabilities in the graph).

Never silent: modules that look like attention (an attention name with q/k/v or qkv
projections) that no adapter records make the recorder raise on entry, and so does a
call to ``scaled_dot_product_attention`` from any other module of the model while it
records (see :func:`attention_lookalikes`).

:class:`AttentionRecorder` is a context manager: inside ``with`` the modules record,
on exit the model is exactly as it was (no hooks, no patched methods, no torch
function mode, the global MHA fast-path flag back to its previous value), also when
the block raises.
"""
from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Iterable
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import activation as _torch_activation
from torch.overrides import TorchFunctionMode

from attnlab.selection import selection_spec


class AttentionProbs(nn.Module):
    """Identity marker placed on attention probabilities, right after the softmax and
    before dropout: ``probs = self.attn_probs(scores.softmax(-1))``.

    This is the protocol through which the project's own attention modules (and a
    user's) are recorded by :class:`AttentionRecorder`. The input must be laid out
    ``[B, H, Lq, Lk]`` (for factorised attention, ``B`` is whatever the module batches
    over, e.g. ``batch·frames``). Outside a recorder it returns its input unchanged.

    ``values`` (optional; needed by ``AttentionRecorder(..., keep_norms=True)``): each
    head's output-space vector of each key, ``f^h(x_j) = W_O^h v^h_j`` as
    ``[B, H, Lk, E]`` (see :func:`head_outputs`), or a zero-argument callable returning
    it, which is called only when norms are recorded (so the model pays nothing
    otherwise): ``self.attn_probs(probs, values=lambda: head_outputs(v, self.proj.weight))``.
    """

    def forward(self, probs_bhqk: torch.Tensor, values=None) -> torch.Tensor:
        return probs_bhqk


def head_outputs(v_bhkd: torch.Tensor, out_weight: torch.Tensor) -> torch.Tensor:
    """Each head's values mapped through its block of the output projection:
    ``f^h(x_j) = W_O^h v^h_j`` ``[B, H, Lk, E]``, from per-head values ``v_bhkd
    [B, H, Lk, d]`` (value bias included) and the out-projection weight ``[E, H·d]``
    (``W_O^h = out_weight[:, h·d:(h+1)·d]``; the output bias is not part of it).
    Summed over heads with the attention weights, these give the module's output
    before the output bias (Kobayashi et al. 2020, "Attention is not only a weight")."""
    if v_bhkd.dim() != 4 or out_weight.dim() != 2:
        raise ValueError(f"head_outputs: expected v_bhkd [B, H, Lk, d] and out_weight [E, H*d]; got "
                         f"{tuple(v_bhkd.shape)} and {tuple(out_weight.shape)}")
    heads, head_dim = v_bhkd.shape[1], v_bhkd.shape[3]
    if out_weight.shape[1] != heads * head_dim:
        raise ValueError(f"head_outputs: out_weight {tuple(out_weight.shape)} does not match {heads} heads "
                         f"of size {head_dim}: expected [E, {heads * head_dim}]")
    w_ehd = out_weight.reshape(out_weight.shape[0], heads, head_dim)
    return torch.einsum("bhkd,ehd->bhke", v_bhkd, w_ehd.to(v_bhkd.dtype))


def _norms(probs_bhqk: torch.Tensor, f_bhke: torch.Tensor) -> torch.Tensor:
    """``N[b, i, j] = ‖Σ_h α^h_ij f^h(x_j)‖`` ``[B, Lq, Lk]`` (detached), through the
    per-key head Gram ``G[b, j, h, g] = <f^h(x_j), f^g(x_j)>``:
    ``N² = Σ_{h,g} α^h α^g G``, never building a ``[B, Lq, Lk, E]`` tensor. NaN
    probability rows give NaN rows."""
    with torch.no_grad():
        a = probs_bhqk.detach()
        a = a if a.dtype in (torch.float32, torch.float64) else a.float()
        f = f_bhke.detach().to(a.dtype)
        gram_bkhg = torch.einsum("bhke,bgke->bkhg", f, f)
        tmp_bgqk = torch.einsum("bhqk,bkhg->bgqk", a, gram_bkhg)
        return (tmp_bgqk * a).sum(1).clamp_min(0).sqrt()


def take_heads_rows(att: torch.Tensor, heads: str | tuple[int, ...] = "all", rows: str | tuple[int, ...] = "all",
                    key: str = "attention") -> torch.Tensor:
    """The kept heads and query rows of attention ``[..., H, Lq, Lk]`` ->
    ``[..., H', Lq', Lk]``: ``heads`` is ``"all"``, ``"mean"`` (``H' = 1``) or indices;
    ``rows`` is ``"all"``, ``"cls"`` (row 0) or indices (negative from the end).
    ``ValueError`` naming ``key`` for an index the entry does not have."""
    n_heads, lq = att.shape[-3], att.shape[-2]
    if heads == "mean":
        att = att.float().mean(-3, keepdim=True)
    elif heads != "all":
        bad = [h for h in heads if not -n_heads <= h < n_heads]
        if bad:
            raise ValueError(f"heads: head {bad[0]} does not exist in entry {key!r}, which has {n_heads} heads")
        att = att[..., list(heads), :, :]
    if rows != "all":
        picked = [0] if rows == "cls" else list(rows)
        bad = [r for r in picked if not -lq <= r < lq]
        if bad:
            raise ValueError(f"rows: query row {bad[0]} does not exist in entry {key!r}, which has {lq} rows")
        att = att[..., picked, :]
    return att


_RECORDABLE_NAMES = ("MultiheadAttention", "AttentionProbs")
_Record = Callable[..., torch.Tensor]     # record(probs, values=None) -> probs to continue with


class AttentionRecorder:
    """Record the attention probabilities of every attention call of ``model``.

    ``with AttentionRecorder(model) as rec: model(x)`` then

    * ``rec.attentions[i]``: ``[B, H, Lq, Lk]`` softmax probabilities of the i-th
      attention call, before dropout, batch-first whatever the module's
      ``batch_first`` (an unbatched call gives ``B = 1``); detached. For
      ``nn.MultiheadAttention`` with ``add_bias_kv`` / ``add_zero_attn`` the extra
      key columns are included (``Lk = S + 1`` or ``S + 2``), as torch computes them.
    * ``rec.names[i]``: the qualified name of the module that made the call (a module
      called three times gives three entries with the same name).
    * ``rec.gradients[i]`` (``keep_grad=True``, after ``loss.backward()``):
      ``d loss / d rec.attentions[i]``, taken on the very tensor the module's output
      was computed from. It works on frozen models too: the probabilities are made to
      require grad when nothing upstream does.
    * ``rec.norms[i]`` (``keep_norms=True``): ``[B, Lq, Lk]`` float, the norm-aware
      attention of Kobayashi et al. (2020, "Attention is not only a weight"):
      ``N_ij = ‖Σ_h α^h_ij f^h(x_j)‖`` with ``f^h(x_j) = W_O^h (W_V^h x_j + b_V^h)``
      (value projection and the h-th column block of the output projection, without
      the output bias) and ``α`` the recorded probabilities; detached, same layout and
      entry order as ``rec.attentions`` (masked keys give 0, NaN rows stay NaN).
      Recorded for ``nn.MultiheadAttention`` and for :class:`AttentionProbs` markers
      that pass ``values`` (see :func:`head_outputs`); nothing is computed without
      ``keep_norms``.

    Recorded modules (adapters chosen by type, no flag): ``nn.MultiheadAttention``,
    :class:`AttentionProbs` markers, and Hugging Face attention modules — those that
    dispatch through ``ALL_ATTENTION_FUNCTIONS`` (``BertSelfAttention``,
    ``RobertaSelfAttention``, ``ViTAttention``, their cross-attention and relatives)
    under ``attn_implementation="eager"`` or ``"sdpa"``, and TimeSformer's
    ``TimesformerSelfAttention``, spatial (``[B·F, H, 1+P, 1+P]``) and temporal
    (``[B·P, H, F, F]``; see :func:`~attnlab.explain.split_spacetime`). ``transformers``
    is never imported here: its modules are recognised by their class.

    Args:
        model: any ``nn.Module`` containing recordable modules.
        modules: qualified names (as in ``model.named_modules()``) of the modules to
            record; default all of them.
        keep_grad: also capture the gradient of the loss with respect to each entry.
        keep_norms: also record the norm-aware attention ``rec.norms``.
        layers: keep only these attention calls (indices in call order, counted from
            the start of the ``with`` block or the last :meth:`clear`; negative from the
            end), e.g. ``[-1]`` for the last; default all. Calls that cannot be selected
            are never held (for negative indices, only the last few are held until the
            end is known). Entering the block again starts afresh.
        heads: keep only these heads (indices) or ``"mean"``, their mean (``H = 1``;
            not with ``keep_grad`` nor ``keep_norms``); default all.
        rows: keep only these query rows (indices, negative from the end of each
            entry's ``Lq``) or ``"cls"`` (row 0, the class token's); default all.
            Gradients and norms are kept for the same heads and rows (norms are over
            every head, as defined, so they take ``rows`` only and no ``heads``).
            The model computes what it always does: selection affects only what is kept.
        edit: an intervention on the probabilities, ``edit(name, call, probs_bhqk) ->
            probs_bhqk``: called on every attention call (``name`` the module's name,
            ``call`` its index in call order as in ``layers``; ``probs_bhqk`` the
            ``[B, H, Lq, Lk]`` softmax probabilities, batch-first as recorded) after they
            are recorded and before dropout and the product with the values; the module
            continues with what it returns (same shape). What is recorded is the
            probabilities before the edit. With an edit, ``nn.MultiheadAttention`` always
            takes the explicit path (the fused kernel computes its output before the
            probabilities are seen). This is how interventions are made: value zeroing
            (a key's column set to 0) or attention knockout (edges removed and rows
            renormalised), see :mod:`attnlab.explain.interventions`. Default None: the
            model computes exactly what it computes without it.

    Raises:
        ValueError: on entry: ``model`` has no recordable module; a name in ``modules``
            is not a recordable module of ``model``; a module cannot be recorded
            (TorchScript, ``torch.compile``, a subclass of ``nn.MultiheadAttention``
            that overrides ``forward``, or a module whose ``forward`` is already
            patched); with ``modules=None``, the model has modules that look like
            attention that no adapter records (:func:`attention_lookalikes`);
            ``keep_norms=True`` with a Hugging Face module among the recorded ones.
            Inside the block: with ``keep_norms=True``, an :class:`AttentionProbs`
            marker called without ``values``; a module of the model calls
            ``scaled_dot_product_attention`` outside a recorded module (with
            ``modules=None``); a Hugging Face module computes its attention without a
            softmax or SDPA call the recorder sees (e.g. ``flex_attention``), or more
            than one. On exit: nothing was recorded (no recorded module ran).
            On construction: a bad ``layers``/``heads``/``rows`` setting, or ``heads``
            with ``keep_norms`` or ``"mean"`` with ``keep_grad``; on the call that has
            no such head or row, a ``ValueError`` naming the entry.

    Inside the block ``torch.backends.mha`` fast path is disabled (globally), because
    the fused kernels it picks (``need_weights=False``, whole encoder layers) never
    expose the probabilities, and a torch function mode watches for SDPA calls. Where it
    can (eval self-attention without dropout, no ``keep_grad``/``keep_norms`` under
    autograd, masks that only keep or drop keys and leave each row a key; see
    :func:`_mha_fused`), ``nn.MultiheadAttention`` runs torch's fused kernel asked for
    per-head weights, the same call a manual ``need_weights=True`` forward makes;
    otherwise it is computed explicitly. Numerically the recorded model equals the plain
    one to float rounding; dropout draws the same random numbers as torch's own
    attention, so seeded train-mode runs are reproduced as well (for
    ``nn.MultiheadAttention`` and eager Hugging Face attention).
    """

    def __init__(self, model: nn.Module, *, modules: Iterable[str] | str | None = None,
                 keep_grad: bool = False, keep_norms: bool = False,
                 layers: Iterable[int] | str | None = None, heads: Iterable[int] | str | None = None,
                 rows: Iterable[int] | str | None = None,
                 edit: Callable[[str, int, torch.Tensor], torch.Tensor] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(keep_grad, bool):
            raise TypeError(f"keep_grad must be True or False, got {keep_grad!r}")
        if not isinstance(keep_norms, bool):
            raise TypeError(f"keep_norms must be True or False, got {keep_norms!r}")
        if modules is not None and not isinstance(modules, str):
            if isinstance(modules, Iterable):
                modules = tuple(modules)
            if not isinstance(modules, tuple) or not all(isinstance(n, str) for n in modules):
                raise TypeError(f"modules must be a module name or an iterable of names (as in "
                                f"model.named_modules()), got {modules!r}")
        self.layers = selection_spec(layers, "layers", ("all",))
        self.heads = selection_spec(heads, "heads", ("all", "mean"))
        self.rows = selection_spec(rows, "rows", ("all", "cls"))
        if self.heads == "mean" and keep_grad:
            raise ValueError("heads='mean' with keep_grad=True: the mean over heads has no gradient of its own; "
                             "keep the heads (heads=None or a list) and average their gradients yourself")
        if self.heads != "all" and keep_norms:
            raise ValueError(f"heads={heads!r} with keep_norms=True: norms are taken over every head; "
                             "select heads or record norms, not both")
        if edit is not None and not callable(edit):
            raise TypeError(f"edit must be None or a callable edit(name, call, probs_bhqk) -> probs_bhqk, "
                            f"got {type(edit).__name__}")
        self.edit = edit
        self.model = model
        self.keep_grad = keep_grad
        self.keep_norms = keep_norms
        self._targets = _select_targets(model, modules)
        if keep_norms:
            for name, module in self._targets:
                if _hf_kind(module) is not None:
                    raise ValueError(f"keep_norms=True: module {name!r} ({type(module).__name__}) is a Hugging Face "
                                     "attention module, whose norms cannot be recorded; norms are recorded for "
                                     "nn.MultiheadAttention and AttentionProbs markers that pass values "
                                     "(pass modules=[...] to record only those)")
        # the model's modules that could call SDPA unrecorded, to name the caller of such a
        # call (None: no watch; without HF modules, then no torch function mode either)
        watch = {id(m): (n, m) for n, m in model.named_modules() if not _sdpa_free(m)} if modules is None else {}
        self._watch = watch or None
        self._attentions: list[torch.Tensor] = []
        self._names: list[str] = []
        self._norms: list[torch.Tensor] = []   # keep_norms: [B, Lq, Lk] per entry
        self._grad_slots: list[list] = []      # one [grad or None, needs_grad] per entry
        self._calls: list[int] = []            # call index of each held entry (with a layers selection)
        self._n_calls = 0                      # attention calls since __enter__ or clear()
        self._restore: list[Callable[[], None]] = []
        self._recorded = 0                     # calls recorded since __enter__ (clear() keeps it)
        self._active = False

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "AttentionRecorder":
        if self._active:
            raise RuntimeError("this AttentionRecorder is already active (entered twice)")
        try:
            mode = None                        # torch function mode: HF modules, SDPA watch
            if self._watch is not None or any(_hf_kind(m) is not None for _, m in self._targets):
                mode = _Intercept(self._watch)
                mode.__enter__()
                self._restore.append(lambda: mode.__exit__(None, None, None))
            for name, module in self._targets:
                if isinstance(module, nn.MultiheadAttention):
                    self._patch_mha(name, module)
                elif isinstance(module, AttentionProbs):
                    handle = module.register_forward_hook(self._probs_hook(name), with_kwargs=True)
                    self._restore.append(handle.remove)
                else:
                    self._patch_traced(name, module, mode)
            if any(isinstance(m, nn.MultiheadAttention) for _, m in self._targets):
                previous = torch.backends.mha.get_fastpath_enabled()
                torch.backends.mha.set_fastpath_enabled(False)
                self._restore.append(lambda: torch.backends.mha.set_fastpath_enabled(previous))
        except BaseException:
            self._undo()
            raise
        self._recorded = 0
        if self.layers != "all":               # call indices restart: earlier entries would be ambiguous
            self.clear()
        self._n_calls = 0
        self._active = True
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._undo()
        self._active = False
        if exc_type is None and self._recorded == 0:
            listing = ", ".join(repr(n) for n, _ in self._targets)
            raise ValueError(f"nothing was recorded: none of the recorded modules ({listing}) ran inside "
                             f"the with block; call the model inside `with AttentionRecorder(...)`")

    def _undo(self) -> None:
        while self._restore:
            self._restore.pop()()

    def _check_unpatched(self, name: str, module: nn.Module) -> None:
        if "forward" in module.__dict__:
            raise ValueError(f"module {name!r} already has a patched forward (is another "
                             "AttentionRecorder active on it?); nested recorders on the "
                             "same module are not supported")

    def _patch_mha(self, name: str, mha: nn.MultiheadAttention) -> None:
        self._check_unpatched(name, mha)
        record = self._recorder_for(name)

        def forward(query, key, value, key_padding_mask=None, need_weights=True,
                    attn_mask=None, average_attn_weights=True, is_causal=False):
            # the fused kernel gives the probabilities but no graph through them, nor values,
            # and has computed its output before an edit could change them
            if self.edit is None and not self.keep_norms and not (self.keep_grad and torch.is_grad_enabled()):
                fused = _mha_fused(mha, record, query, key, value, key_padding_mask,
                                   need_weights, attn_mask, average_attn_weights, is_causal)
                if fused is not None:
                    return fused
            return _mha_forward(mha, record, query, key, value, key_padding_mask,
                                need_weights, attn_mask, average_attn_weights, is_causal)

        mha.forward = forward
        self._restore.append(lambda: mha.__dict__.pop("forward", None))

    def _patch_traced(self, name: str, module: nn.Module, mode: "_Intercept") -> None:
        """A Hugging Face module: its own forward runs while ``mode`` records its one
        softmax or SDPA call (see :class:`_Call`)."""
        self._check_unpatched(name, module)
        record = self._recorder_for(name)
        original = type(module).forward.__get__(module)

        @functools.wraps(original)
        def forward(*args, **kwargs):
            call = _Call(name, module, record)
            mode.calls.append(call)
            try:
                out = original(*args, **kwargs)
            finally:
                mode.calls.pop()
            call.finish()
            return out

        module.forward = forward
        self._restore.append(lambda: module.__dict__.pop("forward", None))

    def _probs_hook(self, name: str):
        record = self._recorder_for(name)

        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4 or not output.is_floating_point():
                raise ValueError(f"AttentionProbs module {name!r} got "
                                 f"{getattr(output, 'shape', type(output).__name__)} "
                                 f"{getattr(output, 'dtype', '')}; expected a floating-point [B, H, Lq, Lk] "
                                 "tensor of softmax probabilities")
            if not self.keep_norms:
                return record(output)
            values = kwargs.get("values", args[1] if len(args) > 1 else None)
            if values is None:
                raise ValueError(f"AttentionProbs module {name!r} was called without values, so "
                                 "keep_norms=True cannot compute its norms; pass each head's output-space "
                                 "values [B, H, Lk, E]: `self.attn_probs(probs, values=head_outputs(v_bhkd, "
                                 "out_proj.weight))` (attnlab.head_outputs)")
            if callable(values):
                with torch.no_grad():
                    values = values()
            b, h, _, lk = output.shape
            if not isinstance(values, torch.Tensor) or values.dim() != 4 or tuple(values.shape[:3]) != (b, h, lk):
                raise ValueError(f"AttentionProbs module {name!r} got values of shape "
                                 f"{tuple(getattr(values, 'shape', ())) or type(values).__name__}; expected "
                                 f"[B, H, Lk, E] = [{b}, {h}, {lk}, E] for probabilities {tuple(output.shape)}")
            return record(output, values)

        return hook

    # ------------------------------------------------------------------ recording
    def _recorder_for(self, name: str) -> _Record:
        """A function that stores ``probs`` under ``name`` and returns the tensor the
        module must continue with (``probs`` itself, or a grad-requiring leaf)."""

        def record(probs: torch.Tensor, values=None) -> torch.Tensor:
            # values: [B, H, Lk, E] head outputs f^h(x_j), or a callable giving them
            # (computed only here, with keep_norms, so recording without it costs nothing)
            self._recorded += 1
            call, self._n_calls = self._n_calls, self._n_calls + 1
            if self._may_keep(call):
                probs = keep_entry(call, probs, values)
            return probs if self.edit is None else self._edited(name, call, probs)

        def keep_entry(call: int, probs: torch.Tensor, values) -> torch.Tensor:
            take = functools.partial(take_heads_rows, heads=self.heads, rows=self.rows, key=name)
            if self.keep_norms:
                if callable(values):
                    with torch.no_grad():
                        values = values()
                self._norms.append(take_heads_rows(_norms(probs, values).unsqueeze(-3), rows=self.rows,
                                                   key=name).squeeze(-3))
            self._attentions.append(take(probs.detach()))
            self._names.append(name)
            self._calls.append(call)
            slot = [None, False]
            self._grad_slots.append(slot)
            self._forget_unselectable()
            if self.keep_grad and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
                if not probs.requires_grad:      # frozen model: start the graph here
                    probs = probs.detach().requires_grad_()
                slot[1] = True

                def keep(grad: torch.Tensor) -> None:
                    grad = take(grad.detach())
                    slot[0] = grad if slot[0] is None else slot[0] + grad

                probs.register_hook(keep)
            return probs

        return record

    def _edited(self, name: str, call: int, probs: torch.Tensor) -> torch.Tensor:
        out = self.edit(name, call, probs)
        if not isinstance(out, torch.Tensor) or out.shape != probs.shape:
            raise ValueError(f"edit({name!r}, {call}, probs) returned "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}; "
                             f"expected a tensor shaped like probs {tuple(probs.shape)}")
        return out

    def _may_keep(self, call: int) -> bool:
        """Whether call ``call`` can be among the selected ``layers`` (a negative index
        is decided only when the calls end: the last ``max(-i)`` calls are held)."""
        return self.layers == "all" or call in self.layers or any(i < 0 for i in self.layers)

    def _forget_unselectable(self) -> None:
        if self.layers == "all":
            return
        window = max([-i for i in self.layers if i < 0], default=0)
        keep = [i for i, c in enumerate(self._calls) if c in self.layers or c >= self._n_calls - window]
        if len(keep) < len(self._calls):
            for name in ("_attentions", "_names", "_norms", "_grad_slots", "_calls"):
                items = getattr(self, name)
                if items:
                    setattr(self, name, [items[i] for i in keep])

    def _selected(self, items: list) -> list:
        """The held entries that the ``layers`` selection keeps, now that the calls so far are known."""
        if self.layers == "all":
            return items
        n = self._n_calls
        return [item for item, c in zip(items, self._calls) if c in self.layers or c - n in self.layers]

    # ------------------------------------------------------------------ results
    @property
    def attentions(self) -> list[torch.Tensor]:
        """``[B, H, Lq, Lk]`` per recorded entry (``H``, ``Lq`` after the heads/rows selection)."""
        return self._selected(self._attentions)

    @property
    def names(self) -> list[str]:
        return self._selected(self._names)

    @property
    def norms(self) -> list[torch.Tensor]:
        return self._selected(self._norms)

    @property
    def calls(self) -> list[int]:
        """The call index of each entry (its position among every attention call since the
        block started or the last :meth:`clear`: ``range(len(self))`` without ``layers``)."""
        return self._selected(self._calls) if self.layers != "all" else list(range(len(self._attentions)))

    @property
    def gradients(self) -> list[torch.Tensor]:
        """``d loss / d attentions[i]`` for every entry, after ``backward()``.

        An entry that the loss does not depend on gets zeros. Gradients accumulate
        over several ``backward()`` calls, like ``.grad``; :meth:`clear` resets them.
        """
        if not self.keep_grad:
            raise RuntimeError("gradients are only kept with AttentionRecorder(..., keep_grad=True)")
        slots = self._selected(self._grad_slots)
        for i, (name, (_, needs_grad)) in enumerate(zip(self.names, slots)):
            if not needs_grad:
                raise RuntimeError(f"entry {i} ({name!r}) was recorded with autograd off "
                                   "(torch.no_grad / inference_mode): it has no gradient")
        if not slots or all(g is None for g, _ in slots):
            raise RuntimeError("no gradient yet: call backward() on a loss computed from "
                               "the recorded forward pass first")
        return [torch.zeros_like(a) if g is None else g
                for a, (g, _) in zip(self.attentions, slots)]

    def by_name(self) -> dict[str, list[torch.Tensor]]:
        """``{module name: [attention of each call, in call order]}``."""
        out: dict[str, list[torch.Tensor]] = {}
        for name, att in zip(self.names, self.attentions):
            out.setdefault(name, []).append(att)
        return out

    def clear(self) -> None:
        """Forget all entries (and gradients, norms), e.g. between batches."""
        self._attentions = []
        self._names = []
        self._norms = []
        self._grad_slots = []
        self._calls = []
        self._n_calls = 0

    def __len__(self) -> int:
        return len(self.attentions)

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return (f"AttentionRecorder({len(self._targets)} modules, {len(self)} entries, "
                f"keep_grad={self.keep_grad}, {state})")


# ---------------------------------------------------------------------- Hugging Face adapters
_SDPA = F.scaled_dot_product_attention
_SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax, torch._softmax})


def _hf_kind(module: nn.Module) -> str | None:
    """``"dispatch"``: a ``transformers`` module whose forward picks its attention from
    ``ALL_ATTENTION_FUNCTIONS`` (eager → one softmax, sdpa → one SDPA call);
    ``"timesformer"``: ``TimesformerSelfAttention`` (one ``.softmax``); else None.
    Recognised by class and code, so ``transformers`` need not be installed."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.models."):
        return None
    if cls.__name__ == "TimesformerSelfAttention" and isinstance(getattr(module, "qkv", None), nn.Linear):
        return "timesformer"
    code = getattr(inspect.unwrap(cls.forward), "__code__", None)
    if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
        return "dispatch"
    return None


class _Call:
    """One forward call of a Hugging Face module: records its one attention softmax."""

    def __init__(self, name: str, module: nn.Module, record: _Record):
        self.name, self.module, self.record, self.count = name, module, record, 0

    def _where(self) -> str:
        impl = getattr(getattr(self.module, "config", None), "_attn_implementation", None)
        return f"{self.name!r} ({type(self.module).__name__}" + (f", attn_implementation={impl!r})" if impl else ")")

    def _take(self, probs: torch.Tensor) -> torch.Tensor:
        self.count += 1
        if self.count > 1:
            raise ValueError(f"{self._where()} computed a second softmax or scaled_dot_product_attention in "
                             "one call; expected exactly one attention per call")
        if probs.dim() != 4:
            raise ValueError(f"{self._where()} computed attention probabilities of shape {tuple(probs.shape)}; "
                             "expected [B, H, Lq, Lk]")
        return self.record(probs)

    def softmax(self, func, args, kwargs) -> torch.Tensor:
        """eager: the softmax output is the probabilities; dropout follows in the module."""
        return self._take(func(*args, **kwargs))

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False) -> torch.Tensor:
        """sdpa: ``F.scaled_dot_product_attention`` as documented by torch, explicitly."""
        if enable_gqa:
            key = key.repeat_interleave(query.size(-3) // key.size(-3), -3)
            value = value.repeat_interleave(query.size(-3) // value.size(-3), -3)
        probs = self._take(_sdpa_probs(query, key, attn_mask, is_causal, scale))
        dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0 else probs
        return torch.matmul(dropped, value)

    def finish(self) -> None:
        if self.count == 0:
            raise ValueError(f"{self._where()} ran without a softmax or scaled_dot_product_attention call the "
                             "recorder can see, so its attention cannot be recorded; load the model with "
                             "attn_implementation='eager' or 'sdpa'")


def _sdpa_probs(query, key, attn_mask, is_causal: bool, scale: float | None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask)`` with torch's SDPA semantics: a bool mask is True
    where a key takes part, a float mask is added, ``is_causal`` keeps ``j ≤ i``
    (top-left aligned); a fully masked row gets zeros, as torch's SDPA gives."""
    if is_causal:
        if attn_mask is not None:
            raise RuntimeError("scaled_dot_product_attention: an explicit attn_mask should not be set "
                               "when is_causal=True")
        attn_mask = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~attn_mask, float("-inf"))
    return _attention_probs(query, key, attn_mask, need_weights=False, scale=scale)


class _Intercept(TorchFunctionMode):
    """Active while a recorder is: the innermost running Hugging Face module (``calls``)
    has its softmax / SDPA call recorded; with ``watch`` (every module of the model, by
    id) an SDPA call from any other module of the model raises, naming the module."""

    def __init__(self, watch: dict[int, tuple[str, nn.Module]] | None):
        super().__init__()
        self.calls: list[_Call] = []
        self.watch = watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.calls:
            if func is _SDPA:
                return self.calls[-1].sdpa(*args, **kwargs)
            if func in _SOFTMAX:
                return self.calls[-1].softmax(func, args, kwargs)
        elif func is _SDPA and self.watch is not None:
            caller = _calling_module(self.watch)
            if caller is not None:
                name, module = caller
                where = f"module {name!r}" if name else "the model"
                raise ValueError(
                    f"{where} ({type(module).__name__}) calls scaled_dot_product_attention, which never exposes "
                    "the attention probabilities, and no adapter records it. " + _HOW_TO_RECORD)
        return func(*args, **kwargs)


def _sdpa_free(module: nn.Module) -> bool:
    """Whether ``module``'s own code is known never to call SDPA unrecorded: torch.nn's
    layers (the only one that calls it, nn.MultiheadAttention, takes its recorded path
    while a recorder with every module is active) and attnlab's own models and markers.
    A subclass defined anywhere else is watched (its forward may call anything)."""
    where = type(module).__module__
    return where.startswith(("torch.nn.modules.", "attnlab.models.")) or where == __name__


def _calling_module(watch: dict[int, tuple[str, nn.Module]]) -> tuple[str, nn.Module] | None:
    """The innermost module of the model on the Python call stack (its ``forward`` or
    ``Module.__call__`` frame), or None when the call is not the model's."""
    frame = sys._getframe(2)
    while frame is not None:
        obj = frame.f_locals.get("self")
        hit = watch.get(id(obj)) if obj is not None else None
        if hit is not None and hit[1] is obj:
            return hit
        frame = frame.f_back
    return None


_HOW_TO_RECORD = ("To record it, compute the probabilities explicitly and pass them through an "
                  "attnlab.AttentionProbs marker right after the softmax, before dropout "
                  "(`self.attn_probs = AttentionProbs()`; `probs = self.attn_probs(scores.softmax(-1))`; "
                  "`out = self.drop(probs) @ v`), or use nn.MultiheadAttention; or pass modules=[...] "
                  "to record only the recordable modules.")


# ---------------------------------------------------------------------- discovery
_SINGLE_PROJECTIONS = ("qkv", "to_qkv", "qkv_proj", "Wqkv", "query_key_value", "c_attn", "in_proj")
_PROJECTION_SETS = (("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
                    ("to_q", "to_k", "to_v"), ("wq", "wk", "wv"), ("query_proj", "key_proj", "value_proj"))


def _projections(module: nn.Module) -> tuple[str, ...]:
    """The q/k/v (or fused qkv) projections a module holds as submodules or parameters."""
    def has(attr: str) -> bool:
        return attr in module._modules or attr in module._parameters

    for names in _PROJECTION_SETS:
        if all(has(n) for n in names):
            return names
    return tuple(n for n in _SINGLE_PROJECTIONS if has(n))[:1]


def _looks_like_attention(name: str, module: nn.Module) -> str:
    """Why ``module`` looks like attention: an attention name (class or attribute name
    with 'attn'/'attention') with q/k/v or qkv projections, or a ``forward`` that calls
    ``scaled_dot_product_attention``; "" otherwise."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    if code is not None and "scaled_dot_product_attention" in code.co_names:
        return "calls scaled_dot_product_attention"
    named = any(w in type(module).__name__.lower() or w in name.rsplit(".", 1)[-1].lower()
                for w in ("attn", "attention"))
    projections = _projections(module) if named else ()
    return f"projections {', '.join(projections)}" if projections else ""


def _kind(module: nn.Module) -> str | None:
    """The adapter recording ``module`` ("mha", "probs", "dispatch", "timesformer"), or None."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha" if type(module).forward is nn.MultiheadAttention.forward else None
    if isinstance(module, AttentionProbs):
        return "probs"
    return _hf_kind(module)


def _contains(outer: str, inner: str) -> bool:
    return outer == inner or outer == "" or inner.startswith(outer + ".")


def _lookalikes(model: nn.Module, recordable: list[str]) -> dict[str, str]:
    """``{name: "ClassName: why"}`` of attention-looking modules that no recorded
    module covers (neither the module itself, nor one inside it or around it)."""
    found = {}
    for name, module in model.named_modules():
        why = _looks_like_attention(name, module)
        if why and not any(_contains(name, r) or _contains(r, name) for r in recordable):
            found[name] = f"{type(module).__name__}: {why}"
    return found


def attention_lookalikes(model: nn.Module) -> list[str]:
    """Modules of ``model`` that look like attention — a class or attribute name with
    'attn'/'attention' and q/k/v (``q``/``query``/``q_proj``/...) or fused ``qkv``
    projections, or a ``forward`` whose code calls ``scaled_dot_product_attention`` —
    but that no adapter of :class:`AttentionRecorder` records (neither the module, nor
    a recordable module inside or around it). Each as
    ``"name (ClassName: projections q, k, v)"`` or ``"name (ClassName: calls
    scaled_dot_product_attention)"`` (``<model>`` for the model itself); empty when
    everything attention-like is recordable. ``AttentionRecorder(model)`` raises on
    entry when this is not empty."""
    recordable = [n for n, m in model.named_modules() if _kind(m) is not None]
    return [f"{n or '<model>'} ({why})" for n, why in _lookalikes(model, recordable).items()]


def recordable_modules(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that :class:`AttentionRecorder` records."""
    return [n for n, m in model.named_modules() if _kind(m) is not None]


def _select_targets(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
    """Recordable ``(name, module)`` pairs of ``model``, restricted to ``modules``."""
    recordable: list[tuple[str, nn.Module]] = []
    unrecordable: dict[str, str] = {}            # name -> reason
    for name, m in model.named_modules():
        if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod"):
            where = f"{name!r}" if name else "the model"
            raise ValueError(f"{where} is compiled with torch.compile; attention cannot be "
                             f"recorded through compiled code: record `{name or 'model'}._orig_mod` "
                             "instead")
        if isinstance(m, torch.jit.ScriptModule):
            if getattr(m, "original_name", "") in _RECORDABLE_NAMES:
                unrecordable[name] = "is a TorchScript module (scripted or traced); record the eager module instead"
        elif isinstance(m, nn.MultiheadAttention) and _kind(m) is None:
            if any(isinstance(c, AttentionProbs) for c in m.modules()):
                continue                     # recorded through its own marker
            unrecordable[name] = (f"is a {type(m).__name__}, a subclass of nn.MultiheadAttention "
                                  "that overrides forward(); call AttentionProbs on its "
                                  "probabilities instead")
        elif _kind(m) is not None:
            recordable.append((name, m))

    listing = ", ".join(repr(n) for n, _ in recordable) or "none"
    if modules is None:
        if unrecordable:
            name, why = next(iter(unrecordable.items()))
            raise ValueError(f"attention module {name!r} {why} (recordable modules: {listing}; "
                             "pass modules=[...] to record only those)")
        looks = _lookalikes(model, [n for n, _ in recordable])
        if looks:
            found = ", ".join(f"{n or '<model>'!r} ({why})" for n, why in looks.items())
            raise ValueError(f"{type(model).__name__} has modules that look like attention but that no adapter "
                             f"records: {found}; recordable modules: {listing}. AttentionRecorder records "
                             "nn.MultiheadAttention, attnlab.AttentionProbs markers and Hugging Face "
                             "BERT/RoBERTa/ViT-style and TimeSformer attention. "
                             + _HOW_TO_RECORD.replace("record it", "record them"))
        if not recordable:
            raise ValueError(f"{type(model).__name__} has no nn.MultiheadAttention, AttentionProbs or Hugging Face "
                             "attention module (BERT/RoBERTa/ViT-style or TimeSformer) to record")
        return recordable

    wanted = [modules] if isinstance(modules, str) else list(modules)
    if not wanted:
        raise ValueError(f"modules is empty; recordable modules: {listing}")
    canonical = {id(m): n for n, m in recordable}      # a shared module records under its first name
    all_modules = dict(model.named_modules(remove_duplicate=False))
    keep = set()
    for name in wanted:
        if name in unrecordable:
            raise ValueError(f"module {name!r} {unrecordable[name]}")
        if name not in all_modules:
            raise ValueError(f"modules: {name!r} is not a module of the model; "
                             f"recordable modules: {listing}")
        if id(all_modules[name]) not in canonical:
            raise ValueError(f"modules: {name!r} is a {type(all_modules[name]).__name__}, not an "
                             f"attention module; recordable modules: {listing}")
        keep.add(canonical[id(all_modules[name])])
    return [(n, m) for n, m in recordable if n in keep]


# ---------------------------------------------------------------------- MHA maths
def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype, *, allowed_true: bool = False
                  ) -> torch.Tensor | None:
    """A mask as scores to add, in ``dtype``: bool ``True`` = masked (torch's polarity), or
    with ``allowed_true`` ``True`` = may attend (SDPA's and Hugging Face's), becomes
    ``-inf``/0; a float mask is additive already; None stays None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        masked = ~mask if allowed_true else mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(masked, float("-inf"))
    return mask.to(dtype)


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Bool masks (True = masked) become additive ``-inf`` masks, as torch does; a float
    mask is kept in its own dtype (torch adds it as it is)."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating masks are supported, got {mask.dtype}")
    return additive_mask(mask, dtype)


def _mha_forward(mha: nn.MultiheadAttention, record: _Record, query, key, value,
                 key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
    """``nn.MultiheadAttention.forward`` computed explicitly, recording the
    probabilities between softmax and dropout. Returns what MHA.forward returns."""
    if query.is_nested or key.is_nested or value.is_nested:
        raise ValueError("AttentionRecorder does not support NestedTensor inputs")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    self_attn = query is key and key is value           # before the layout change makes new tensors
    batched = query.dim() == 3
    query, key, value, key_padding_mask = _batch_first(mha, batched, query, key, value, key_padding_mask)
    bsz, tgt_len, embed_dim = query.shape
    if embed_dim != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {embed_dim}")

    q_bhld, k_bhsd, v_bhsd, extra = _split_heads(mha, *_in_projection(mha, query, key, value, self_attn))
    size_bhls = (bsz, mha.num_heads, tgt_len, k_bhsd.shape[2])
    mask = _merged_mask(attn_mask, key_padding_mask, query.dtype, size_bhls, extra)
    probs_bhls = record(_attention_probs(q_bhld, k_bhsd, mask, need_weights),
                        lambda: head_outputs(v_bhsd, mha.out_proj.weight))
    dropped_bhls = (F.dropout(probs_bhls, p=mha.dropout, training=mha.training) if mha.dropout > 0
                    else probs_bhls)
    out = _out_projection(mha, dropped_bhls, v_bhsd, batched)
    if not need_weights:
        return out, None
    weights = dropped_bhls.mean(dim=1) if average_attn_weights else dropped_bhls
    return out, (weights.squeeze(0) if not batched else weights)


_FUSED_DTYPES = (torch.float32, torch.float64)
_fused_device = _torch_activation._check_arg_device     # the devices MHA's own fast path accepts


def _mha_fused(mha: nn.MultiheadAttention, record: _Record, query, key, value, key_padding_mask,
               need_weights, attn_mask, average_attn_weights, is_causal):
    """``nn.MultiheadAttention.forward`` through torch's fused inference kernel
    ``torch._native_multi_head_attention`` (the kernel MHA's own fast path calls), asked
    for per-head weights: ``[B, H, L, L]`` softmax probabilities (the kernel has no
    dropout), recorded as they are. Returns what MHA.forward returns, or None when the
    kernel does not apply and :func:`_mha_forward` must compute it.

    It applies to self-attention (``query is key is value``, batched or not, either
    layout) without dropout (eval or ``p = 0``), an even number of heads, one packed
    in-projection and both biases, no ``bias_k``/``add_zero_attn``, float32/float64
    plain tensors on a device MHA's fast path accepts, no autocast, no autograd through
    the module (grad off or nothing requiring grad), and masks that are bool or float
    with only 0 / ``-inf`` (the kernel reads a mask as masked/kept, not additively) and
    leave every query row at least one key (a fully masked row's result depends on
    ``need_weights`` in torch; the explicit path keeps those semantics)."""
    if not (query is key and key is value) or query.dim() not in (2, 3):
        return None
    if mha.training and mha.dropout > 0:
        return None
    w_in, b_in, w_out, b_out = mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias
    if (w_in is None or b_in is None or b_out is None or mha.bias_k is not None or mha.bias_v is not None
            or mha.add_zero_attn or not mha._qkv_same_embed_dim):
        return None
    tensors = (query, w_in, b_in, w_out, b_out)
    if (query.dtype not in _FUSED_DTYPES or any(t.dtype != query.dtype for t in tensors)
            or any(type(t) not in (torch.Tensor, nn.Parameter) for t in tensors)
            or not all(_fused_device(t) and t.device == query.device for t in tensors)
            or query.is_nested or query.shape[-1] != mha.embed_dim or torch.is_autocast_enabled()
            or mha.num_heads % 2
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
        return None
    if is_causal and attn_mask is None:
        return None                                     # the explicit path raises torch's error
    batched = query.dim() == 3
    x_ble = query if not batched or mha.batch_first else query.transpose(0, 1)
    if not batched:
        x_ble = x_ble.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    merged = _fused_mask(mha, attn_mask, key_padding_mask, x_ble)
    if merged is None:
        return None
    mask, mask_type = merged
    out_ble, probs_bhll = torch._native_multi_head_attention(
        x_ble, x_ble, x_ble, mha.embed_dim, mha.num_heads, w_in, b_in, w_out, b_out,
        mask, True, False, mask_type)
    probs_bhll = record(probs_bhll)
    if not batched:
        out = out_ble.squeeze(0)
    else:
        out = out_ble if mha.batch_first else out_ble.transpose(0, 1)
    if not need_weights:
        return out, None
    weights = probs_bhll.mean(dim=1) if average_attn_weights else probs_bhll
    return out, (weights.squeeze(0) if not batched else weights)


def _fused_mask(mha: nn.MultiheadAttention, attn_mask, key_padding_mask, x_ble: torch.Tensor):
    """``(mask, mask_type)`` for ``torch._native_multi_head_attention`` (``(None, None)``;
    ``key_padding_mask [B, L]`` as type 1; with ``attn_mask`` ``[L, L]`` or ``[B·H, L, L]``
    both merged into ``[B, H, L, L]``, type 2), as float 0 / ``-inf``; None when the
    kernel cannot take them: a float mask with other values, a shape the explicit path
    must judge, or a query row with every key masked."""
    if attn_mask is None and key_padding_mask is None:
        return None, None
    bsz, tgt_len, _ = x_ble.shape
    masks = []
    for m in (attn_mask, key_padding_mask):
        if m is None:
            masks.append(None)
            continue
        if m.dtype == torch.bool:
            m = _float_mask(m, x_ble.dtype)
        elif m.dtype != x_ble.dtype or not bool(((m == 0) | torch.isneginf(m)).all()):
            return None
        masks.append(m)
    am, kpm = masks
    if kpm is not None and tuple(kpm.shape) != (bsz, tgt_len):
        return None
    if am is None:
        if bool(torch.isneginf(kpm).all(dim=-1).any()):
            return None
        return kpm, 1
    if am.dim() == 2 and tuple(am.shape) == (tgt_len, tgt_len):
        am = am.view(1, 1, tgt_len, tgt_len)
    elif am.dim() == 3 and tuple(am.shape) == (bsz * mha.num_heads, tgt_len, tgt_len):
        am = am.view(bsz, mha.num_heads, tgt_len, tgt_len)
    else:
        return None
    merged = am if kpm is None else am + kpm.view(bsz, 1, 1, tgt_len)
    if bool(torch.isneginf(merged).all(dim=-1).any()):
        return None
    return merged.expand(bsz, mha.num_heads, tgt_len, tgt_len), 2


def _batch_first(mha: nn.MultiheadAttention, batched: bool, query, key, value, key_padding_mask):
    """Inputs ``[L, B, E]`` (not ``batch_first``) or unbatched ``[L, E]`` → ``[B, L, E]``;
    an unbatched ``key_padding_mask [S]`` → ``[1, S]``."""
    if batched and not mha.batch_first:                 # [L, B, E] -> [B, L, E]
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    elif not batched:                                   # [L, E] -> [1, L, E]
        query, key, value = (t.unsqueeze(0) for t in (query, key, value))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    return query, key, value, key_padding_mask


def _in_projection(mha: nn.MultiheadAttention, query, key, value, self_attn: bool):
    """The in-projections: ``q_ble [B, L, E]``, ``k_bse`` and ``v_bse [B, S, E]``."""
    bias = mha.in_proj_bias
    b_q, b_k, b_v = bias.chunk(3) if bias is not None else (None, None, None)
    if not mha._qkv_same_embed_dim:
        return (F.linear(query, mha.q_proj_weight, b_q), F.linear(key, mha.k_proj_weight, b_k),
                F.linear(value, mha.v_proj_weight, b_v))
    if self_attn:
        return F.linear(query, mha.in_proj_weight, bias).chunk(3, dim=-1)
    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def _split_heads(mha: nn.MultiheadAttention, q_ble, k_bse, v_bse):
    """``q_bhld [B, H, L, d]``, ``k_bhsd`` and ``v_bhsd [B, H, S', d]`` with the key columns
    of ``add_bias_kv`` / ``add_zero_attn`` appended (``S' = S + extra``), and ``extra``."""
    bsz, tgt_len, embed_dim = q_ble.shape
    heads, head_dim = mha.num_heads, mha.head_dim
    extra = 0
    if mha.bias_k is not None:
        k_bse = torch.cat([k_bse, mha.bias_k.expand(bsz, 1, embed_dim)], dim=1)
        v_bse = torch.cat([v_bse, mha.bias_v.expand(bsz, 1, embed_dim)], dim=1)
        extra += 1
    q_bhld = q_ble.reshape(bsz, tgt_len, heads, head_dim).transpose(1, 2)
    k_bhsd = k_bse.reshape(bsz, -1, heads, head_dim).transpose(1, 2)
    v_bhsd = v_bse.reshape(bsz, -1, heads, head_dim).transpose(1, 2)
    if mha.add_zero_attn:
        zeros = k_bhsd.new_zeros(bsz, heads, 1, head_dim)
        k_bhsd, v_bhsd = torch.cat([k_bhsd, zeros], dim=2), torch.cat([v_bhsd, zeros], dim=2)
        extra += 1
    return q_bhld, k_bhsd, v_bhsd, extra


def _merged_mask(attn_mask, key_padding_mask, dtype: torch.dtype, size_bhls: tuple[int, int, int, int],
                 extra: int) -> torch.Tensor | None:
    """``attn_mask`` and ``key_padding_mask`` merged additively into one
    ``[B or 1, H or 1, L, S']`` float mask (zero columns for the ``extra`` keys), or None."""
    bsz, heads, tgt_len, src_len = size_bhls
    mask = _float_mask(attn_mask, dtype)
    if mask is not None:
        if mask.dim() == 3:                             # [B*H, L, S] (or [H, L, S] unbatched)
            mask = mask.reshape(bsz, heads, tgt_len, -1)
        elif mask.dim() != 2:
            raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
        if mask.shape[-1] + extra != src_len or mask.shape[-2] != tgt_len:
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} does not match "
                               f"target length {tgt_len} and source length {src_len - extra}")
        mask = F.pad(mask, (0, extra)) if extra else mask
    kpm = _float_mask(key_padding_mask, dtype)
    if kpm is not None:
        if tuple(kpm.shape) != (bsz, src_len - extra):
            raise AssertionError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)} "
                                 f"does not match (batch, source length) = {(bsz, src_len - extra)}")
        kpm = F.pad(kpm, (0, extra)) if extra else kpm
        kpm = kpm[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    return mask


def _attention_probs(q_bhld, k_bhsd, mask, need_weights: bool, scale: float | None = None) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask)`` (``scale`` default ``1/√d``; ``mask`` additive):
    ``[B, H, L, S']`` probabilities, before dropout."""
    scale = 1.0 / math.sqrt(q_bhld.shape[-1]) if scale is None else scale
    scores = torch.matmul(q_bhld, k_bhsd.transpose(-2, -1)).mul_(scale)
    if mask is not None:
        scores = scores.add_(mask)
    probs = torch.softmax(scores, dim=-1)
    if mask is not None and not need_weights:
        # torch's need_weights=False path (SDPA) gives fully masked rows zero weight
        # instead of NaN; need_weights=True keeps the NaN, and so do we.
        dead = torch.isneginf(mask).all(dim=-1, keepdim=True)
        if bool(dead.any()):
            probs = probs.masked_fill(dead, 0.0)
    return probs


def _out_projection(mha: nn.MultiheadAttention, dropped_bhls, v_bhsd, batched: bool) -> torch.Tensor:
    """Weighted values through ``out_proj``, in the caller's layout (``[L, B, E]``,
    ``[B, L, E]`` with ``batch_first``, or ``[L, E]`` unbatched)."""
    bsz, _, tgt_len, _ = dropped_bhls.shape
    out = torch.matmul(dropped_bhls, v_bhsd)                                 # [B, H, L, d]
    # Torch lays the output out as a contiguous [L, B, E] (transposed to [B, L, E] for
    # batch_first). Keep that memory layout: a following dropout draws its random
    # numbers in memory order, so the layout decides which elements it drops.
    out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, mha.embed_dim)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(tgt_len, bsz, mha.embed_dim)
    if not batched:
        return out.squeeze(1)
    return out.transpose(0, 1) if mha.batch_first else out
