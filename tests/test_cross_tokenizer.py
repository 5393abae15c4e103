"""Cross-tokenizer KD (kdforge.cross_tokenizer, kdforge.losses.cross_tokenizer, kdforge.align.tokenizers): the ULD loss
against a direct computation and its identities, span alignment of two known tokenizations, the shared-vocabulary
mapping, the paired blocks, refusal of an unusable pair with its figures, and training end to end on tiny models."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdforge.align.tokenizers import (SharedVocabulary, align_spans, check_alignment, shared_vocabulary,
                                      spans_from_offsets, vocabulary_bytes)
from kdforge.cross_tokenizer import encode_pairs, train_bpe_tokenizer
from kdforge.data.prompts import PromptRecord
from kdforge.errors import KDForgeError
from kdforge.losses.cross_tokenizer import span_kl, uld


def _direct_uld(s_logits, t_logits, mask):
    """Boizard et al.'s loss written out with Python lists: per pair, sort both softmaxes, pad, L1; mean per example
    over its pairs, then mean over examples."""
    per_example = []
    for b in range(s_logits.shape[0]):
        dists = []
        for k in range(s_logits.shape[1]):
            if not mask[b, k]:
                continue
            ps = sorted(torch.softmax(s_logits[b, k].double(), -1).tolist(), reverse=True)
            pt = sorted(torch.softmax(t_logits[b, k].double(), -1).tolist(), reverse=True)
            n = max(len(ps), len(pt))
            ps, pt = ps + [0.0] * (n - len(ps)), pt + [0.0] * (n - len(pt))
            dists.append(sum(abs(a - c) for a, c in zip(ps, pt)))
        if dists:
            per_example.append(sum(dists) / len(dists))
    return sum(per_example) / len(per_example)


def test_uld_equals_a_direct_computation_on_hand_made_distributions():
    s = torch.tensor([[[2.0, 0.0, -1.0, 0.5], [0.1, 0.2, 0.3, 0.4], [5.0, 0.0, 0.0, 0.0]],
                      [[1.0, 1.0, 1.0, 1.0], [-2.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    t = torch.tensor([[[0.0, 1.0, 2.0, 3.0, -1.0, -5.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 6],
                      [[3.0, -1.0, 0.0, 0.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.5, 4.0], [9.0, 0.0, 0.0, 0.0, 0, 0]]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # example 2 has two pairs
    got = uld(s, t, mask=mask)
    assert got.item() == pytest.approx(_direct_uld(s, t, mask), abs=1e-6)
    # the student's vocabulary the larger one: the teacher's sorted vector is the one padded
    assert uld(t, s, mask=mask).item() == pytest.approx(_direct_uld(t, s, mask), abs=1e-6)
    # one hand-checked pair: student (0.5, 0.5), teacher (1, 0, 0): |0.5-1| + |0.5-0| + |0-0| = 1
    one = uld(torch.tensor([[[0.0, 0.0]]]), torch.tensor([[[100.0, 0.0, 0.0]]]))
    assert one.item() == pytest.approx(1.0, abs=1e-6)
    # temperatures: the authors' separate student / teacher temperatures divide the logits first
    warm = uld(s, t, mask=mask, student_temperature=2.0, teacher_temperature=0.5)
    assert warm.item() == pytest.approx(_direct_uld(s / 2.0, t / 0.5, mask), abs=1e-6)


def test_uld_is_zero_for_equal_sorted_probabilities_and_invariant_to_permutations():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5)
    perm = torch.randperm(5)
    # the teacher's distribution is the student's with its tokens permuted, over a larger vocabulary whose extra
    # tokens have (numerically) zero probability: the sorted vectors are equal
    t = torch.cat([s[..., perm], torch.full((2, 3, 4), -1e4)], dim=-1)
    assert uld(s, t).item() == pytest.approx(0.0, abs=1e-6)
    u = torch.randn(2, 3, 7)
    base = uld(s, u)
    assert base.item() > 0.01
    assert uld(s[..., perm], u).item() == pytest.approx(base.item(), abs=1e-6)
    assert uld(s, u[..., torch.randperm(7)]).item() == pytest.approx(base.item(), abs=1e-6)
    # gradients reach the student only
    s.requires_grad_(True)
    uld(s, u).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_span_kl_is_kl_over_the_shared_strings_renormalised():
    s = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    t = torch.tensor([[0.0, 2.0, 1.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    s_ids, t_ids = torch.tensor([0, 1, 2]), torch.tensor([3, 1, 0])  # three shared strings
    expect = 0.0
    for i in range(2):
        p = torch.softmax(t[i, t_ids].double(), -1)
        q = torch.softmax(s[i, s_ids].double(), -1)
        expect += float((p * (p.log() - q.log())).sum()) / 2
    assert span_kl(s, t, s_ids, t_ids).item() == pytest.approx(expect, abs=1e-6)
    masked = span_kl(s, t, s_ids, t_ids, mask=torch.tensor([True, False]), temperature=2.0)
    p = torch.softmax(t[0, t_ids].double() / 2, -1)
    q = torch.softmax(s[0, s_ids].double() / 2, -1)
    assert masked.item() == pytest.approx(4 * float((p * (p.log() - q.log())).sum()), abs=1e-6)


def test_span_alignment_of_a_hand_made_string_with_two_known_tokenizations():
    text = "the king's crown"
    student = ["the", " king", "'s", " crown"]
    teacher = ["the", " ki", "ng", "'", "s", " crown"]

    def offsets(tokens, trim_space=False):  # like a byte-level tokenizer with trim_offsets: leading space dropped
        out, pos = [], 0
        for tok in tokens:
            start = pos + (1 if trim_space and tok.startswith(" ") else 0)
            pos += len(tok)
            out.append((start, pos))
        return out

    s_spans = spans_from_offsets(offsets(student))
    t_spans = spans_from_offsets(offsets(teacher, trim_space=True))  # trimmed offsets make the same partition
    assert [text[a:b] for a, b in s_spans] == student
    assert [text[a:b] for a, b in t_spans] == teacher
    assert align_spans(s_spans, t_spans) == [(0, 0), (3, 5)]  # "the" and " crown"
    # a token adding no character (EOS, or the second half of a split character) is never aligned
    assert align_spans([(0, 3), (3, 3)], [(0, 3), (3, 3)]) == [(0, 0)]


@pytest.fixture(scope="module")
def pair(tiny_assets):
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    student = train_bpe_tokenizer([tiny_assets["train"].read_text()], 320)
    return student, teacher


def test_the_shared_vocabulary_maps_each_string_to_its_id_on_both_sides(pair):
    student, teacher = pair
    assert len(student) == 320
    shared = shared_vocabulary(student, teacher)
    s_bytes, t_bytes = vocabulary_bytes(student), vocabulary_bytes(teacher)
    assert shared.size == len(s_bytes.keys() & t_bytes.keys()) > 100
    assert shared.student_size == len(s_bytes) and shared.teacher_size == len(t_bytes)
    for s_id, t_id in zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()):
        assert student.decode([s_id]) == teacher.decode([t_id])
    assert student.eos_token_id not in shared.student_ids.tolist()
    assert not {teacher.eos_token_id, teacher.unk_token_id} & set(shared.teacher_ids.tolist())


def test_paired_blocks_pair_the_same_text_on_both_sides(pair):
    student, teacher = pair
    records = [PromptRecord("a", "The king hath ", "spoken to the fair lady of the sea."),
               PromptRecord("b", "Thou ", "art mine, sweet sister.")]
    pb = encode_pairs(records, student, teacher, seq_len=40)
    assert pb.stats.kept == 2
    for row in range(2):
        s_ids, t_ids = pb.student.ids[row], pb.teacher.ids[row]
        spans = [(a, b) for a, b in zip(pb.span_student[row].tolist(), pb.span_teacher[row].tolist()) if a >= 0]
        assert spans
        for a, b in spans:  # the tokens both positions predict are the same characters
            assert student.decode([int(s_ids[a + 1])]) == teacher.decode([int(t_ids[b + 1])])
        # uld: the k-th response token of each side, as many as the shorter response
        n_s = int((pb.student.labels[row] != -100).sum())
        n_t = int((pb.teacher.labels[row] != -100).sum())
        uld_s = [a for a in pb.uld_student[row].tolist() if a >= 0]
        uld_t = [b for b in pb.uld_teacher[row].tolist() if b >= 0]
        assert len(uld_s) == len(uld_t) == min(n_s, n_t)
        assert pb.student.labels[row, uld_s[0] + 1] != -100 and pb.student.labels[row, uld_s[0]] == -100
        assert pb.teacher.labels[row, uld_t[0] + 1] != -100 and pb.teacher.labels[row, uld_t[0]] == -100
        assert uld_s == list(range(uld_s[0], uld_s[0] + len(uld_s)))
    assert 0 < pb.aligned_fraction <= 1


def test_an_unusable_pair_is_refused_with_its_figures():
    shared = SharedVocabulary(torch.tensor([3, 4]), torch.tensor([7, 9]), student_size=500, teacher_size=49000)
    with pytest.raises(KDForgeError) as err:
        check_alignment(shared, aligned=12, tokens=1000, min_shared_fraction=0.5, min_aligned_fraction=0.3)
    text = str(err.value)
    assert "\n" not in text
    assert "2 shared vocabulary strings (0.4% of the student's 500" in text
    assert "12 of 1,000 student response tokens (1.2%" in text and "use uld" in text
    ok = check_alignment(shared, aligned=900, tokens=1000, min_shared_fraction=0.001, min_aligned_fraction=0.3)
    assert ok["aligned_fraction"] == pytest.approx(0.9) and ok["shared_strings"] == 2


def _cross_recipe(tiny_recipe, tmp_path, objective, **student):
    from conftest import make_text

    rows = []
    for i in range(14):
        text = make_text(30, i).replace("\n", " ")
        rows.append({"prompt": text[:40], "response": text[40:120]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    return {**tiny_recipe, "objective": objective,
            "student": {**tiny_recipe["student"], "tokenizer": "bpe:320", **student},
            "data": {"prompts": str(tmp_path / "train.jsonl"), "validation": [str(tmp_path / "val.jsonl")],
                     "seq_len": 48},
            "train": {**tiny_recipe["train"], "steps": 3, "save_every": 2}}


def test_uld_and_span_kl_train_a_student_with_its_own_bpe_tokenizer(tiny_recipe, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.recipe import parse_recipe
    from kdforge.train import train

    recipe = parse_recipe(_cross_recipe(tiny_recipe, tmp_path, [
        {"loss": "cross_entropy"}, {"loss": "uld", "weight": 1.5},
        {"loss": "span_kl", "weight": 0.5, "min_shared_fraction": 0.2, "min_aligned_fraction": 0.1}]))
    run = train(recipe, progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss/uld" in r][-1]
    assert 0 < last["loss/uld"] <= 2 and last["loss/span_kl"] > 0 and math.isfinite(last["loss"])
    final = json.loads((run / "final.json").read_text())
    assert final["student"]["bits_per_char"] > 0 and final["teacher"]["bits_per_char"] > 0
    assert "top1_agreement" not in final["student"]
    assert final["cross_tokenizer"]["student_vocabulary"] == 320
    assert 0 < final["cross_tokenizer"]["heldout_aligned_fraction"] <= 1
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    tok = AutoTokenizer.from_pretrained(run / "student")
    assert len(tok) == 320 and student.get_output_embeddings().weight.shape[0] == 320
    # resume: the same tokenizer is learnt again, so the data fingerprint matches and the run extends
    recipe.train.steps = 4
    run = train(recipe, progress=False)
    assert json.loads((run / "final.json").read_text())["step"] == 4


def test_sequence_level_kd_with_any_tokenizer_pair_and_refusals(tiny_recipe, tmp_path):
    from kdforge.recipe import parse_recipe
    from kdforge.train import train

    recipe = parse_recipe(_cross_recipe(tiny_recipe, tmp_path, [{"loss": "cross_entropy"}]))
    run = train(recipe, progress=False)
    final = json.loads((run / "final.json").read_text())
    assert final["student"]["perplexity"] > 0 and final["teacher"]["perplexity"] > 0
    # span_kl on a pair below the recipe's thresholds: refused before training, with the figures
    bad = parse_recipe({**_cross_recipe(tiny_recipe, tmp_path, [
        {"loss": "cross_entropy"}, {"loss": "span_kl", "min_shared_fraction": 0.99}]), "output_dir": str(tmp_path / "b")})
    with pytest.raises(KDForgeError, match=r"no usable alignment: \d+ shared vocabulary strings"):
        train(bad, progress=False)
    # a token-for-token loss with different tokenizers, and uld without student.tokenizer, are refused
    with pytest.raises(KDForgeError, match="use cross_entropy, uld or span_kl"):
        train(parse_recipe({**_cross_recipe(tiny_recipe, tmp_path, [{"loss": "forward_kl"}]),
                            "output_dir": str(tmp_path / "c")}), progress=False)
    with pytest.raises(Exception, match="set student.tokenizer"):
        parse_recipe({**tiny_recipe, "objective": [{"loss": "uld"}]})


def test_the_recipe_knows_the_registry_s_cross_tokenizer_losses():
    from kdforge.losses import registry
    from kdforge.recipe import CROSS_TOKENIZER_LOSSES

    assert set(CROSS_TOKENIZER_LOSSES) == set(registry.CROSS_TOKENIZER_LOSSES)


def test_seqkd_recipe_with_a_student_of_another_tokenizer(tiny_assets, tmp_path):
    """recipes/seqkd.yaml with student.tokenizer: the teacher's generated text is re-tokenized by the student's BPE."""
    from pathlib import Path

    from conftest import make_text

    from kdforge.generate import generate_responses
    from kdforge.recipe import load_recipe
    from kdforge.train import train

    rows = [{"prompt": make_text(12, i).replace("\n", " ")[:40], "response": "x"} for i in range(12)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = [{"prompt": make_text(30, 50 + i)[:40], "response": make_text(30, 50 + i)[40:120]} for i in range(3)]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "seqkd.yaml"
    recipe = load_recipe(shipped, [
        f"output_dir={tmp_path / 'run'}", f"teacher.model={tiny_assets['teacher']}", "teacher.dtype=float32",
        f"generate.prompts={tmp_path / 'prompts.jsonl'}", "generate.max_new_tokens=8", "generate.max_prompts=10",
        f"data.prompts={tmp_path / 'seqkd.jsonl'}", f"data.validation=[{tmp_path / 'held.jsonl'}]", "data.seq_len=32",
        "student.tokenizer=bpe:320", "student.config={hidden_size: 32, num_hidden_layers: 2, intermediate_size: 64, "
        "num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8}",
        "train.steps=2", "train.batch_size=4", "train.warmup_steps=1"])
    assert generate_responses(recipe, progress=False)["written"] == 10
    run = train(recipe, progress=False)
    final = json.loads((run / "final.json").read_text())
    assert final["cross_tokenizer"]["student_vocabulary"] == 320 and final["student"]["perplexity"] > 0
    answers = [json.loads(x)["response"] for x in (tmp_path / "seqkd.jsonl").read_text().splitlines()[1:]]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "student")  # the student's own BPE, exported with it
    assert len(tok) == 320 and tok.decode(tok(answers[0], add_special_tokens=False)["input_ids"]) == answers[0]
