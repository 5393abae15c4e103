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


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_as_written():
    """Every ```python block of README.md runs as it stands, except sketches that say `...` where the reader's own
    objects go (the DistillationTrainer block; examples/hf_trainer.py is its runnable version)."""
    blocks = [b for b in _python_blocks((ROOT / "README.md").read_text()) if "..." not in b]
    assert any("Distiller(" in b for b in blocks), "README lost its runnable Python API block"
    for block in blocks:
        exec(compile(block, "README.md python block", "exec"), {"__name__": "readme"})


def test_readme_and_docs_links_stay_inside_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        assert "../shared" not in text, f"{page.name} points outside the repository"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_architecture_lists_every_module():
    """docs/ARCHITECTURE.md's layout names every entry of src/kdforge (add a line there for a new module)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    package = ROOT / "src" / "kdforge"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in package.iterdir()
                   if not p.name.startswith((".", "__pycache__")) and (p.is_dir() or p.suffix == ".py"))
    missing = [n for n in names if not re.search(rf"^\s+{re.escape(n)}\s", text, flags=re.M)]
    assert not missing, f"docs/ARCHITECTURE.md's layout does not list: {', '.join(missing)}"


@pytest.mark.parametrize("page", ["taps.md", "howto.md"])
def test_hand_written_pages_name_what_they_document(page):
    text = (ROOT / "docs" / page).read_text()
    wanted = {"taps.md": ["hidden_states.-1", "attentions.2", ":input", "model.layers.-1", "embeddings: true"],
              "howto.md": ["HF_HUB_OFFLINE", "KDFORGE_ONLINE", "KDFORGE_AUTO_PRECISION", "--set", ".jsonl"]}[page]
    for word in wanted:
        assert word in text, f"docs/{page} no longer mentions {word}"
