"""The `kdforge` command."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from typer.core import TyperGroup

from .errors import KDForgeError


def spaced_set_value(args: list[str]) -> str | None:
    """`--set train.steps 10` (a space where `=` belongs) -> the one-line fix, else None."""
    for i, arg in enumerate(args[:-2]):
        key, value = args[i + 1], args[i + 2]
        if arg == "--set" and "=" not in key and not key.startswith("-") and not value.startswith("--"):
            return f"--set takes key=value: write --set {key}={value}"
    return None


class _Group(TyperGroup):
    def parse_args(self, ctx, args):
        problem = spaced_set_value(list(args))
        if problem:  # typer would answer with "unexpected extra argument" in a box
            typer.echo(f"error: {problem}", err=True)
            ctx.exit(2)
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="kdforge: knowledge distillation with feature alignment, LLMs first.")
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"kdforge {__version__}")
        raise typer.Exit()


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print kdforge's version and exit.")) -> None:
    _state["debug"] = debug
    # No model hub unless asked: an unset HF_HUB_OFFLINE becomes 1 (KDFORGE_ONLINE=1 leaves it unset, so hub ids
    # download); a value the user set, 0 or 1, is theirs and is kept.
    if "HF_HUB_OFFLINE" not in os.environ and os.environ.get("KDFORGE_ONLINE", "") in ("", "0"):
        os.environ["HF_HUB_OFFLINE"] = "1"
    # read by transformers when it is first imported (no progress bars, errors only): the heavy libraries load only
    # once a command needs them, after its recipe has validated
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from .runtime import keep_freed_memory_in_heap

    keep_freed_memory_in_heap()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (kdforge.interrupts.StopRequested)
        if not getattr(stop, "reported", False):  # training already said where it saved
            typer.echo("interrupted; rerun the same command to resume from the last checkpoint", err=True)
        raise typer.Exit(143 if getattr(stop, "signame", None) == "SIGTERM" else 130) from None


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set train.steps=50."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's output_dir)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    resume_from: Optional[str] = typer.Option(None, "--resume-from", help="Rewind the run to this checkpoint "
                                              "(e.g. step_00000040) and continue from it; what came after is moved "
                                              "to superseded/."),
) -> None:
    """Run a recipe: train the student against the teacher, checkpoint, evaluate. Rerun to resume; rerun with more
    train.steps to extend a finished run."""
    from .recipe import load_recipe

    def body():
        r = load_recipe(recipe, set_ or [])
        from .distributed import end_distributed, is_main_process
        from .train import train

        ok = False
        try:
            from . import progress

            progress.ENABLED = not no_progress  # the loading and evaluation phases too
            try:
                path = train(r, progress=not no_progress, out=out, resume_from=resume_from)
            finally:
                progress.ENABLED = True
            ok = True
        finally:  # under torchrun / accelerate launch: barrier, then tear the process group down
            end_distributed(success=ok)
        if is_main_process():
            typer.echo(f"done: {path}")

    _run(body)


@app.command("cache-teacher")
def cache_teacher(
    recipe: Path = typer.Argument(..., help="Recipe YAML: its teacher runs once over its training data."),
    k: Optional[int] = typer.Option(None, "--k", "--top-k", help="Top-k logits kept per token (default 64; the "
                                    "head with --mode hybrid)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache folder (default: teacher.path, else "
                                       "OUTPUT_DIR/teacher_cache). Rerun to resume."),
    values: Optional[str] = typer.Option(None, help="Log-prob coding: int6 (default, <=150 bytes/token at k=64), "
                                         "int8, int4 or fp16."),
    ids: Optional[str] = typer.Option(None, help="Id coding: packed (Elias-Fano, default) or plain."),
    temperature: Optional[float] = typer.Option(None, help="Temperature of the stored logsumexp, or of the "
                                                "distribution with --mode sampled/hybrid (default: the objective's)."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", help="Also cache this teacher tap per token, "
                                                "e.g. hidden_states.3 (repeatable)."),
    shard_blocks: Optional[int] = typer.Option(None, help="Blocks per shard file (default 256)."),
    mode: Optional[str] = typer.Option(None, help="top_k (default): the k largest logits per token; sampled: "
                                       "--samples ids drawn from the teacher's distribution at --temperature (an "
                                       "unbiased estimate of it, for forward_kl); hybrid: the --top-k head exactly "
                                       "plus --samples ids drawn from the rest (unbiased, less variance)."),
    samples: Optional[int] = typer.Option(None, help="Ids drawn per token with --mode sampled, or from the tail "
                                          "with --mode hybrid (default 16)."),
    sampling: Optional[str] = typer.Option(None, help="With --mode sampled/hybrid: iid (default) or systematic (one "
                                           "uniform offset per token: each id's count is floor or ceil of N·p)."),
    seed: Optional[int] = typer.Option(None, help="With --mode sampled/hybrid: the seed the draws derive from "
                                       "(default 0)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. --set data.seq_len=256."),
) -> None:
    """Run the recipe's teacher once over its training blocks and store top-k logits (or samples of its distribution,
    or a top-k head plus samples of its tail) for `teacher.kind: cache`; with teacher.crossfit, each block from the
    teacher of its fold (teacher.crossfit.models)."""
    from .recipe import load_recipe

    def body():
        r = load_recipe(recipe, set_ or [])
        if r.task != "causal_lm":
            raise KDForgeError(f"cache-teacher caches a causal LM's top-k logits; task {r.task} computes its "
                               "teacher's outputs once per run in memory: run `kdforge distill` directly")
        from .teachers.cache import CacheOptions, cache_recipe_teacher, recipe_temperature

        given = {"k": k, "values": values, "ids": ids, "shard_blocks": shard_blocks, "mode": mode,
                 "samples": samples, "sampling": sampling, "seed": seed}
        options = CacheOptions(**{key: v for key, v in given.items() if v is not None},
                               temperature=temperature if temperature is not None else recipe_temperature(r),
                               features=list(feature or []), batch_size=r.train.batch_size)
        path, index = cache_recipe_teacher(r, out=out, options=options)  # progress: a bar, or a line every 30 s
        meta = index["meta"]
        opts = meta["options"]
        if opts.get("mode") == "hybrid":
            what = (f"top-{opts['k']} head with {opts['values']} values + {opts['samples']} {opts['sampling']} tail "
                    f"samples at T={opts['temperature']}")
        elif "samples" in opts:
            what = f"{opts['samples']} {opts['sampling']} samples at T={opts['temperature']}"
        else:
            what = f"k={opts['k']}, {opts['values']} values"
        typer.echo(f"cached {meta['data']['n_blocks']} blocks x {meta['data']['seq_len']} tokens to {path}: "
                   f"{index['bytes_per_token']:.1f} bytes/token ({what}, {opts['ids']} ids)")
        if "crossfit" in meta:
            typer.echo(f"cross-fitted: block i from the teacher of its fold (fold sizes "
                       f"{meta['crossfit']['fold_sizes']}); train from it with teacher.path: {path}")
        else:
            typer.echo(f"train from it with: teacher: {{kind: cache, path: {path}, model: {r.teacher.model}}}")

    _run(body)


@app.command("crossfit-split")
def crossfit_split(
    recipe: Path = typer.Argument(..., help="Recipe YAML with task causal_lm and teacher.crossfit: {folds: K}."),
    out: Path = typer.Option(..., "--out", help="Folder for teacher_<k>.jsonl, fold_<k>.jsonl and manifest.json "
                             "(written whole, atomically; an earlier split there is replaced)."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. "
                                             "--set teacher.crossfit.seed=1."),
) -> None:
    """Deal the recipe's training blocks into teacher.crossfit's K seeded folds and write, for each k, the text
    teacher k may be fine-tuned on (every block but fold k) and fold k's own text; then list the K fine-tuned
    teachers in teacher.crossfit.models and run `kdforge cache-teacher RECIPE`."""
    from .recipe import load_recipe

    def body():
        r = load_recipe(recipe, set_ or [])
        from .tasks.causal_lm import crossfit_split as write_split

        manifest = write_split(r, out)
        typer.echo(f"{manifest['n_blocks']} blocks of {manifest['seq_len']} tokens in {manifest['folds']} folds "
                   f"(seed {manifest['seed']}, sizes {manifest['fold_sizes']}) written to {out}")
        typer.echo(f"fine-tune teacher k on {out}/teacher_<k>.jsonl (its held-out text: {out}/fold_<k>.jsonl), "
                   "list them in teacher.crossfit.models, then run: kdforge cache-teacher " + str(recipe))

    _run(body)


@app.command("finetune-teacher")
def finetune_teacher(
    recipe: Path = typer.Argument(..., help="Recipe YAML with task: sequence_classification."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. "
                                             "--set teacher.config.epochs=2."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Fine-tune the recipe's teacher encoder with a class head on its training split, once: cached under
    KDFORGE_CACHE/text_teachers by a hash of the model, teacher.config and the data, and reused by every run."""
    from .recipe import load_recipe

    def body():
        r = load_recipe(recipe, set_ or [])
        from .tasks.sequence_classification import finetune_teacher_command

        folder, figures = finetune_teacher_command(r, progress=not no_progress)
        typer.echo(f"teacher: {folder}")
        typer.echo(f"held-out ({figures['heldout']} texts): accuracy {figures['accuracy']:.4f}, macro-F1 "
                   f"{figures['macro_f1']:.4f}, ECE {figures['ece']:.4f}, {figures['examples_per_s']:.0f} examples/s")

    _run(body)


