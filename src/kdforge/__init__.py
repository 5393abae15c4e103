"""kdforge: knowledge distillation with feature alignment and representation transfer, LLMs first."""
from __future__ import annotations

__version__ = "0.1.0"

from .distiller import Distiller  # noqa: E402
from .recipe import Recipe, Term, load_recipe  # noqa: E402

__all__ = ["Distiller", "Recipe", "Term", "load_recipe", "__version__"]
