"""Hook points at TransformerLens's names, and the one way to intervene on heads.

* :class:`HookPoint` and :class:`HookedRootModule` give the model TransformerLens's hook surface
  (``run_with_hooks``, ``run_with_cache``, ``hooks()``, ``add_hook``, ``reset_hooks``, ``hook_dict``)
  with TransformerLens's semantics: a hook is ``fn(tensor, hook=point) -> tensor | None``, run in the
  order added; returning a tensor replaces the activation. They are written here, not imported,
  because ``transformer-lens`` is an optional extra (``pip install 'icl-heads[lens]'``: 80 packages,
  +2.4 s on every import of the package; docs/architecture.md has the measurement);
  ``tests/test_transformer_lens.py`` holds them to TransformerLens's own behaviour. With the extra
  installed, ``run_with_cache`` returns TransformerLens's ``ActivationCache``.
* :func:`act_name` is the one place activation names are spelled (TransformerLens's ``get_act_name``).
* :func:`gate_heads` is the one head intervention: head ``k`` outputs ``g * z + (1 - g) * value`` at
  ``blocks.{l}.attn.hook_z``; zero (no value), mean and resample ablation, pruning and E2's per-prompt
  gate settings are all this function, installed by :func:`head_hooks` (or stored in the model's own
  head mask, :meth:`~icl_heads.model.Transformer.pruned`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from torch import nn

HookFn = Callable[..., Union[torch.Tensor, None]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]
Hooks = list[tuple[Union[str, Callable[[str], bool]], HookFn]]

# Module attribute -> TransformerLens name. The LayerNorms keep their checkpoint names (``ln_1.weight``),
# so every saved model loads unchanged, and answer to TransformerLens's (``blocks.0.ln1.hook_scale``).
_TL_PATH = {"ln_1": "ln1", "ln_2": "ln2", "ln_f": "ln_final"}

_ATTN = ("q", "k", "v", "z", "attn_scores", "pattern", "result")
_BLOCK = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_MLP = ("pre", "post")
_LN = ("scale", "normalized")
_GLOBAL = {"embed": "hook_embed", "pos_embed": "hook_pos_embed", "type_embed": "hook_type_embed",
           "readout": "hook_readout"}


def act_name(point: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The hook name of an activation point, as TransformerLens's ``utils.get_act_name`` spells it.

    Without a layer: ``embed``, ``pos_embed``, ``type_embed``, ``readout`` and ``scale`` /
    ``normalized`` of the final LN (``ln_final.hook_*``). Per layer ``l``: ``resid_pre/mid/post``,
    ``attn_out``, ``mlp_out`` (``blocks.{l}.hook_*``), ``q k v z attn_scores pattern result``
    (``blocks.{l}.attn.hook_*``), ``pre post`` (``blocks.{l}.mlp.hook_*``) and ``scale normalized``
    of ``layer_type`` ``ln1`` (default) or ``ln2``. A full name (``blocks.0.attn.hook_z``) is returned as it is.
    """
    if "." in point or point.startswith("hook_"):
        return point
    if layer is None:
        if point in _GLOBAL:
            return _GLOBAL[point]
        if point in _LN:
            return f"ln_final.hook_{point}"
        raise ValueError(f"act_name: {point!r} needs a layer" if point in _ATTN + _BLOCK + _MLP
                         else f"act_name: unknown activation point {point!r}")
    if point in _GLOBAL:
        raise ValueError(f"act_name: {point} has no layer")
    if point in _ATTN:
        return f"blocks.{layer}.attn.hook_{point}"
    if point in _BLOCK:
        return f"blocks.{layer}.hook_{point}"
    if point in _MLP:
        return f"blocks.{layer}.mlp.hook_{point}"
    if point in _LN:
        ln = layer_type or "ln1"
        if ln not in ("ln1", "ln2"):
            raise ValueError(f"act_name: layer_type must be ln1 or ln2 (got {ln!r})")
        return f"blocks.{layer}.{ln}.hook_{point}"
    raise ValueError(f"act_name: unknown activation point {point!r}")


# --------------------------------------------------------------------------- hook points


