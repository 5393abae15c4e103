"""Taps: capture intermediate tensors of any PyTorch model by module path.

A *tap* names a tensor inside a model without editing the model.  The distiller
runs the forward pass inside :meth:`Taps.capture` and hands the captured
tensors to the loss terms::

    taps = Taps(student, {"h": "model.layers.*", "q": "model.layers.3.self_attn.q_proj",
                          "hs": "hidden_states", "att": "attentions.-1"})
    with taps.capture() as store:
        out = student(**batch, **taps.needs_hf_outputs())
        taps.collect_outputs(store, out)
    store["h"]    # list of 3 tensors, one per decoder layer, in layer order
    store["q"]    # one tensor

Spec grammar
------------
``"model.layers.3.mlp"``
    The module's output.  When the module returns a tuple/list the tap takes
    element 0; when it returns a ``ModelOutput`` (or any dict) it takes its first
    field.  ``"path:output"`` is the same thing spelled out, and
    ``"path:output.N"`` / ``"path:output.name"`` picks another element/field.
``"model.layers.3:input"``
    The module's first positional input.  HF models often call their layers
    with keyword arguments only (in transformers 5 the Llama attention module is
    called as ``self_attn(hidden_states=..., ...)``); the hook is registered with
    ``with_kwargs=True`` and, when there is no positional argument, looks up the
    first parameter of the module's ``forward`` signature in the kwargs (falling
    back to the first tensor kwarg).  ``"path:input.N"`` / ``"path:input.name"``
    pick another argument.
``"model.layers.*.mlp"``
    Glob patterns (``*``, ``?``, ``[seq]``) are matched segment by segment on the
    dotted names: ``*`` never crosses a dot, so ``"model.layers.*"`` matches the
    decoder layers and not their children; ``**`` matches one or more
    segments.  A glob tap yields a list of tensors ordered by module registration
    order (which is layer order), whatever order the modules ran in.
``"hidden_states"``, ``"hidden_states.-1"``, ``"attentions.2"``, ``"logits"``, ...
    The HF fast path: the tensor comes from the model's output object rather
    than from a hook (:meth:`Taps.needs_hf_outputs` gives the
    ``output_hidden_states=True`` / ``output_attentions=True`` kwargs and
    :meth:`Taps.collect_outputs` fills the store).  ``"hidden_states"`` is the
    whole list as HF returns it: the embeddings followed by one entry per layer.
    Note that in transformers 5 the last entry is the *final-normed*
    ``last_hidden_state``, so ``"hidden_states.-1"`` differs from the raw output
    of the last decoder layer (tap ``"model.layers.-1"`` for that).  Add
    ``":output"`` to force a module named like an output field
    (``"logits:output"``) to be hooked instead.
``"model.layers.-1.mlp"``, ``"model.layers.-2:input"``
    Negative indices: a negative segment of an exact module path counts from
    the end of that numbered list (``model.layers.-1`` is the last block
    whatever the depth), so one recipe fits teachers and students of any
    depth.  HF output indices (``"hidden_states.-1"``, ``"attentions.-1"``)
    count from the end of the output tuple.  Globs take no negative indices.

Wrappers
--------
Paths are written for the *unwrapped* model.  DDP / DataParallel / DeepSpeed
(``module.``), ``torch.compile`` (``_orig_mod.``), FSDP
(``_fsdp_wrapped_module.``) and activation-checkpoint wrappers
(``_checkpoint_wrapped_module.``) are stripped from the names before matching,
and the innermost module of a wrapper chain is the one hooked.

``torch.compile`` caveat: dynamo does not guard on module hooks by default
(``torch._dynamo.config.skip_nnmodule_hook_guards = True``), so hooks registered
after the first compiled call are *silently ignored*.  Set that flag to
``False`` when tapping a compiled model (each capture then re-guards), or tap the
model before compiling it.  :class:`Taps` warns about this, and every capture
warns once when a hook tap captured nothing.

Attention probabilities
-----------------------
SDPA and flash attention never materialise the attention matrix; with them
transformers 5 returns an *empty* ``attentions`` tuple (and only logs a
warning).  :func:`ensure_eager_attention` switches an HF model to the eager
implementation (``model.set_attn_implementation("eager")``), and :class:`Taps`
calls it automatically, logging once, when an ``attentions*`` tap is requested.
Eager attention is slower and stores a ``[batch, heads, seq, seq]`` matrix per
layer, so only use attention-probability taps when a loss needs the
probabilities.  Query/key/value projections (e.g.
``"model.layers.*.self_attn.q_proj"``) are ordinary modules and can be tapped
under any attention implementation, which is all MiniLMv2-style relation losses
need.

Lifetime and gradients
----------------------
Hooks are registered when the ``with`` block is entered and removed when it
exits, also on an exception.  The store is a fresh dict per capture, owned by
the caller; the :class:`Taps` object keeps no tensor references.  Captured
tensors are not detached, so student taps keep their autograd graph; run the
teacher under ``torch.no_grad()``.  Hooks ignore calls made while autograd is
running a backward pass (activation-checkpointing recomputation), so a
``backward()`` inside the block does not append duplicates.  Modules inside a
*reentrant* checkpoint run under ``no_grad`` in the forward pass: taps there
carry no gradient (use non-reentrant checkpointing, the HF default).

If a tapped module runs more than once inside one capture (a shared module, or
two forward passes), an exact tap keeps the last call's tensor and a glob tap
gets one entry per call.  A module whose output is modified in place afterwards
(``nn.ReLU(inplace=True)`` after a conv) changes the captured tensor too; pass
``Taps(..., clone=True)`` to capture copies (still differentiable).
"""

