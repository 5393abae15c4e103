"""kdforge: knowledge distillation with feature alignment and representation transfer, LLMs first."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Distiller", "Recipe", "Term", "load_recipe", "__version__"]


def __getattr__(name: str):
    # resolved on first use, so `import kdforge` (and the CLI's --help and recipe errors) does not load torch
    if name == "Distiller":
        from .distiller import Distiller

        return Distiller
    if name in ("Recipe", "Term", "load_recipe"):
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'kdforge' has no attribute {name!r}")
