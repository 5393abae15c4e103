"""The documentation answers and cannot drift: generated pages match the code, README snippets run, links resolve."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdforge import docs

ROOT = Path(__file__).resolve().parents[1]


def test_generated_docs_match_the_code():
    """docs/recipe.md and docs/methods.md are what `python -m kdforge.docs` writes from the schema and the losses."""
    for path, text in docs.generated(ROOT / "docs").items():
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(ROOT)} is out of date with the code; regenerate it with "
            f"`.venv/bin/{docs.REGENERATE}` and commit the result")


def test_every_recipe_key_has_a_meaning():
    """A new recipe field needs an attribute docstring (the text under it in recipe.py), or recipe.md has a hole."""
    empty = [line.split("|")[1].strip() for line in docs.recipe_markdown().splitlines()
             if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not empty, f"recipe keys without a docstring in src/kdforge/recipe.py: {', '.join(empty)}"


def test_methods_page_lists_every_loss_with_its_defaults():
    from kdforge.losses.registry import all_loss_names

    text = docs.methods_markdown()
    for name in all_loss_names():
        assert f"\n## {name}\n" in text
    section = text.split("\n## forward_kl\n")[1].split("\n## ")[0]
    assert "| `temperature` | `1.0` |" in section and "| `missing_mass` | `bucket` |" in section
    assert "| `num_relation_heads` | required |" in text


def test_check_mode_names_a_stale_file_and_the_command(tmp_path, capsys):
    for path, text in docs.generated(tmp_path).items():
        path.write_text(text)
    assert docs.main(["--check", "--docs-dir", str(tmp_path)]) == 0
    (tmp_path / "recipe.md").write_text("old\n")
    assert docs.main(["--check", "--docs-dir", str(tmp_path)]) == 1
    assert "recipe.md is out of date; regenerate with `python -m kdforge.docs`" in capsys.readouterr().err
