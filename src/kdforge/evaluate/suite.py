"""The full offline evaluation of one student: held-out perplexity and teacher fidelity, out-of-domain perplexity,
greedy-generation agreement, speed, size, memory and layer-wise CKA. Used by `kdforge eval` and by every bench cell.

An Evaluator holds what does not change between students (teacher, tokenizer, held-out and out-of-domain tokens,
and the teacher's own figures, computed once), so a bench evaluates each cell the same way at a fraction of the cost.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from torch import nn

from ..data.corpus import _expand, read_documents, read_text
from ..data.packing import TokenBlocks, pack, tokenize_documents
from ..errors import KDForgeError
from ..models import count_parameters
from ..precision import resolve
from ..progress import phase
from ..recipe import EvalSpec
from .cka import layer_cka, write_cka
from .generation import DEFAULT_PROMPTS, greedy_generate, generation_agreement
from .metrics import evaluate_models
from .speed import PEAK_MEMORY_METHOD, parameter_bytes, peak_rss_bytes, prefill_tokens_per_s, safetensors_bytes

log = logging.getLogger("kdforge")

FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_HINT = "install Debian's fortunes package (apt-get install -y fortunes) or pass an out-of-domain text file"


def split_fortunes(text: str) -> list[str]:
    """A fortune file holds quotes separated by lines holding only '%'."""
    quotes, current = [], []
    for line in text.splitlines():
        if line.strip() == "%":
            if current:
                quotes.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    if current:
        quotes.append("\n".join(current).strip())
    return [q for q in quotes if q]


def load_ood_documents(source: str | None, max_chars: int) -> tuple[list[str], str | None, str | None]:
    """(documents, description, note). Empty documents and a note saying why when there is nothing to read."""
    if source is None or str(source).lower() in {"", "none", "off"}:
        return [], None, "out-of-domain evaluation turned off"
    if source == "auto":
        files = sorted(p for p in FORTUNES_DIR.glob("*") if p.is_file() and not p.suffix and p.name != "ascii-art") \
            if FORTUNES_DIR.is_dir() else []
        if not files:
            return [], None, f"no out-of-domain corpus: {FORTUNES_DIR} is absent; {FORTUNES_HINT}"
        quotes = [q for f in files for q in split_fortunes(f.read_text(encoding="utf-8", errors="replace"))]
        random.Random(0).shuffle(quotes)  # a fixed mix of all the fortune files
        description = f"Debian fortunes ({len(files)} files in {FORTUNES_DIR})"
    else:
        try:
            paths = _expand(str(source))
        except KDForgeError:
            return [], None, f"no out-of-domain corpus: '{source}' not found; {FORTUNES_HINT}"
        quotes = []
        for p in paths:
            if p.suffix == ".jsonl":
                quotes += read_documents(p, "text")
            else:
                text = read_text(p)
                quotes += split_fortunes(text) if "\n%\n" in text else [text]
        description = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    docs, total = [], 0
    for q in quotes:
        if total >= max_chars:
            break
        docs.append(q)
        total += len(q)
    if not docs:
        return [], None, f"no out-of-domain corpus: '{source}' holds no text"
    return docs, description, None


def heldout_setup(blocks: TokenBlocks, teacher_precision: str | None, batch_size: int | None = None) -> dict[str, Any]:
    """What held-out figures are measured on, recorded beside them in final.json and eval.json. Both files use this:
    the same blocks, batch size and teacher precision give the same figures (under bf16 autocast the teacher's logits,
    and so the KL, shift in the 3rd digit with the batch size alone)."""
    n, seq = (int(x) for x in blocks.ids.shape)
    return {"blocks": n, "seq_len": seq, "eval_tokens": n * (seq - 1),
            "batch_size": batch_size or EvalSpec().batch_size,
            "teacher_precision": teacher_precision}


class Evaluator:
    def __init__(self, tokenizer, teacher: nn.Module | None, val_blocks: TokenBlocks, spec: EvalSpec | None = None,
                 *, teacher_bf16: bool = False, teacher_dir: str | Path | None = None, prompt_records=None,
                 answer_teacher: tuple[nn.Module, Any] | None = None):
        """prompt_records: held-out prompt–response records (kdforge.data.prompts.PromptRecord) whose prompts the
        student and the teacher answer (spec.prompt_generations of them; kdforge.evaluate.generation_metrics).
        answer_teacher: (model, tokenizer) that answers them when it is not (teacher, tokenizer): a teacher with
        another tokenizer than the student's (student.tokenizer), which then takes no part in the token-level
        figures (teacher=None)."""
        self.tokenizer = tokenizer
        self.teacher = teacher
        kept = (spec or EvalSpec()).prompt_generations
        self.prompt_records = [r for r in (prompt_records or []) if r.response][:kept]
        self.answer_teacher = answer_teacher or ((teacher, tokenizer) if teacher is not None else None)
        self.val_blocks = val_blocks
        self.spec = spec or EvalSpec()
        self.teacher_bf16 = teacher_bf16
        self.teacher_dir = teacher_dir
        self.prompts = list(self.spec.prompts or DEFAULT_PROMPTS)
        seq_len = val_blocks.ids.shape[1]
        self.ood_blocks: TokenBlocks | None = None
        docs, self.ood_description, self.ood_note = load_ood_documents(self.spec.ood, self.spec.ood_max_tokens * 8)
        if docs:
            ids, chars = tokenize_documents(tokenizer, docs)
            if len(ids) >= seq_len:
                self.ood_blocks = pack(ids, chars, seq_len, self.spec.ood_max_tokens, "out-of-domain corpus")
            else:
                self.ood_note = f"out-of-domain corpus has {len(ids)} tokens, fewer than one block of {seq_len}"
        self._teacher: dict[str, Any] | None = None

    def teacher_figures(self) -> dict[str, Any]:
        """The teacher's out-of-domain perplexity, generations, speed and size (computed once)."""
        if self._teacher is not None or self.teacher is None:
            return self._teacher or {}
        t, spec, bf16 = self.teacher, self.spec, self.teacher_bf16
        fig: dict[str, Any] = {"parameters": count_parameters(t), "parameter_bytes": parameter_bytes(t),
                               "safetensors_bytes": safetensors_bytes(self.teacher_dir)}
        if self.ood_blocks is not None:
            fig["ood"] = evaluate_models({"teacher": t}, self.ood_blocks, batch_size=spec.batch_size,
                                         bf16={"teacher": bf16}, progress="teacher: out-of-domain")["teacher"]
        if spec.generation:
            with phase("teacher: greedy generation"):
                fig["generations"] = greedy_generate(t, self.tokenizer, self.prompts, spec.new_tokens, bf16=bf16)
        if spec.speed:
            with phase("teacher: speed"):
                fig["prefill_tokens_per_s"] = prefill_tokens_per_s(t, self.val_blocks, spec.batch_size, bf16=bf16)
        self._teacher = fig
        return fig

    def teacher_answers(self) -> list[str] | None:
        """The teacher's greedy answers to the held-out prompts (made once), or None without prompts or teacher."""
        if not self.prompt_records or self.answer_teacher is None:
            return None
        if not hasattr(self, "_answers"):
            from .generation_metrics import answer

            model, tok = self.answer_teacher
            with phase(f"teacher: answering {len(self.prompt_records)} held-out prompts"):
                self._answers = answer(model, tok, [r.prompt for r in self.prompt_records],
                                       self.spec.prompt_new_tokens, batch_size=self.spec.batch_size,
                                       bf16=self.teacher_bf16)
        return self._answers[0]

    def evaluate(self, student: nn.Module, *, student_dir: str | Path | None = None, out_dir: str | Path | None = None,
                 heldout: bool = True, baseline: nn.Module | None = None) -> dict[str, Any]:
        """Everything the spec asks for. With out_dir, the CKA matrix and heatmap are written there (cka.json/png).
        `baseline` (optional) is a second student, e.g. the cross-entropy baseline, generated beside the student."""
        spec = self.spec
        res: dict[str, Any] = {"notes": []}
        tf = self.teacher_figures()
        if heldout:
            models = {"student": student}
            if baseline is not None:
                models["baseline"] = baseline
            if self.teacher is not None:
                models["teacher"] = self.teacher
            res["heldout"] = evaluate_models(models, self.val_blocks, reference="teacher" if self.teacher else None,
                                             batch_size=spec.batch_size, bf16={"teacher": self.teacher_bf16},
                                             progress="held-out evaluation")
            precision = ("bfloat16" if self.teacher_bf16 else "float32") if self.teacher is not None else None
            res["heldout_setup"] = heldout_setup(self.val_blocks, precision, spec.batch_size)
        # out-of-domain perplexity
        if self.ood_blocks is None:
            res["ood"] = {"skipped": self.ood_note}
            res["notes"].append(self.ood_note)
        else:
            ood = {"corpus": self.ood_description, "tokens": int(self.ood_blocks.ids.numel()),
                   "student": evaluate_models({"student": student}, self.ood_blocks, batch_size=spec.batch_size,
                                              progress="out-of-domain evaluation")["student"]}
            if "ood" in tf:
                ood["teacher"] = tf["ood"]
            res["ood"] = ood
        # greedy-generation agreement
        if spec.generation:
            with phase("greedy generation"):
                gen = greedy_generate(student, self.tokenizer, self.prompts, spec.new_tokens)
            g: dict[str, Any] = {"prompts": self.prompts, "new_tokens": spec.new_tokens, "student": gen.texts,
                                 "student_tokens": gen.tokens}
            if "generations" in tf:
                g["teacher"] = tf["generations"].texts
                g["teacher_tokens"] = tf["generations"].tokens
                g.update(generation_agreement(tf["generations"].tokens, gen.tokens))
            else:
                res["notes"].append("no teacher: generation agreement not measured")
            if baseline is not None:
                g["baseline"] = greedy_generate(baseline, self.tokenizer, self.prompts, spec.new_tokens).texts
            res["generation"] = g
        # generations on held-out prompts: ROUGE-L, distinct-n, length (kdforge.evaluate.generation_metrics)
        if self.prompt_records:
            from .generation_metrics import answer, evaluate_prompt_generations

            t_answers = self.teacher_answers()
            with phase(f"answering {len(self.prompt_records)} held-out prompts"):
                pg = evaluate_prompt_generations(
                    self.prompt_records, student, self.tokenizer, teacher_answers=t_answers,
                    teacher_tokenizer=self.answer_teacher[1] if self.answer_teacher else None,
                    max_new_tokens=spec.prompt_new_tokens, batch_size=spec.batch_size)
                if baseline is not None:
                    from .generation_metrics import generation_figures

                    texts, counts = answer(baseline, self.tokenizer, pg["prompts"], spec.prompt_new_tokens,
                                           batch_size=spec.batch_size)
                    pg["baseline"] = texts
                    pg["figures"]["baseline"] = generation_figures(texts, counts, pg["references"], t_answers)
            res["prompt_generation"] = pg
        # speed, size, memory
        size = {"student": {"parameters": count_parameters(student), "parameter_bytes": parameter_bytes(student),
                            "safetensors_bytes": safetensors_bytes(student_dir)}}
        if self.teacher is not None:
            size["teacher"] = {k: tf[k] for k in ("parameters", "parameter_bytes", "safetensors_bytes")}
        res["size"] = size
        if spec.speed:
            with phase("speed"):
                prefill = prefill_tokens_per_s(student, self.val_blocks, spec.batch_size)
            speed = {"student": {"prefill_tokens_per_s": prefill}}
            if spec.generation:
                speed["student"]["generation_tokens_per_s"] = gen.generation_tokens_per_s
            if self.teacher is not None:
                speed["teacher"] = {"prefill_tokens_per_s": tf.get("prefill_tokens_per_s")}
                if "generations" in tf:
                    speed["teacher"]["generation_tokens_per_s"] = tf["generations"].generation_tokens_per_s
            speed["definition"] = ("prefill: tokens/s of one no-cache forward over a batch of held-out blocks (best "
                                   "of 2 after a warm-up); generation: tokens/s of greedy decoding at batch 1 with "
                                   "the KV cache, excluding the prompt forward")
            res["speed"] = speed
        # representation similarity
        if spec.cka and self.teacher is not None:
            with phase("layer CKA"):
                matrix = layer_cka(student, self.teacher, self.val_blocks, spec.cka_tokens, spec.batch_size,
                                   teacher_bf16=self.teacher_bf16)
            cka: dict[str, Any] = {"matrix": [[float(v) for v in row] for row in matrix],
                                   "last_to_last": float(matrix[-1, -1]),
                                   "best_per_student_layer": [float(v) for v in matrix.max(1).values]}
            if out_dir is not None:
                write_cka(matrix, out_dir)
                cka["json"], cka["png"] = "cka.json", "cka.png"
            res["cka"] = cka
        res["memory"] = {"peak_rss_bytes": peak_rss_bytes(), "method": PEAK_MEMORY_METHOD}
        res["summary"] = summarize(res)
        return res