@dataclass
class LensHandle:
    """A hook added to a :class:`HookPoint` (TransformerLens's name): its torch handle and lifetime."""

    hook: torch.utils.hooks.RemovableHandle
    is_permanent: bool = False
    context_level: int | None = None
    rowwise: bool = False  # the hook function is marked :func:`rowwise`


class HookPoint(nn.Module):
    """The identity, with a name: hooks added to it see (and may replace) the activation passing through."""

    def __init__(self) -> None:
        super().__init__()
        self.fwd_hooks: list[LensHandle] = []
        self.bwd_hooks: list[LensHandle] = []
        self.ctx: dict[Any, Any] = {}
        self.name: str | None = None
        # The token rows the activation holds when a pass computes only some of them (the last block of an
        # evaluation pass, which computes the read-out's rows only: Transformer's docstring); None = all T.
        self.rows: torch.Tensor | None = None

    def add_hook(self, hook: HookFn, dir: str = "fwd", is_permanent: bool = False, level: int | None = None,
                 prepend: bool = False) -> LensHandle:
        """Add ``hook(tensor, hook=self)``; ``dir="bwd"`` sees the gradient of the activation."""
        if dir == "fwd":
            handle = self.register_forward_hook(lambda _m, _i, out: hook(out, hook=self), prepend=prepend)
            hooks = self.fwd_hooks
        elif dir == "bwd":
            def on_grad(_m: nn.Module, _gi: Any, grad_out: tuple[torch.Tensor, ...]) -> Any:
                new = hook(grad_out[0], hook=self)
                return None if new is None else (new,)
            handle = self.register_full_backward_hook(on_grad, prepend=prepend)
            hooks = self.bwd_hooks
        else:
            raise ValueError(f"add_hook: dir must be fwd or bwd (got {dir!r})")
        lens = LensHandle(handle, is_permanent, level, bool(getattr(hook, "rowwise", False)))
        hooks.insert(0 if prepend else len(hooks), lens)
        return lens

    def remove_hooks(self, dir: str = "fwd", including_permanent: bool = False, level: int | None = None) -> None:
        def keep(handles: list[LensHandle]) -> list[LensHandle]:
            kept = []
            for h in handles:
                if (h.is_permanent and not including_permanent) or (level is not None and h.context_level != level):
                    kept.append(h)
                else:
                    h.hook.remove()
            return kept
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"remove_hooks: dir must be fwd, bwd or both (got {dir!r})")
        if dir in ("fwd", "both"):
            self.fwd_hooks = keep(self.fwd_hooks)
        if dir in ("bwd", "both"):
            self.bwd_hooks = keep(self.bwd_hooks)

    def has_hooks(self) -> bool:
        """Whether anything (a TransformerLens-style hook or a plain torch forward hook) watches this point."""
        return bool(self._forward_hooks)

    def has_only_rowwise_hooks(self) -> bool:
        """Whether every forward hook here is a :func:`rowwise` hook (true when there are none)."""
        return len(self._forward_hooks) == len(self.fwd_hooks) and all(h.rowwise for h in self.fwd_hooks)

    def clear_context(self) -> None:
        self.ctx = {}

    def layer(self) -> int:
        """The block index of a ``blocks.{l}.*`` hook."""
        if self.name is None:
            raise ValueError("HookPoint.layer: the hook point has no name (call setup())")
        return int(self.name.split(".")[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class HookedRootModule(nn.Module):
    """TransformerLens's ``HookedRootModule`` surface over the :class:`HookPoint` modules of a model.

    Call :meth:`setup` at the end of ``__init__``. Hooks are global state on the modules (as in
    TransformerLens): :meth:`run_with_hooks` and :meth:`hooks` remove theirs at the end, permanent
    hooks stay until ``reset_hooks(including_permanent=True)``.
    """

    hook_dict: dict[str, HookPoint]
    mod_dict: dict[str, nn.Module]

    def setup(self) -> None:
        """Name every hook point (TransformerLens's names: ``_TL_PATH`` renames the LayerNorm modules)."""
        self.context_level = 0
        self.mod_dict, self.hook_dict = {}, {}
        for path, module in self.named_modules():
            if not path:
                continue
            name = ".".join(_TL_PATH.get(part, part) for part in path.split("."))
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def hook_points(self) -> Iterator[HookPoint]:
        return iter(self.hook_dict.values())

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd", is_permanent: bool = False,
                 level: int | None = None, prepend: bool = False) -> None:
        """Add ``hook`` at the point ``name`` (or at every point whose name passes the filter ``name``)."""
        if callable(name):
            for point_name, point in self.hook_dict.items():
                if name(point_name):
                    point.add_hook(hook, dir, is_permanent, level, prepend)
            return
        if name not in self.hook_dict:
            raise KeyError(f"add_hook: no hook point {name!r} (see model.hook_dict)")
        self.hook_dict[name].add_hook(hook, dir, is_permanent, level, prepend)

    def add_perma_hook(self, name: str | Callable[[str], bool], hook: HookFn, dir: str = "fwd") -> None:
        self.add_hook(name, hook, dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level: int | None = None) -> None:
        for point in self.hook_points():
            if clear_contexts:
                point.clear_context()
            point.remove_hooks(direction, including_permanent, level)

    @contextmanager
    def hooks(self, fwd_hooks: Hooks = (), bwd_hooks: Hooks = (), reset_hooks_end: bool = True,
              clear_contexts: bool = False) -> Iterator["HookedRootModule"]:
        """Within the block, the model runs with these hooks (removed at the end)."""
        self.context_level += 1
        try:
            for direction, hooks in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for name, hook in hooks:
                    self.add_hook(name, hook, direction, level=self.context_level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=self.context_level)
            self.context_level -= 1

    def run_with_hooks(self, *model_args: Any, fwd_hooks: Hooks = (), bwd_hooks: Hooks = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False, **model_kwargs: Any) -> Any:
        """``self(*model_args, **model_kwargs)`` with ``fwd_hooks`` ``[(name or filter, fn), ...]`` added for the call."""
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(self, names_filter: NamesFilter = None, incl_bwd: bool = False,
                          device: torch.device | str | None = None, cache: dict | None = None
                          ) -> tuple[dict[str, torch.Tensor], Hooks, Hooks]:
        """A cache dict and the hooks that fill it (detached, on ``device``) for the names that pass the filter."""
        cache = {} if cache is None else cache
        wanted = _names_filter(names_filter)

        def save(tensor: torch.Tensor, hook: HookPoint, suffix: str = "") -> None:
            cache[f"{hook.name}{suffix}"] = tensor.detach().to(device)

        fwd = [(n, save) for n in self.hook_dict if wanted(n)]
        bwd = [(n, lambda t, hook: save(t, hook, "_grad")) for n in self.hook_dict if wanted(n)] if incl_bwd else []
        return cache, fwd, bwd

    def run_with_cache(self, *model_args: Any, names_filter: NamesFilter = None, device: torch.device | str | None = None,
                       incl_bwd: bool = False, reset_hooks_end: bool = True, clear_contexts: bool = False,
                       return_cache_object: bool = True, **model_kwargs: Any) -> tuple[Any, Any]:
        """The output and the activations of the hook points that pass ``names_filter`` (None: all).

        ``return_cache_object=True`` wraps them in TransformerLens's ``ActivationCache`` (needs the
        ``lens`` extra); ``False`` gives the plain ``{name: tensor}`` dict, which the package itself uses.
        Caching ``hook_pattern``, ``hook_attn_scores``, ``hook_result`` or an LN's ``hook_scale`` (as the
        default filter does) switches those parts to their explicit computation; see the model's docstring.
        """
        if names_filter is not None and not callable(names_filter):
            names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            missing = [n for n in names if n not in self.hook_dict]
            if missing:
                raise KeyError(f"run_with_cache: no hook point {missing[0]!r} (see model.hook_dict)")
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device)
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                out.backward()
        return out, (self.activation_cache(cache) if return_cache_object else cache)

    def activation_cache(self, cache: dict[str, torch.Tensor]) -> Any:
        """TransformerLens's ``ActivationCache`` over ``cache`` (the ``lens`` extra, imported here: it is heavy)."""
        try:
            from transformer_lens import ActivationCache
        except ImportError as e:
            raise ImportError("run_with_cache: an ActivationCache needs transformer-lens "
                              "(pip install 'icl-heads[lens]'); return_cache_object=False gives a dict") from e
        return ActivationCache(cache, self.lens_view())

    def lens_view(self) -> Any:
        """What TransformerLens's ``ActivationCache`` reads of a model (its ``cfg`` names); the model by default."""
        return self


