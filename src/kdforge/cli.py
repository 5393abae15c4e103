"""The `kdforge` command."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .errors import KDForgeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="kdforge: knowledge distillation with feature alignment, LLMs first.")
_state = {"debug": False}


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug
    if not os.environ.get("KDFORGE_ONLINE"):  # no model hub by default; set KDFORGE_ONLINE=1 to allow hub ids
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.disable_progress_bar()


def _run(fn, *args, **kwargs):
    """Run a command body; bad input becomes one line on stderr and a non-zero exit."""
    try:
        return fn(*args, **kwargs)
    except KDForgeError as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    except (FileNotFoundError, PermissionError, ValueError) as err:
        if _state["debug"]:
            raise
        typer.echo(f"error: {err} (rerun with --debug for details)", err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
        raise typer.Exit(130) from None


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.steps=50."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's output_dir)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Run a recipe: train the student against the teacher, checkpoint, evaluate. Rerun to resume."""
    from .recipe import load_recipe
    from .train import train

    def body():
        r = load_recipe(recipe, set_ or [])
        path = train(r, progress=not no_progress, out=out)
        typer.echo(f"done: {path}")

    _run(body)


@app.command("eval")
def eval_(
    student: Path = typer.Argument(..., help="A student folder (save_pretrained) or a run directory."),
    teacher: Optional[str] = typer.Option("smollm2-135m", help="Teacher model spec, or '' for none."),
    corpus: str = typer.Option("shakespeare", help="'shakespeare' or held-out text files/globs."),
    seq_len: int = typer.Option(128),
    max_tokens: int = typer.Option(16384),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics here."),
) -> None:
    """Held-out perplexity, bits/char, teacher agreement and KL, tokens/s and parameter count."""

    def body():
        import json

        from .data.corpus import load_corpus
        from .data.packing import pack, tokenize_documents
        from .evaluate.metrics import evaluate_models
        from .io import atomic_write_json
        from .models import load_causal_lm, load_teacher, load_tokenizer
        from .recipe import DataSpec, ModelSpec

        folder = student / "student" if (student / "student" / "config.json").is_file() else student
        model = load_causal_lm(ModelSpec(model=str(folder)))
        tok = load_tokenizer(ModelSpec(model=str(folder)))
        spec = DataSpec(corpus=corpus, seq_len=seq_len, max_eval_tokens=max_tokens) if corpus == "shakespeare" \
            else DataSpec(corpus=corpus, validation=[corpus], seq_len=seq_len, max_eval_tokens=max_tokens)
        docs = load_corpus(spec).validation
        blocks = pack(*tokenize_documents(tok, docs), seq_len, max_tokens, "held-out corpus")
        models = {"student": model}
        if teacher:
            models["teacher"] = load_teacher(ModelSpec(model=teacher))
        res = evaluate_models(models, blocks, reference="teacher" if teacher else None,
                              bf16={"teacher": True})
        typer.echo(json.dumps(res, indent=2))
        if json_out:
            atomic_write_json(json_out, res)

    _run(body)


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="A shorter schedule (about 4 minutes on 2 CPU cores)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where to write the runs and the report."),
) -> None:
    """Distil SmolLM2-135M-Instruct into a ~15M Llama on Shakespeare, against a cross-entropy baseline."""
    from rich.console import Console
    from rich.table import Table

    from .demo import COLUMNS, run_demo

    def body():
        summary = run_demo(quick=quick, out=out)
        table = Table(title="Held-out (King Lear + The Tempest)")
        for c in COLUMNS:
            table.add_column(c, justify="right" if c != "model" else "left")
        for r in summary["rows"]:
            table.add_row(*[(f"{r[c]:,.4g}" if isinstance(r.get(c), float) else f"{r.get(c, '—'):,}"
                             if isinstance(r.get(c), int) else str(r.get(c, "—"))) for c in COLUMNS])
        Console().print(table)
        gain = summary["baseline_over_distilled_perplexity"]
        typer.echo(f"distilled vs baseline perplexity: {gain:.2f}x lower" if gain > 1 else
                   f"distilled student did not beat the baseline (ratio {gain:.2f})")
        typer.echo(f"report: {out / 'report.html'}")

    _run(body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