def summarize(res: dict[str, Any]) -> dict[str, float]:
    """Flat scalar figures of one evaluation, for tables."""
    out: dict[str, float] = {}
    s = (res.get("heldout") or {}).get("student")
    if s:
        for k in ("perplexity", "bits_per_char", "ece", "top1_agreement", "kl_teacher_student", "kl_student_teacher"):
            if k in s:
                out[k] = s[k]
    ood = res.get("ood") or {}
    if "student" in ood:
        out["ood_perplexity"] = ood["student"]["perplexity"]
    if "teacher" in ood:
        out["teacher_ood_perplexity"] = ood["teacher"]["perplexity"]
    g = res.get("generation") or {}
    if "token_agreement" in g:
        out["gen_token_agreement"] = g["token_agreement"]
        out["gen_exact_match"] = g["exact_match"]
    sp = (res.get("speed") or {}).get("student") or {}
    out.update({k: v for k, v in sp.items() if v is not None})
    sz = (res.get("size") or {}).get("student") or {}
    out.update({k: v for k, v in sz.items() if v is not None})
    if "cka" in res:
        out["cka_last_to_last"] = res["cka"]["last_to_last"]
    pg = ((res.get("prompt_generation") or {}).get("figures") or {}).get("student") or {}
    out.update({k: v for k, v in pg.items() if k != "mean_response_words"})
    if "memory" in res:
        out["peak_rss_bytes"] = res["memory"]["peak_rss_bytes"]
    return out