@app.command("generate")
def generate(
    recipe: Path = typer.Argument(..., help="Recipe YAML: its teacher answers its prompts (data.prompts)."),
    out: Optional[Path] = typer.Option(None, "--out", help="JSONL file to write (default: OUTPUT_DIR.teacher.jsonl). "
                                       "Rerun to resume."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key, e.g. "
                                             "--set generate.max_new_tokens=64."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Write the teacher's responses to the recipe's prompts as JSONL, for sequence-level KD (Kim & Rush 2016):
    train on them with data.prompts=FILE. Settings are under `generate:` in the recipe."""
    from .recipe import load_recipe

    def body():
        r = load_recipe(recipe, set_ or [])
        from .generate import generate_responses

        res = generate_responses(r, out, progress=not no_progress)
        typer.echo(f"wrote {res['written']} responses to {res['path']} ({res['skipped_done']} already there, "
                   f"{res['total']} prompts; ended at EOS {res['finish']['eos']}, at max_new_tokens "
                   f"{res['finish']['length']})")
        typer.echo(f"train on them with: --set data.prompts={res['path']}")

    _run(body)


@app.command("eval")
def eval_(
    student: Path = typer.Argument(..., help="A student folder (save_pretrained) or a run directory."),
    teacher: Optional[str] = typer.Option(None, help="Teacher model spec, or '' for none (default: the run's "
                                          "teacher, else smollm2-135m)."),
    corpus: Optional[str] = typer.Option(None, help="'shakespeare' or held-out text files/globs (default: the "
                                         "run's held-out data, else shakespeare)."),
    seq_len: Optional[int] = typer.Option(None, help="Block length (default: the run's, else 128)."),
    max_tokens: Optional[int] = typer.Option(None, help="Held-out tokens (default: the run's, else 16384)."),
    ood: str = typer.Option("auto", help="Out-of-domain text: 'auto' (Debian fortunes if installed), a file/glob, "
                            "or 'none'."),
    prompts: Optional[Path] = typer.Option(None, help="A file of generation prompts, one per line "
                                           "(default: 8 built-in Shakespeare-ish prompts)."),
    new_tokens: int = typer.Option(16, help="Greedy tokens generated per prompt."),
    cka: bool = typer.Option(True, "--cka/--no-cka", help="Layer-by-layer linear CKA against the teacher."),
    generation: bool = typer.Option(True, "--generation/--no-generation", help="Greedy-generation agreement."),
    prompt_generations: int = typer.Option(16, "--prompt-generations", min=0, help="Held-out prompts answered by "
                                           "the student and the teacher and scored (ROUGE-L, distinct-n, length) "
                                           "for a run on prompt–response data; 0 skips."),
    baseline: Optional[Path] = typer.Option(None, help="A second student (e.g. the CE baseline) shown beside it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write eval.json and cka.json/png here (default: the "
                                       "run directory when given one)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write all results to this file."),
    lm_eval: Optional[str] = typer.Option(None, "--lm-eval", help="Comma-separated lm-eval tasks run on the student "
                                          "(needs kdforge\\[lmeval]); 'kdforge_heldout' is a built-in offline "
                                          "perplexity task over the held-out text."),
    lm_eval_include: Optional[Path] = typer.Option(None, "--lm-eval-include", help="A folder of lm-eval task YAMLs."),
    lm_eval_limit: Optional[float] = typer.Option(None, "--lm-eval-limit", help="Documents per lm-eval task."),
) -> None:
    """Held-out perplexity and bits/char; teacher fidelity (top-1 agreement, forward and reverse KL, ECE of both);
    out-of-domain perplexity; greedy-generation agreement; prefill and generation tokens/s; size; peak memory;
    layer-wise CKA; optionally lm-evaluation-harness tasks."""

    def body():
        from .tasks import evaluate_target as run_eval
        from .io import atomic_write_json
        from .recipe import EvalSpec

        prompt_list = None
        if prompts is not None:
            if not prompts.is_file():
                raise FileNotFoundError(f"prompt file '{prompts}' not found")
            prompt_list = [line for line in prompts.read_text().splitlines() if line.strip()]
        spec = EvalSpec(ood=None if ood.lower() == "none" else ood, prompts=prompt_list, new_tokens=new_tokens,
                        cka=cka, generation=generation, prompt_generations=prompt_generations)
        tasks = [t.strip() for t in lm_eval.split(",") if t.strip()] if lm_eval else None
        res = run_eval(student, teacher=teacher, corpus=corpus, seq_len=seq_len, max_tokens=max_tokens, spec=spec,
                       baseline=baseline, out_dir=out, lm_eval_tasks=tasks, lm_eval_include=lm_eval_include,
                       lm_eval_limit=lm_eval_limit)
        if json_out:
            atomic_write_json(json_out, res)
        _print_eval(res, [p for p in (out or (student if (student / "manifest.json").is_file() else None),
                                      json_out) if p is not None])

    _run(body)


def _print_eval(res: dict, written: list[Path]) -> None:
    """`kdforge eval`'s screen: a table of the headline figures (the full results stay in eval.json)."""
    from rich.console import Console
    from rich.table import Table

    from .report.tables import _fmt

    held = res.get("heldout") or {}
    columns = [("perplexity", "ppl"), ("bits_per_char", "bits/char"), ("top1_agreement", "top-1 agr."),
               ("kl_teacher_student", "KL(T‖S)"), ("kl_student_teacher", "KL(S‖T)"), ("ece", "ECE")]
    setup = res.get("heldout_setup") or {}
    caption = (f"{setup['eval_tokens']:,} held-out tokens, batch {setup['batch_size']}, teacher "
               f"{setup['teacher_precision'] or 'none'}" if setup.get("eval_tokens") else None)
    if res.get("task") == "sentence_embedding":
        columns = [("spearman_cosine", "Spearman (cosines)"), ("top10_overlap", "top-10 overlap"),
                   ("teacher_cosine", "cos(S, T)"), ("sentences_per_s", "sentences/s"), ("parameters", "params")]
        caption = f"{setup['sentences']:,} held-out sentences" if setup else None
    if res.get("task") == "sequence_classification":
        columns = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "ECE"), ("top1_agreement",
                   "top-1 agr."), ("kl_teacher_student", "KL(T‖S)"), ("examples_per_s", "examples/s")]
        caption = f"{setup['examples']:,} held-out texts" if setup else None
    if res.get("task") == "image_classification":
        columns = [("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("ece", "ECE"), ("top1_agreement",
                   "top-1 agr."), ("kl_teacher_student", "KL(T‖S)"), ("examples_per_s", "examples/s")]
        caption = f"{setup['examples']:,} held-out images" if setup else None
    table = Table(title="held-out", caption=caption)
    table.add_column("model")
    for _, label in columns:
        table.add_column(label, justify="right")
    for name in ("student", "baseline", "teacher"):
        if name in held:
            table.add_row(name, *[_fmt(held[name].get(key)) for key, _ in columns])
    console = Console()
    console.print(table)
    summary = res.get("summary") or {}
    other = [("ood_perplexity", "out-of-domain ppl"), ("gen_token_agreement", "generation token agreement"),
             ("gen_exact_match", "generation exact match"), ("prefill_tokens_per_s", "prefill tokens/s"),
             ("generation_tokens_per_s", "generation tokens/s"), ("parameters", "parameters"),
             ("cka_last_to_last", "CKA last-to-last"), ("peak_rss_bytes", "peak RSS bytes")]
    more = Table(title="student")
    more.add_column("figure")
    more.add_column("value", justify="right")
    for key, label in other:
        if summary.get(key) is not None:
            more.add_row(label, _fmt(summary[key]))
    if more.row_count:
        console.print(more)
    for task, figures in (res.get("lm_eval") or {}).items():
        console.print(f"lm-eval {task}: {figures}")
    for note in res.get("notes") or []:  # plain lines: a path is never wrapped at the terminal's width
        typer.echo(f"note: {note}")
    for path in written:
        typer.echo(f"all results: {path / 'eval.json' if path.is_dir() else path}")