from __future__ import annotations

import bisect
import contextlib
import difflib
import inspect
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import KDForgeError

__all__ = [
    "TapError",
    "TapSpec",
    "Taps",
    "describe",
    "ensure_eager_attention",
    "list_module_paths",
    "module_paths",
    "parse_tap",
    "unwrap_model",
]

logger = logging.getLogger("kdforge")


class TapError(KDForgeError, ValueError):
    """A tap spec that is malformed or matches nothing (a ValueError and a KDForgeError)."""


# --- HF output fields --------------------------------------------------------

# Fields of HF ModelOutput objects that hold one tensor per layer (tuple).
_HF_TUPLE_FIELDS = {
    "hidden_states": "output_hidden_states",
    "attentions": "output_attentions",
    "cross_attentions": "output_attentions",
    "encoder_hidden_states": "output_hidden_states",
    "encoder_attentions": "output_attentions",
    "decoder_hidden_states": "output_hidden_states",
    "decoder_attentions": "output_attentions",
}
# Fields that hold a single tensor.
_HF_TENSOR_FIELDS = {"logits", "last_hidden_state", "encoder_last_hidden_state", "pooler_output"}

# Class names of wrappers whose wrapped model lives at ``.module``.
_MODULE_ATTR_WRAPPERS = {"DistributedDataParallel", "DataParallel", "DeepSpeedEngine", "PipelineEngine"}
# Name segments that wrappers insert anywhere in the module tree.
_WRAPPER_SEGMENTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}

_INT_RE = re.compile(r"^-?\d+$")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class TapSpec:
    """A parsed tap.

    ``source`` is ``"module"`` (a forward hook) or ``"hf"`` (a field of the HF
    output object).  For module taps ``path`` is the dotted module path or glob,
    ``io`` is ``"output"`` or ``"input"`` and ``index`` picks an element of the
    output / an argument (``None``: element 0 / first positional input).  For HF
    taps ``path`` is the output field and ``index`` the layer index (``None``:
    the whole tuple).
    """

    raw: str
    source: str
    path: str
    io: str = "output"
    index: int | str | None = None
    is_glob: bool = False

    @property
    def hf_flag(self) -> str | None:
        """The ``output_*`` forward kwarg this HF tap needs, if any."""
        return _HF_TUPLE_FIELDS.get(self.path) if self.source == "hf" else None