def _student_folder(path: Path) -> Path:
    if (path / "student" / "config.json").is_file():
        return path / "student"
    if (path / "manifest.json").is_file() and not (path / "config.json").is_file():
        from ..checkpoints import latest_checkpoint

        newest = latest_checkpoint(path)
        last = f" (last checkpoint: {newest.name})" if newest is not None else ""
        raise KDForgeError(f"run '{path}' has not finished, so it has no exported student yet{last}; rerun "
                           "`kdforge distill` with the same recipe and --out to finish it, then evaluate")
    return path


def run_eval(target: str | Path, *, teacher: str | None = None, corpus: str | None = None,
             seq_len: int | None = None, max_tokens: int | None = None, spec: EvalSpec | None = None,
             baseline: str | Path | None = None, out_dir: str | Path | None = None,
             lm_eval_tasks: list[str] | None = None, lm_eval_include: str | Path | None = None,
             lm_eval_limit: float | None = None) -> dict[str, Any]:
    """The causal-LM evaluation of a student folder or a run directory (`kdforge eval` reaches it through
    kdforge.tasks.evaluate_target, which sends the other tasks' runs to their own task).

    For a run directory, the teacher and held-out data default to those of its manifest's recipe, and eval.json,
    cka.json and cka.png are written into it (or into out_dir). teacher='' evaluates without a teacher.
    """
    import json

    from ..data.corpus import load_corpus
    from ..io import atomic_write_json
    from ..models import load_causal_lm, load_teacher, load_tokenizer, resolve_model_path
    from ..recipe import DataSpec, ModelSpec, parse_recipe

    target = Path(target)
    if not target.exists():
        raise KDForgeError(f"'{target}' not found; give a student folder or a run directory")
    folder = _student_folder(target)
    is_run = (target / "manifest.json").is_file()
    recipe = parse_recipe(json.loads((target / "manifest.json").read_text())["recipe"]) if is_run else None
    if recipe is not None and recipe.task != "causal_lm":
        raise KDForgeError(f"'{target}' is a {recipe.task} run and this is the causal-LM evaluation; evaluate it "
                           "with `kdforge eval` (kdforge.tasks.evaluate_target picks the task)")
    # the teacher: as given, else the run's, else the embedded default
    if teacher is None:
        teacher_spec = recipe.teacher if recipe else ModelSpec(model="smollm2-135m")
    else:
        teacher_spec = ModelSpec(model=teacher) if teacher else None
    # held-out data: as given, else the run's, else Shakespeare's lear + tempest
    if corpus is None and recipe is not None:
        data = recipe.data.model_copy(update={k: v for k, v in (("seq_len", seq_len), ("max_eval_tokens", max_tokens))
                                              if v is not None})
    else:
        corpus = corpus or "shakespeare"
        extra = {"seq_len": seq_len or 128, "max_eval_tokens": max_tokens or 16384}
        data = DataSpec(corpus=corpus, **extra) if corpus == "shakespeare" else \
            DataSpec(corpus=corpus, validation=[corpus], **extra)
    with phase(f"loading student {folder}"):
        model = load_causal_lm(ModelSpec(model=str(folder)))
        tok = load_tokenizer(ModelSpec(model=str(folder)))
    with phase(f"tokenizing held-out {data.prompts or data.corpus}"):
        if data.prompts is not None:  # a run on prompt–response records: its held-out responses (prompts masked)
            from ..data.prompts import encode_records, load_prompt_set

            held = load_prompt_set(data, tok).validation
            val = encode_records(held, tok, data.seq_len, data.max_prompt_tokens, data.max_eval_tokens,
                                 "held-out prompt set")[0]
            docs = [r.prompt + r.response for r in held]
        else:
            docs = load_corpus(data, tok).validation
            val = pack(*tokenize_documents(tok, docs), data.seq_len, data.max_eval_tokens, "held-out corpus")
    with phase(f"loading teacher {teacher_spec.model if teacher_spec else ''}", enabled=teacher_spec is not None):
        t_model = load_teacher(teacher_spec) if teacher_spec else None
        t_dir = resolve_model_path(teacher_spec) if teacher_spec else None
    base_model = load_causal_lm(ModelSpec(model=str(_student_folder(Path(baseline))))) if baseline else None
    t_bf16 = bool(teacher_spec and resolve(teacher_spec.dtype) == "bfloat16")
    held_records = held if data.prompts is not None else None
    # a student with its own tokenizer (student.tokenizer): the teacher answers the held-out prompts and is measured
    # on its own tokens, but takes no part in the token-level comparisons (agreement, KL, CKA)
    cross = t_model is not None and (recipe is not None and recipe.student.tokenizer is not None
                                     or len(tok) != int(t_model.get_output_embeddings().weight.shape[0])) \
        and data.prompts is not None
    answer_teacher = None
    if cross:
        t_tok = load_tokenizer(teacher_spec)
        answer_teacher = (t_model, t_tok)
    evaluator = Evaluator(tok, None if cross else t_model, val, spec, teacher_bf16=t_bf16,
                          teacher_dir=t_dir if isinstance(t_dir, Path) else None, prompt_records=held_records,
                          answer_teacher=answer_teacher)
    if out_dir is None and is_run:
        out_dir = target
    res = evaluator.evaluate(model, student_dir=folder, out_dir=out_dir, baseline=base_model)
    if cross:
        from ..cross_tokenizer import encode_pairs

        # the teacher's blocks of the records paired with the student's, as final.json measured them
        t_val = encode_pairs(held, tok, t_tok, data.seq_len, data.max_prompt_tokens, data.max_eval_tokens,
                             "held-out prompt set").teacher
        res.setdefault("heldout", {})["teacher"] = evaluate_models(
            {"teacher": t_model}, t_val, batch_size=evaluator.spec.batch_size, bf16={"teacher": t_bf16},
            progress="teacher: held-out evaluation")["teacher"]
        res["notes"].append("the student has its own tokenizer: the teacher is measured on its own tokens (compare "
                            "bits per character); no token agreement, KL or CKA")
    res["student_path"] = str(folder)
    res["baseline_path"] = str(_student_folder(Path(baseline))) if baseline else None
    res["teacher"] = teacher_spec.model_dump() if teacher_spec else None
    res["data"] = data.model_dump()
    if out_dir is not None:  # written before lm-eval runs, so its failure loses nothing
        atomic_write_json(Path(out_dir) / "eval.json", res)
    if lm_eval_tasks:
        from .lmeval import run_lm_eval

        res["lm_eval"] = run_lm_eval(model, tok, lm_eval_tasks, heldout_documents=docs, include_path=lm_eval_include,
                                     limit=lm_eval_limit, batch_size=evaluator.spec.batch_size)
        if out_dir is not None:
            atomic_write_json(Path(out_dir) / "eval.json", res)
    return res