@app.command()
def taps(
    model: str = typer.Argument(..., help="An embedded name (smollm2-135m), a local model folder, a GGUF file or a "
                                "hub id."),
    gguf_file: Optional[str] = typer.Option(None, "--gguf-file", help="The GGUF file inside MODEL's folder."),
    pattern: Optional[str] = typer.Option(None, "--glob", help="Only the paths this glob matches, one per line, "
                                          "e.g. 'model.layers.*.mlp'."),
    every: bool = typer.Option(False, "--all", help="Every path, one per line (default: numbered layers folded "
                               "into one glob line each)."),
) -> None:
    """List a model's tappable module paths (for a term's `student:` / `teacher:`) and its Hugging Face outputs.
    Builds the model from its config only: no weights are read."""

    def body():
        from .models import model_skeleton
        from .recipe import ModelSpec
        from .taps import describe, list_module_paths

        from .tasks.image_classification import CNN, is_cnn_folder

        skeleton = CNN.from_pretrained(model) if is_cnn_folder(model) else model_skeleton(ModelSpec(model=model,
                                                                                                   gguf_file=gguf_file))
        if pattern is not None:
            paths = list_module_paths(skeleton, pattern)
            if not paths:
                raise KDForgeError(f"no module path of {model} matches '{pattern}'; run `kdforge taps {model}` to "
                                   "see them")
            typer.echo("\n".join(paths))
            return
        typer.echo(describe(skeleton, max_lines=None, collapse=not every))
        layers = getattr(getattr(skeleton, "config", None), "num_hidden_layers", None)
        if layers is not None:
            typer.echo(f"HF outputs: hidden_states (embeddings + {layers} blocks: hidden_states.0 .. "
                       f"hidden_states.{layers}, or .-1), attentions.0 .. attentions.{layers - 1}, logits")

    _run(body)


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="A shorter schedule (about 4 minutes on 2 CPU cores)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where to write the runs and the report."),
) -> None:
    """Distil SmolLM2-135M-Instruct into a ~15M Llama on Shakespeare, against a cross-entropy baseline."""
    from rich.console import Console
    from rich.table import Table

    from .demo import run_demo
    from .report.build import DEMO_COLUMNS

    def body():
        summary = run_demo(quick=quick, out=out)
        table = Table(title="Held-out (King Lear + The Tempest)")
        columns = [(c, label) for c, label in DEMO_COLUMNS if c != "tokens_per_s"]  # 80 columns; the report has all
        for c, label in columns:
            table.add_column(label, justify="right" if c != "model" else "left", min_width=len(label))
        for r in summary["rows"]:
            table.add_row(*[_demo_cell(c, r.get(c)) for c, _ in columns])
        Console().print(table)
        gain = summary["baseline_over_distilled_perplexity"]
        typer.echo(f"distilled vs baseline perplexity: {gain:.2f}x lower" if gain > 1 else
                   f"distilled student did not beat the baseline (ratio {gain:.2f})")
        if summary["gap_closed"] is not None:
            typer.echo(f"gap closed: the distilled student closes {summary['gap_closed']:.0%} of the "
                       "baseline-to-teacher gap in log-perplexity")
        if summary.get("gap_closed_from_scratch") is not None:
            typer.echo(f"from scratch: against the same sizes from fresh weights (CE), it closes "
                       f"{summary['gap_closed_from_scratch']:.0%} of the gap")
        typer.echo(f"report: {out / 'report.html'}")

    _run(body)