def parse_tap(spec: str) -> TapSpec:
    """Parse a tap spec string (grammar in the module docstring)."""
    if not isinstance(spec, str):
        raise TapError(f"tap spec must be a string, got {type(spec).__name__}")
    raw = spec
    spec = spec.strip()
    if not spec:
        raise TapError("tap spec is empty; write a module path like 'model.layers.3.mlp' or 'hidden_states.-1'")

    if ":" in spec:
        path, _, suffix = spec.partition(":")
        io, _, idx = suffix.partition(".")
        if io not in ("input", "output"):
            raise TapError(
                f"tap {raw!r}: unknown suffix ':{suffix}'; use ':input', ':output', ':input.N' or ':output.N'"
            )
        if "." in suffix and not idx:
            raise TapError(f"tap {raw!r}: empty index after ':{io}.'")
        index: int | str | None = None
        if idx:
            index = int(idx) if _INT_RE.match(idx) else idx
        _check_path(raw, path)
        return TapSpec(raw, "module", path, io, index, _is_glob(path))

    head, _, rest = spec.partition(".")
    if head in _HF_TUPLE_FIELDS:
        if rest and not _INT_RE.match(rest):
            raise TapError(f"tap {raw!r}: '{head}' takes an integer layer index, like '{head}.-1'")
        return TapSpec(raw, "hf", head, "output", int(rest) if rest else None)
    if head in _HF_TENSOR_FIELDS:
        if rest:
            raise TapError(f"tap {raw!r}: '{head}' is a single tensor and takes no index")
        return TapSpec(raw, "hf", head)

    _check_path(raw, spec)
    return TapSpec(raw, "module", spec, "output", None, _is_glob(spec))


def _resolve_negative_indices(path: str, paths: Mapping[str, nn.Module]) -> str:
    """`model.layers.-1.mlp` -> `model.layers.29.mlp`: negative segments count from the end of a numbered list, so
    one recipe can name "the last layer" of teachers and students of any depth."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.startswith("-") and part[1:].isdigit():
            prefix = ".".join(parts[:i])
            siblings = sorted({int(p[len(prefix) + 1:].split(".")[0]) for p in paths
                               if p.startswith(prefix + ".") and p[len(prefix) + 1:].split(".")[0].isdigit()})
            if not siblings or int(part) < -len(siblings):
                return path  # no match; the caller reports the closest names
            parts[i] = str(siblings[int(part)])
    return ".".join(parts)


def _is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _check_path(raw: str, path: str) -> None:
    if not path or any(not seg for seg in path.split(".")):
        raise TapError(f"tap {raw!r}: module path {path!r} has an empty segment")


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Translate a dotted glob into a regex: ``*``/``?`` stay within one segment, ``**`` spans one or more."""
    out = []
    for seg in pattern.split("."):
        if seg == "**":
            out.append(r".+")
            continue
        part = []
        i = 0
        while i < len(seg):
            c = seg[i]
            if c == "*":
                part.append(r"[^.]*")
            elif c == "?":
                part.append(r"[^.]")
            elif c == "[" and (j := seg.find("]", i + 2)) != -1:
                body = seg[i + 1 : j]
                if body[0] in "!^":
                    body = "^" + body[1:]
                part.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
            else:
                part.append(re.escape(c))
            i += 1
        out.append("".join(part))
    try:
        return re.compile("^" + r"\.".join(out) + "$")
    except re.error as exc:
        raise TapError(f"tap {pattern!r}: bad glob ({exc})") from None


# --- wrapper-aware module names ------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/DataParallel/DeepSpeed, torch.compile, FSDP and checkpoint wrappers from the root."""
    while True:
        if type(model).__name__ in _MODULE_ATTR_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
            continue
        for attr in ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            return model


