"""Generate docs/recipe.md and docs/methods.md from the code, so they cannot drift from it.

    python -m kdforge.docs            # rewrite both files
    python -m kdforge.docs --check    # exit 1 and name the stale files instead

docs/recipe.md comes from the pydantic schema in kdforge.recipe (field types, defaults and constraints from the
models; meanings from the attribute docstrings, read with `ast`). docs/methods.md comes from the loss registry
(kdforge.losses.registry): each loss's docstring and the keyword arguments and defaults of its signature.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REGENERATE = "python -m kdforge.docs"


# --- recipe reference ---------------------------------------------------------------------------------------------


def attribute_docstrings(cls: type) -> dict[str, str]:
    """`{field: docstring}` for the string literals written right under annotated fields, for `cls` and its bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        node = ast.parse(inspect.cleandoc("\n" + source) if source[:1].isspace() else source).body[0]
        body = getattr(node, "body", [])
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                out[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return out


def _models_in(tp: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation refers to (`TeacherSpec | None` -> [TeacherSpec], `list[Term]` -> [Term])."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models_in(arg)]


def type_name(tp: Any) -> str:
    """A short, readable spelling of an annotation."""
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" if isinstance(a, str) else str(a).lower() for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_name(args[0])} to {type_name(args[1])}" if args else "mapping"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _constraints(field) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "at least"}
    parts = []
    for meta in field.metadata:
        for attr, word in words.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{word} {value}" + (" item(s)" if attr == "min_length" else ""))
    return ", ".join(parts)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "see below"
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            value = [v.model_dump(exclude_unset=True) for v in value]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return f"`{yaml_value(value)}`"


def yaml_value(value: Any) -> str:
    """A default as a recipe would write it: true/false, null, bare strings, [a, b], {k: v}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section_rows(model: type[BaseModel], prefix: str, sections: list[tuple[str, type[BaseModel]]]) -> list[str]:
    docs = attribute_docstrings(model)
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = [m for m in _models_in(field.annotation)]
        is_list = typing.get_origin(field.annotation) is list or any(
            typing.get_origin(a) is list for a in typing.get_args(field.annotation))
        kind = type_name(field.annotation)
        extra = _constraints(field)
        meaning = docs.get(name, "")
        for sub in nested:
            sub_key = f"{key}[]" if is_list else key
            sections.append((sub_key, sub))
            meaning = (meaning + " " if meaning else "") + f"See [`{sub_key}`](#{_anchor(sub_key)})."
        rows.append(f"| `{key}` | {_cell(kind + (f' ({extra})' if extra else ''))} | {_cell(_default(field))} | "
                    f"{_cell(meaning)} |")
    return rows


def _anchor(key: str) -> str:
    return "".join(c for c in key.lower() if c.isalnum() or c in "-_")


def _model_sections(root: type[BaseModel], root_key: str) -> list[str]:
    lines: list[str] = []
    queue: list[tuple[str, type[BaseModel]]] = [(root_key, root)]
    seen = set()
    while queue:
        key, model = queue.pop(0)
        if key in seen:
            continue
        seen.add(key)
        prefix = "" if key == root_key else f"{key}."
        children: list[tuple[str, type[BaseModel]]] = []
        rows = _section_rows(model, prefix, children)
        lines += [f"### `{key}`", ""]
        if model.__doc__ and model.__doc__ is not BaseModel.__doc__ and "__doc__" in model.__dict__:
            lines += [" ".join(inspect.cleandoc(model.__doc__).split()), ""]
        if model.model_config.get("extra") == "allow":
            lines += ["Other keys are passed to the loss as keyword arguments: see [methods.md](methods.md) for "
                      "each loss's arguments and defaults.", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
        queue = children + queue
    return lines


def recipe_markdown() -> str:
    from . import recipe

    lines = [
        "# Recipe reference",
        "",
        f"<!-- generated by `{REGENERATE}` from src/kdforge/recipe.py; edit the schema, not this file -->",
        "",
        "A recipe is one YAML file (`recipes/*.yaml`); `kdforge distill RECIPE --set KEY=VALUE` overrides any key "
        "below (the value parses as YAML; list items by index, e.g. `--set objective.1.temperature=2`). Unknown "
        "keys are refused with the list of valid ones. `auto` precisions are resolved on the machine that runs "
        "the recipe (kdforge.precision).",
        "",
        "## Recipe",
        "",
        *_model_sections(recipe.Recipe, "recipe"),
        "## Bench matrix (`kdforge bench MATRIX.yaml`)",
        "",
        *_model_sections(recipe.MatrixSpec, "matrix"),
    ]
    return "\n".join(lines).rstrip() + "\n"


# --- methods page -------------------------------------------------------------------------------------------------


_KIND_WORDS = {
    "label": "label loss: the student's logits against the next-token labels",
    "logit": "logit loss: the student's logits against the teacher's (dense or a top-k cache)",
    "feature": "feature loss: tensors captured by the term's `student:` and `teacher:` taps",
    "stepping_stone": "stepping-stone loss: stepping stones built from student blocks and the teacher's later "
                      "blocks",
    "cross_tokenizer": "cross-tokenizer loss: the student's and the teacher's logits at positions paired across their "
                       "two tokenizers (needs `student.tokenizer`)",
}


def _argument_rows(fn: Callable) -> list[str]:
    from .losses.registry import keyword_arguments

    params = inspect.signature(fn).parameters
    rows = []
    for arg in keyword_arguments(fn):
        default = params[arg].default
        shown = "required" if default is inspect.Parameter.empty else f"`{yaml_value(default)}`"
        rows.append(f"| `{arg}` | {_cell(shown)} |")
    return rows


def methods_markdown() -> str:
    from .losses import attention, features, logits, relations
    from .losses.registry import all_loss_names, keyword_arguments, lookup

    lines = [
        "# Methods",
        "",
        f"<!-- generated by `{REGENERATE}` from the loss registry and the loss docstrings; edit those, "
        "not this file -->",
        "",
        "Every loss a recipe term can name (`{loss: NAME, weight: W, ...}`), with its recipe arguments and their "
        "defaults (read from the function's signature), then the function's own documentation: the paper, the "
        "formula and the convention (scale, reduction; several losses offer `convention: kdforge | authors`, the "
        "paper's formula or the authors' code, with the factor between them). A term's value is multiplied by its "
        "`weight`; `mask`, labels and the tensors themselves are supplied by kdforge. Taps are described in "
        "[taps.md](taps.md), layer maps and projectors in [recipe.md](recipe.md#recipeobjective).",
        "",
        "## Shared conventions",
        "",
    ]
    for title, module in (("Logit losses", logits), ("Feature losses", features)):
        lines += [f"### {title} (`{module.__name__}`)", "", inspect.cleandoc(module.__doc__ or ""), ""]
    for module in (attention, relations):
        first = inspect.cleandoc(module.__doc__ or "").split("\n\n")[0]
        lines += [f"`{module.__name__}`: {' '.join(first.split())}", ""]
    lines += ["## Index", ""]
    names = all_loss_names()
    lines += [" · ".join(f"[`{n}`](#{_anchor(n)})" for n in names), ""]
    for name in names:
        kind, fn = lookup(name)
        doc = inspect.cleandoc(fn.__doc__ or "(no docstring)")
        lines += [f"## {name}", "", f"{_KIND_WORDS[kind]}; `{fn.__module__}.{fn.__qualname__}`.", ""]
        rows = _argument_rows(fn)
        if rows:
            lines += ["| argument | default |", "|---|---|", *rows, ""]
        else:
            lines += ["No recipe arguments.", ""]
        if "warmup" in keyword_arguments(fn):
            lines += ["A term may set `warmup_steps: N` instead of `warmup`: kdforge then passes "
                      "`warmup = min(1, (step + 1) / N)` at each step.", ""]
        lines += [doc, ""]
        wrapped = re.match(r":func:`(\w+)`", doc)
        if wrapped and hasattr(inspect.getmodule(fn), wrapped.group(1)):
            inner = getattr(inspect.getmodule(fn), wrapped.group(1))
            lines += [f"`{inner.__module__}.{inner.__qualname__}`:", "", inspect.cleandoc(inner.__doc__ or ""), ""]
    return "\n".join(lines).rstrip() + "\n"


# --- files --------------------------------------------------------------------------------------------------------


def default_docs_dir() -> Path:
    """The repository's docs/ (this file is src/kdforge/docs.py), else ./docs."""
    repo_docs = Path(__file__).resolve().parents[2] / "docs"
    return repo_docs if repo_docs.is_dir() else Path("docs")


def generated(docs_dir: Path | None = None) -> dict[Path, str]:
    docs_dir = docs_dir or default_docs_dir()
    return {docs_dir / "recipe.md": recipe_markdown(), docs_dir / "methods.md": methods_markdown()}


def stale(docs_dir: Path | None = None) -> list[Path]:
    """The generated files whose content differs from what the code generates now."""
    return [p for p, text in generated(docs_dir).items() if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdforge.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Only check; exit 1 when a file is out of date.")
    parser.add_argument("--docs-dir", type=Path, default=None, help="Default: the repository's docs/.")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.docs_dir)
        for p in bad:
            print(f"{p} is out of date; regenerate with `{REGENERATE}`", file=sys.stderr)
        return 1 if bad else 0
    for path, text in generated(args.docs_dir).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