def _demo_cell(column: str, value) -> str:
    """A demo table cell short enough for an 80-column terminal: parameter counts in millions, the model's role."""
    if value is None:
        return "—"
    if column == "parameters":
        return f"{value / 1e6:.1f}M"
    if column == "model":
        return value.split(" (")[0].replace("student, ", "")
    return f"{value:,.4g}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)


@app.command()
def bench(
    matrix: Path = typer.Argument(..., help="Matrix YAML: base recipe, methods, seeds, optional students."),
    out: Optional[Path] = typer.Option(None, "--out", help="Bench directory (default: runs/bench/<matrix name>)."),
    workers: int = typer.Option(1, "--workers", help="Cells run in parallel (processes); 1 reuses one teacher."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="Override a recipe key in every cell (applied "
                                             "last), e.g. --set train.steps=60."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="Comma-separated seeds replacing the matrix's."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated methods to run (the CE baseline "
                                          "is added when none of them is one)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the cells and exit."),
) -> None:
    """Run a methods x seeds matrix with identical data, steps and evaluation; resumable; writes results.json,
    results.md (mean ± std over seeds, last-step values, CE baseline row) and report.html."""
    from .bench import load_matrix, plan_cells, run_bench

    def body():
        seed_list = [int(x) for x in seeds.split(",") if x.strip()] if seeds else None
        method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        if dry_run:
            spec, base = load_matrix(matrix, set_ or [], seed_list, method_list)
            cells, baseline = plan_cells(spec, base, out or Path("runs") / "bench" / spec.name)
            for c in cells:
                mark = "done" if (Path(c.dir) / "final.json").is_file() else ("INVALID: " + c.error if c.error else "")
                typer.echo(f"{c.key}  {c.dir}  {mark}")
            role = "reference row" if base.get("task") == "sentence_embedding" else "CE baseline"  # no labels there
            typer.echo(f"{len(cells)} cells; {role}: {baseline}")
            return
        results = run_bench(matrix, out=out, workers=workers, recipe_overrides=set_ or [], seeds=seed_list,
                            only_methods=method_list, echo=typer.echo)
        from .report.build import build_report

        bench_dir = Path(results["dir"])
        try:
            html_path = build_report(bench_dir)[0]
        except Exception as err:  # noqa: BLE001 - the results are written; a report problem must not hide them
            html_path = f"not written ({err}); run `kdforge report {bench_dir}`"
        failed = len(results["failed"])
        typer.echo(f"results: {bench_dir / 'results.md'}; report: {html_path}"
                   + (f"; {failed} cell(s) failed" if failed else ""))

    _run(body)


@app.command()
def report(
    directory: Path = typer.Argument(..., help="A run directory or a bench directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write report.html/report.md (default: DIR)."),
) -> None:
    """Write a self-contained HTML report (images inlined) and its Markdown twin; says what is missing."""
    from .report.build import build_report

    def body():
        html_path, md_path, missing = build_report(directory, out)
        for m in missing:
            typer.echo(f"missing: {m}", err=True)
        typer.echo(f"report: {html_path} (markdown: {md_path})")

    _run(body)


@app.command()
def reproduce(
    manifest: Path = typer.Argument(..., help="A run's manifest.json (or the run directory)."),
    out: Optional[Path] = typer.Option(None, "--out", help="New run directory (default: <run>-reproduce)."),
    rtol: float = typer.Option(0.0, "--rtol", help="Relative tolerance for a match (default: exact)."),
) -> None:
    """Rerun a run from its manifest's recipe into a new directory and diff final.json (speed figures ignored).
    Exit 0 when every metric matches, 1 and a diff table otherwise."""
    from .reproduce import reproduce as run_reproduce

    def body():
        new_dir, rows, warnings = run_reproduce(manifest, out, rtol)
        for w in warnings:
            typer.echo(f"warning: {w}", err=True)
        if not rows:
            typer.echo(f"reproduced: every final metric matches ({new_dir})")
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"final.json differences ({len(rows)})")
        for c in ("metric", "original", "reproduction"):
            table.add_column(c)
        for key, a, b in rows:
            table.add_row(key, repr(a), repr(b))
        Console(width=120).print(table)
        raise typer.Exit(1)

    _run(body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
