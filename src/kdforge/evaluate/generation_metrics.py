"""Generation evaluation on held-out prompts: the student (and the teacher) answer held-out prompt–response records
greedily; the answers are scored by ROUGE-L against the record's real response and against the teacher's answer,
by distinct-1/2 and by mean length.

- ROUGE-L (Lin 2004): the F-measure of the longest common subsequence of the two texts' words, computed with Google's
  `rouge-score` package (``rouge_scorer.RougeScorer(["rougeL"])``; its tokenizer lowercases and keeps runs of
  ``[a-z0-9]``, no stemming), averaged over the prompts.
- distinct-n (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation Models"): the number
  of distinct word n-grams over all answers divided by the number of n-grams (words: whitespace-separated,
  lowercased), corpus-level as in the paper; 0 when no answer has n words.
- mean response length: tokens per answer, in the answering model's own tokenizer (EOS not counted), and words.

Perplexity and teacher agreement on the response tokens are the held-out figures kdforge.evaluate.metrics already
computes on prompt–response blocks (prompts masked).
"""
from __future__ import annotations

from typing import Any

from ..errors import KDForgeError


def _scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:  # pragma: no cover - the eval extra installs it
        raise KDForgeError("ROUGE-L needs the rouge-score package; pip install 'kdforge[eval]' (or rouge-score)") \
            from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure of predictions[i] against references[i] (each in [0, 1]; two empty texts score 0).
    KDForgeError when the lists differ in length or are empty."""
    if len(predictions) != len(references) or not predictions:
        raise KDForgeError(f"ROUGE-L needs one reference per prediction; got {len(predictions)} predictions and "
                           f"{len(references)} references")
    scorer = _scorer()
    return sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)) / \
        len(predictions)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams / n-grams over all texts (lowercased whitespace words); 0.0 when there is no n-gram."""
    if n < 1:
        raise KDForgeError(f"distinct-n needs n >= 1, not {n}")
    grams = []
    for text in texts:
        words = text.lower().split()
        grams += [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def generation_figures(answers: list[str], answer_tokens: list[int], references: list[str],
                       teacher_answers: list[str] | None = None) -> dict[str, float]:
    """The figures of one model's answers: rougeL_reference, rougeL_teacher (with teacher_answers), distinct_1,
    distinct_2, mean_response_tokens, mean_response_words."""
    out = {"rougeL_reference": rouge_l(answers, references), "distinct_1": distinct_n(answers, 1),
           "distinct_2": distinct_n(answers, 2),
           "mean_response_tokens": sum(answer_tokens) / max(len(answer_tokens), 1),
           "mean_response_words": sum(len(a.split()) for a in answers) / max(len(answers), 1)}
    if teacher_answers is not None:
        out["rougeL_teacher"] = rouge_l(answers, teacher_answers)
    return out


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, *, batch_size: int = 8,
           bf16: bool = False) -> tuple[list[str], list[int]]:
    """Greedy answers (text, token count) of ``model`` to ``prompts`` (tokenized without special tokens, batched and
    left-padded through kdforge.generate.generate_batch; a response stops at EOS or ``max_new_tokens``)."""
    from ..generate import generate_batch
    from ..recipe import GenerateSpec

    gen = GenerateSpec(max_new_tokens=max_new_tokens, do_sample=False, batch_size=batch_size)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    texts, counts = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(ids), batch_size):
            for res in generate_batch(model, tokenizer, ids[start:start + batch_size], gen, bf16=bf16):
                texts.append(tokenizer.decode(res["ids"], skip_special_tokens=True))
                counts.append(len(res["ids"]))
    finally:
        model.train(was_training)
    return texts, counts


def evaluate_prompt_generations(records, student, student_tokenizer, *, teacher=None, teacher_tokenizer=None,
                                max_new_tokens: int = 48, batch_size: int = 8, teacher_bf16: bool = False,
                                teacher_answers: list[str] | None = None) -> dict[str, Any]:
    """Answer held-out ``records`` (kdforge.data.prompts.PromptRecord with a response) with the student and the
    teacher (each with its own tokenizer; ``teacher_answers`` reuses answers already made) and score them.

    Returns {"prompts", "references", "student": [answers], "teacher": [answers] | absent, "figures": {"student":
    generation_figures, "teacher": ... }, "max_new_tokens", "definition"}. KDForgeError when no record has a
    response."""
    records = [r for r in records if r.response]
    if not records:
        raise KDForgeError("no held-out prompt has a response to score generations against; give held-out "
                           "prompt–response records (data.validation or data.validation_split)")
    prompts = [r.prompt for r in records]
    references = [r.reference or r.response for r in records]
    result: dict[str, Any] = {"prompts": prompts, "references": references, "max_new_tokens": max_new_tokens}
    if teacher is not None and teacher_answers is None:
        teacher_answers, t_counts = answer(teacher, teacher_tokenizer, prompts, max_new_tokens,
                                           batch_size=batch_size, bf16=teacher_bf16)
        result["teacher_tokens"] = t_counts
    s_answers, s_counts = answer(student, student_tokenizer, prompts, max_new_tokens, batch_size=batch_size)
    result["student"] = s_answers
    result["figures"] = {"student": generation_figures(s_answers, s_counts, references, teacher_answers)}
    if teacher_answers is not None:
        result["teacher"] = teacher_answers
        counts = result.get("teacher_tokens") or [len(teacher_tokenizer(a, add_special_tokens=False)["input_ids"])
                                                   for a in teacher_answers]
        figures = generation_figures(teacher_answers, counts, references)
        result["figures"]["teacher"] = figures
    result["definition"] = ("greedy answers to held-out prompts (at most max_new_tokens, stopped at EOS); ROUGE-L: "
                            "rouge-score's LCS F-measure, mean over prompts; distinct-n: distinct / all word n-grams "
                            "over all answers; length in the answering model's tokens")
    return result