def module_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Map unwrapped dotted path -> module, in registration order (root is ``""``).

    Wrapper segments are dropped; when several modules share a path (a wrapper
    and what it wraps), the innermost one wins but keeps the first position.
    """
    by_name = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name, module in by_name.items():
        segs = name.split(".") if name else []
        keep = []
        for i, seg in enumerate(segs):
            if seg in _WRAPPER_SEGMENTS:
                continue
            if seg == "module" and type(by_name.get(".".join(segs[:i]))).__name__ in _MODULE_ATTR_WRAPPERS:
                continue
            keep.append(seg)
        out[".".join(keep)] = module
    return out


def list_module_paths(model: nn.Module, pattern: str | None = None) -> list[str]:
    """All tappable module paths of ``model`` (wrappers stripped), optionally filtered by a glob."""
    names = [n for n in module_paths(model) if n]
    if pattern is None:
        return names
    rx = _glob_regex(pattern)
    return [n for n in names if rx.match(n)]


def describe(model: nn.Module, max_lines: int = 60, collapse: bool = True) -> str:
    """A human-readable listing of tap paths, one ``path  ClassName`` per line.

    With ``collapse`` numeric segments become ``*`` and repeats are folded into
    one line with a count, so a 32-layer LLM lists each layer part once, already
    written as the glob to use.
    """
    paths = module_paths(model)
    rows: dict[str, list[Any]] = {}
    for name, module in paths.items():
        if not name:
            continue
        key = ".".join("*" if s.isdigit() else s for s in name.split(".")) if collapse else name
        cls = type(module).__name__
        row = rows.setdefault(key, [set(), 0])
        row[0].add(cls)
        row[1] += 1
    lines = []
    width = max((len(k) for k in rows), default=0)
    for key, (classes, count) in rows.items():
        cls = "/".join(sorted(classes))
        lines.append(f"{key.ljust(width)}  {cls}" + (f"  x{count}" if count > 1 else ""))
    header = f"{type(unwrap_model(model)).__name__}: {len(paths) - 1} modules"
    if max_lines is not None and len(lines) > max_lines:
        hidden = len(lines) - max_lines
        lines = lines[:max_lines] + [f"... ({hidden} more lines)"]
    return "\n".join([header, *lines])


# --- attention implementation ------------------------------------------------


def ensure_eager_attention(model: nn.Module) -> bool:
    """Switch every HF model inside ``model`` to eager attention; return True when something changed.

    Uses ``PreTrainedModel.set_attn_implementation("eager")`` (transformers 5),
    which also updates sub-models and their configs; falls back to setting
    ``config._attn_implementation`` on older versions.  Raises when the switch
    did not take (a model that cannot change implementation after loading).
    """
    root = unwrap_model(model)
    hf_models = [m for m in root.modules() if _is_hf_model(m)]
    if not hf_models:
        raise TapError(f"ensure_eager_attention: {type(root).__name__} contains no Hugging Face model (no .config)")
    changed = False
    for m in hf_models:
        if _attn_impl(m) == "eager":
            continue
        changed = True
        setter = getattr(m, "set_attn_implementation", None)
        if callable(setter):
            setter("eager")
        else:
            m.config._attn_implementation = "eager"
        if _attn_impl(m) != "eager":
            raise TapError(
                f"could not switch {type(m).__name__} to eager attention (still {_attn_impl(m)!r}); "
                "load it with attn_implementation='eager'"
            )
    return changed


def _is_hf_model(module: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, PreTrainedModel)


def _attn_impl(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


# --- the taps ----------------------------------------------------------------


def _in_backward() -> bool:
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def _pick(value: Any, index: int | str | None, what: str) -> Any:
    """Element ``index`` of a module output/argument container (``None``: the first)."""
    if isinstance(value, Tensor):
        if index is None:
            return value
        raise TapError(f"{what} is a single tensor; drop the index {index!r}")
    if hasattr(value, "to_tuple") and isinstance(value, Mapping):  # HF ModelOutput
        if isinstance(index, str):
            return value[index]
        return value.to_tuple()[0 if index is None else index]
    if isinstance(value, Mapping):
        if isinstance(index, str):
            return value[index]
        return list(value.values())[0 if index is None else index]
    if isinstance(value, (tuple, list)):
        if isinstance(index, str):
            raise TapError(f"{what} is a {type(value).__name__}; index it with an integer, not {index!r}")
        return value[0 if index is None else index]
    return value


def _forward_params(module: nn.Module) -> list[str]:
    """Names of the positional-or-keyword parameters of ``module.forward``, in order."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in kinds]


def _pick_input(args: tuple, kwargs: dict, params: list[str], index: int | str | None) -> Any:
    if isinstance(index, str):
        if index in kwargs:
            return kwargs[index]
        if index in params and params.index(index) < len(args):
            return args[params.index(index)]
        raise KeyError(index)
    i = 0 if index is None else index
    if args and -len(args) <= i < len(args):
        return args[i]
    if i >= 0 and i < len(params) and params[i] in kwargs:
        return kwargs[params[i]]
    if index is None:
        for value in kwargs.values():
            if isinstance(value, Tensor):
                return value
    raise KeyError(i)


