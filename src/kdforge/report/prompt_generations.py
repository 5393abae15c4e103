"""The report's section on generations for held-out prompts (eval.json's ``prompt_generation``, written by
kdforge.evaluate.suite for a run on prompt–response data): a table of each model's ROUGE-L (against the real
response and against the teacher's answer), distinct-1/2 and mean length, then one table per prompt with the real
response and every model's answer side by side."""
from __future__ import annotations

from typing import Any

FIGURES = [("rougeL_reference", "ROUGE-L vs real"), ("rougeL_teacher", "ROUGE-L vs teacher"),
           ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
           ("mean_response_tokens", "mean length (tokens)"), ("mean_response_words", "mean length (words)")]


def prompt_generations_section(rep, prompts: list[str], references: list[str],
                               answers: dict[str, list[str]], figures: dict[str, dict[str, Any]],
                               max_prompts: int = 8) -> None:
    """Add the section to ``rep`` (kdforge.report.build.Report): ``answers`` and ``figures`` keyed by model label
    (teacher, baseline, student or a bench method), in the order to show; at most ``max_prompts`` prompts."""
    rep.heading("Generations on held-out prompts")
    rows = [[name] + [fig.get(k) for k, _ in FIGURES] for name, fig in figures.items()]
    if rows:
        rep.table(["model"] + [title for _, title in FIGURES], rows,
                  caption=f"greedy answers to {len(prompts)} held-out prompts (ROUGE-L: rouge-score's LCS F-measure; "
                          "distinct-n: distinct / all word n-grams)")
    for i, prompt in enumerate(prompts[:max_prompts]):
        side = [["real continuation", references[i]]] + [[name, texts[i]] for name, texts in answers.items()
                                                         if texts and i < len(texts)]
        rep.table(["model", "answer"], side, caption=f"held-out prompt {i + 1}: {prompt!r}")


def from_eval(rep, ev: dict[str, Any] | None) -> bool:
    """The section from one eval.json (teacher, baseline, student); False when it holds no prompt generations."""
    pg = (ev or {}).get("prompt_generation")
    if not pg:
        return False
    answers = {name: pg.get(name) for name in ("teacher", "baseline", "student") if pg.get(name)}
    figures = {name: pg["figures"][name] for name in answers if name in pg.get("figures", {})}
    prompt_generations_section(rep, pg["prompts"], pg["references"], answers, figures)
    return True


def from_cells(rep, evals: dict[str, dict[str, Any]]) -> bool:
    """The section for a bench: ``evals`` maps a method label to one of its cells' eval.json; the teacher's answers
    from the first cell that has them. False when no cell holds prompt generations."""
    pgs = {label: ev["prompt_generation"] for label, ev in evals.items() if (ev or {}).get("prompt_generation")}
    if not pgs:
        return False
    first = next(iter(pgs.values()))
    answers: dict[str, list[str]] = {}
    figures: dict[str, dict[str, Any]] = {}
    teacher = next((pg for pg in pgs.values() if pg.get("teacher")), None)
    if teacher is not None:
        answers["teacher"] = teacher["teacher"]
        if "teacher" in teacher.get("figures", {}):
            figures["teacher"] = teacher["figures"]["teacher"]
    for label, pg in pgs.items():
        if pg["prompts"] == first["prompts"]:
            answers[label] = pg["student"]
            figures[label] = pg["figures"]["student"]
    prompt_generations_section(rep, first["prompts"], first["references"], answers, figures)
    return True
