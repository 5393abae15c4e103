"""`kdforge reproduce MANIFEST.json`: rerun a run from the recipe its manifest recorded, into a new directory, and
diff the final metrics (speed figures are ignored: they depend on the machine's load, not on the run)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import KDForgeError
from .recipe import parse_recipe

IGNORED = ("tokens_per_s", "examples_per_s", "seconds", "peak_rss")


def is_speed_key(key: str) -> bool:
    return any(part in key for part in IGNORED)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def diff_metrics(old: dict, new: dict, rtol: float = 0.0) -> list[tuple[str, Any, Any]]:
    """(key, old, new) for every non-speed value that differs (beyond rtol for numbers) or is on one side only."""
    a, b = flatten(old), flatten(new)
    rows = []
    for key in sorted(set(a) | set(b)):
        if is_speed_key(key):
            continue
        x, y = a.get(key), b.get(key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            same = x == y or (math.isfinite(x) and math.isfinite(y) and abs(x - y) <= rtol * max(abs(x), abs(y)))
        else:
            same = x == y
        if not same:
            rows.append((key, x, y))
    return rows


def reproduce(manifest_path: str | Path, out: str | Path | None = None, rtol: float = 0.0,
              progress: bool = False) -> tuple[Path, list[tuple[str, Any, Any]], list[str]]:
    """Retrain from the manifest's recipe into `out` (default: `<run>-reproduce` beside the run); return the new
    run directory, the differences of its final.json against the original's, and warnings."""
    from .train import train

    manifest_path = Path(manifest_path)
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.json"
    if not manifest_path.is_file():
        raise KDForgeError(f"manifest '{manifest_path}' not found; give a run's manifest.json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise KDForgeError(f"'{manifest_path}' is not valid JSON; give a run's manifest.json") from None
    if "recipe" not in manifest:
        raise KDForgeError(f"'{manifest_path}' has no recipe; is it a kdforge run manifest?")
    run = manifest_path.parent
    original = run / "final.json"
    if not original.is_file():
        raise KDForgeError(f"{original} is missing: the original run never finished, so there is nothing to compare; "
                           "finish it first (rerun kdforge distill with the same --out)")
    recipe = parse_recipe(manifest["recipe"])
    warnings = []
    if manifest.get("recipe_hash") and recipe.hash() != manifest["recipe_hash"]:
        warnings.append(f"the recipe hashes to {recipe.hash()} now but to {manifest['recipe_hash']} when it ran "
                        "(the recipe schema gained or changed defaults since)")
    from . import __version__

    then = (manifest.get("versions") or {})
    import torch
    import transformers

    for name, now in (("kdforge", __version__), ("torch", torch.__version__),
                      ("transformers", transformers.__version__)):
        if then.get(name) and then[name] != now:
            warnings.append(f"{name} {then[name]} ran the original, {now} runs this one")
    out = Path(out) if out else run.with_name(run.name + "-reproduce")
    if out.resolve() == run.resolve():
        raise KDForgeError("--out is the original run directory; give a new one")
    train(recipe, progress=progress, out=out)
    rows = diff_metrics(json.loads(original.read_text()), json.loads((out / "final.json").read_text()), rtol)
    return out, rows, warnings