@dataclass
class _Target:
    name: str  # tap name
    spec: TapSpec
    modules: list[tuple[str, nn.Module]]  # (unwrapped path, module), registration order
    params: list[list[str]]  # forward parameter names per module (for ':input')


class Taps:
    """Capture named intermediate tensors of ``model``; see the module docstring.

    ``specs`` maps a tap name to a spec string.  Every module path is resolved
    now, so a typo fails here and not in the middle of training.  With
    ``clone=True`` captured tensors are copies (protects against later in-place
    ops; still differentiable).
    """

    def __init__(self, model: nn.Module, specs: Mapping[str, str], *, clone: bool = False):
        self.model = model
        self.clone = clone
        self.specs: dict[str, TapSpec] = {name: parse_tap(s) for name, s in specs.items()}
        self._warned_missing = False
        root = unwrap_model(model)
        self._root_name = type(root).__name__
        paths = module_paths(model)

        self._targets: list[_Target] = []
        for name, spec in self.specs.items():
            if spec.source == "hf":
                self._check_hf(spec, root)
                continue
            if spec.is_glob:
                rx = _glob_regex(spec.path)
                matched = [(p, m) for p, m in paths.items() if p and rx.match(p)]
            else:
                path = _resolve_negative_indices(spec.path, paths)
                matched = [(path, paths[path])] if path in paths else []
            if not matched:
                raise self._no_match(spec, paths)
            self._targets.append(_Target(name, spec, matched, [_forward_params(m) for _, m in matched]))

        if any(s.source == "hf" and "attentions" in s.path for s in self.specs.values()):
            if ensure_eager_attention(model):
                taps = ", ".join(repr(s.raw) for s in self.specs.values() if "attentions" in s.path)
                logger.warning(
                    "switched %s to eager attention so that attention taps (%s) get real probabilities; "
                    "eager is slower and uses more memory than sdpa/flash",
                    self._root_name,
                    taps,
                )

        if self._targets and _is_compiled(model):
            try:
                import torch._dynamo

                skip = torch._dynamo.config.skip_nnmodule_hook_guards
            except Exception:  # pragma: no cover
                skip = True
            if skip:
                logger.warning(
                    "%s is torch.compile'd: hooks added after compilation are ignored unless "
                    "torch._dynamo.config.skip_nnmodule_hook_guards = False",
                    self._root_name,
                )

    # -- validation helpers --

    def _no_match(self, spec: TapSpec, paths: Mapping[str, nn.Module]) -> TapError:
        names = [p for p in paths if p]
        probe = spec.path.replace("*", "0") if spec.is_glob else spec.path
        close = difflib.get_close_matches(probe, names, n=5)
        hint = (", ".join(close) if close
                else "(none; list them with `kdforge taps MODEL` or kdforge.taps.describe(model))")
        return TapError(f"tap {spec.path!r} matches no module of {self._root_name}; closest: {hint}")

    def _check_hf(self, spec: TapSpec, root: nn.Module) -> None:
        config = getattr(root, "config", None)
        if config is None:
            raise TapError(
                f"tap {spec.raw!r} reads a Hugging Face output field, but {self._root_name} is not a "
                "Hugging Face model; tap a module path instead"
            )
        if spec.index is None or spec.path not in ("hidden_states", "attentions"):
            return
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(n_layers, int):
            return
        n = n_layers + 1 if spec.path == "hidden_states" else n_layers
        if not -n <= spec.index < n:
            raise TapError(
                f"tap {spec.raw!r}: {self._root_name} has {n} {spec.path} entries (indices {-n}..{n - 1})"
            )

    # -- public API --

    @property
    def names(self) -> list[str]:
        return list(self.specs)

    def needs_hf_outputs(self) -> dict[str, bool]:
        """Extra kwargs for the HF forward call, e.g. ``{"output_hidden_states": True}``."""
        return {flag: True for s in self.specs.values() if (flag := s.hf_flag)}

    def collect_outputs(self, store: dict, outputs: Any) -> None:
        """Fill the HF fast-path taps (``hidden_states``, ``attentions.2``, ``logits``, ...) from ``outputs``."""
        hf = {n: s for n, s in self.specs.items() if s.source == "hf"}
        if not hf:
            return
        if not (isinstance(outputs, Mapping) or hasattr(outputs, "__dataclass_fields__")):
            raise TapError(
                f"collect_outputs needs the model's output object (a ModelOutput), got {type(outputs).__name__}; "
                "do not pass return_dict=False"
            )
        for name, spec in hf.items():
            value = outputs.get(spec.path) if isinstance(outputs, Mapping) else getattr(outputs, spec.path, None)
            if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
                flag = spec.hf_flag
                if flag:
                    why = f"pass **taps.needs_hf_outputs() ({flag}=True) to the forward call"
                else:
                    why = "the model does not return it"
                if spec.path.endswith("attentions") and value is not None:
                    why = (
                        f"the attention implementation ({_attn_impl(unwrap_model(self.model))!r}) returns no "
                        "probabilities; call ensure_eager_attention(model)"
                    )
                raise TapError(f"tap {spec.raw!r}: the output of {self._root_name} has no {spec.path!r}: {why}")
            if spec.path in _HF_TUPLE_FIELDS:
                if spec.index is None:
                    store[name] = list(value)
                else:
                    try:
                        store[name] = value[spec.index]
                    except IndexError:
                        raise TapError(
                            f"tap {spec.raw!r}: {spec.path} has {len(value)} entries, "
                            f"index {spec.index} is out of range"
                        ) from None
            else:
                store[name] = value

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[str, Tensor | list[Tensor]]]:
        """Register the hooks, yield a fresh store dict, remove the hooks on exit (also on an exception)."""
        store: dict[str, Any] = {}
        handles = []
        try:
            for target in self._targets:
                order: list[int] = []  # slot indices of the glob list, kept sorted
                for slot, ((path, module), params) in enumerate(zip(target.modules, target.params)):
                    hook = self._make_hook(store, target, order, slot, path, params)
                    handles.append(module.register_forward_hook(hook, with_kwargs=True))
            yield store
        finally:
            for h in handles:
                h.remove()
            handles.clear()
        # Only hook taps are checked: collect_outputs may legitimately run after the block.
        missing = [t.name for t in self._targets if t.name not in store]
        if missing and not self._warned_missing:
            self._warned_missing = True
            hint = ""
            if _is_compiled(self.model):
                hint = " (torch.compile'd model: set torch._dynamo.config.skip_nnmodule_hook_guards = False)"
            logger.warning("taps captured nothing for %s%s", ", ".join(repr(n) for n in missing), hint)

    def _make_hook(self, store: dict, target: _Target, order: list[int], slot: int, path: str, params: list[str]):
        name, spec, clone = target.name, target.spec, self.clone
        where = f"tap {name!r} ({path}{':' + spec.io if spec.io == 'input' else ''})"

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if _in_backward():  # activation-checkpoint recomputation
                return
            if spec.io == "input":
                try:
                    value = _pick_input(args, kwargs, params, spec.index)
                except KeyError:
                    raise TapError(
                        f"{where}: {type(module).__name__} was called with {len(args)} positional args and "
                        f"kwargs {sorted(kwargs)}; no input {spec.index if spec.index is not None else 0!r}"
                    ) from None
            else:
                value = _pick(output, spec.index, f"{where}: the output")
            if not isinstance(value, Tensor):
                raise TapError(
                    f"{where}: got {type(value).__name__}, not a tensor; pick an element with ':{spec.io}.N'"
                )
            if clone:
                value = value.clone()
            if not spec.is_glob:
                store[name] = value
                return
            values = store.setdefault(name, [])
            pos = bisect.bisect_right(order, slot)
            order.insert(pos, slot)
            values.insert(pos, value)

        return hook

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={s.raw!r}" for n, s in self.specs.items())
        return f"Taps({self._root_name}: {inner})"


def _is_compiled(model: nn.Module) -> bool:
    return any(type(m).__name__ == "OptimizedModule" for m in model.modules())