def _names_filter(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    names = set(names_filter)
    return lambda name: name in names


# --------------------------------------------------------------------------- the one head intervention


def rowwise(fn: HookFn) -> HookFn:
    """Mark a hook as acting on each token row on its own, aligning any per-token tensor it holds with
    ``hook.rows`` (the rows the activation holds, or None for all): such hooks at the last block's
    ``hook_z`` leave its read-out-only evaluation pass on (the model's docstring). Any other hook there turns
    it off, so a hook that reads or caches the activation always sees every row."""
    fn.rowwise = True  # type: ignore[attr-defined]
    return fn


def at_rows(values: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Per-token head values ``(..., T, h, d_head)`` at the token ``rows`` a hook point holds (None: all)."""
    return values if values is None or rows is None else values.index_select(-3, rows.to(values.device))


def gate_heads(z: torch.Tensor, gates: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """Head outputs ``z (B, T, h, d_head)`` gated: ``g * z + (1 - g) * values``.

    ``gates`` is ``(h,)`` or per row ``(B, h)``; ``values`` broadcasts to ``z`` (``(T, h, d_head)`` or
    ``(B, T, h, d_head)``; None = zero ablation, ``g * z``). A gate of 1 returns ``z`` exactly.
    """
    g = gates.to(z.device, z.dtype).view(-1, 1, z.shape[2], 1)
    gated = z * g
    return gated if values is None else gated + (1 - g) * values.to(z.device, z.dtype)


Values = Union[torch.Tensor, Callable[[int, int], Union[torch.Tensor, None]], None]


def head_hooks(gates: torch.Tensor, values: Values = None, start: int = 0,
               layers: Sequence[int] | None = None) -> Hooks:
    """Hooks on ``blocks.{l}.attn.hook_z`` that apply :func:`gate_heads` with gates ``(L, h)`` (shared) or
    ``(P, L, h)`` (per prompt) and values ``(L, T, h, d_head)`` (shared) or ``(P, L, T, h, d_head)``.

    Per-prompt tensors are indexed by absolute prompt number: a pass over prompts ``start ..
    start + B - 1`` (``B`` the batch the hook sees) takes those rows, so chunking a prompt set never
    changes which gates or donor outputs a prompt gets. ``values`` may also be ``fn(start, B)``
    returning this batch's values (``(L, T, h, d_head)`` or ``(B, L, T, h, d_head)``), e.g. an
    :class:`~icl_heads.analysis.ablation.Ablation`'s donors for those prompts.
    """
    L = gates.shape[-2]

    def hook_for(l: int) -> HookFn:
        @rowwise
        def hook(z: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            B = z.shape[0]
            g = gates[..., l, :] if gates.dim() == 2 else gates[start:start + B, l]
            if callable(values):  # this batch's rows already
                v = values(start, B)
                v = None if v is None else (v[l] if v.dim() == 4 else v[:, l])
            else:
                v = None if values is None else (values[l] if values.dim() == 4 else values[start:start + B, l])
            return gate_heads(z, g, at_rows(v, hook.rows))
        return hook

    return [(act_name("z", l), hook_for(l)) for l in (range(L) if layers is None else layers)]


def explicit_softmax_pattern(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights ``(B, h, T, T)`` from scaled scores as SDPA computes them (masked keys
    get weight 0); the explicit path, taken only when a pattern or the scores are hooked."""
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


def scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q k^T / sqrt(d_head)`` ``(B, h, T, T)`` from ``(B, h, T, d_head)`` queries and keys."""
    return (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
