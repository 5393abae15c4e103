"""End-to-end training on tiny offline assets: runs, exports, resumes exactly, and refuses bad input clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdforge import Distiller
from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.train import train


def _final(out: Path) -> dict:
    return json.loads((out / "final.json").read_text())


def test_distill_end_to_end_exports_plain_transformers_student(tiny_recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train(parse_recipe(tiny_recipe), progress=False)
    final = _final(out)
    assert final["student"]["perplexity"] > 1 and final["teacher"]["perplexity"] > 1
    assert 0 <= final["student"]["top1_agreement"] <= 1 and final["student"]["kl_teacher_student"] >= 0
    model = AutoModelForCausalLM.from_pretrained(out / "student")
    tok = AutoTokenizer.from_pretrained(out / "student")
    logits = model(**tok("the king", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe_hash"] == parse_recipe(tiny_recipe).hash()
    assert {"torch", "transformers", "accelerate"} <= set(man["versions"]) and man["seed"] == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["loss/cross_entropy"] < rows[0]["loss/cross_entropy"]


def test_killed_run_resumes_exactly(tiny_recipe, tmp_path, monkeypatch):
    ref = train(parse_recipe({**tiny_recipe, "output_dir": str(tmp_path / "ref")}), progress=False)

    recipe = parse_recipe({**tiny_recipe, "output_dir": str(tmp_path / "killed")})
    original = Distiller.forward

    def dies_at_step_4(self, batch, **kw):
        if kw.get("step") == 4:
            raise KeyboardInterrupt  # a kill between the checkpoints at steps 3 and 6
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    assert not (tmp_path / "killed" / "final.json").exists()
    monkeypatch.setattr(Distiller, "forward", original)
    resumed = train(recipe, progress=False)

    quality = lambda out: {k: v for k, v in _final(out)["student"].items() if k != "tokens_per_s"}  # noqa: E731
    assert quality(resumed) == quality(ref)  # bit-identical, not approximately equal
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    read = lambda p: [json.loads(l) for l in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(resumed)) == strip(read(ref))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resumed_metrics_log_equals_the_uninterrupted_log(tiny_recipe, tmp_path, monkeypatch):
    """Stop after 5 of 6 steps (checkpoint at 4, the eval row of step 5 already written, then a row cut off
    mid-write), resume to 6: metrics.jsonl equals the uninterrupted run's in every field but tokens_per_s (the one
    wall-clock field), including the cumulative `tokens`; no row is duplicated, and the resumed launch adds no row
    off the log_every grid (step 5)."""
    base = {**tiny_recipe, "train": {**tiny_recipe["train"], "save_every": 2, "log_every": 3, "eval_every": 5}}
    ref = train(parse_recipe({**base, "output_dir": str(tmp_path / "ref")}), progress=False)
    recipe = parse_recipe({**base, "output_dir": str(tmp_path / "stopped")})
    original = Distiller.forward

    def stops_at_step_6(self, batch, **kw):
        if kw.get("step") == 5:  # 0-based: steps 1-5 are done, the checkpoint is at 4
            raise KeyboardInterrupt
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", stops_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    stopped = tmp_path / "stopped"
    assert [r["step"] for r in _rows(stopped)] == [1, 3, 5]  # the eval row of step 5 is to be dropped on resume
    with open(stopped / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 3.1')  # a kill in the middle of writing a row
    monkeypatch.setattr(Distiller, "forward", original)
    train(recipe, progress=False)

    got, want = _rows(stopped), _rows(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 3, 5, 6]  # training rows, eval at 5
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for key in w:
            if key != "tokens_per_s":
                assert g[key] == w[key], (w["step"], key)
    assert got[-1]["tokens"] == 6 * 4 * 31  # steps x global batch x targets per block
    state = torch.load(stopped / "checkpoints" / "step_00000006" / "trainer_state.pt", weights_only=False)
    assert state["tokens_seen"] == got[-1]["tokens"] and state["train_seconds"] > 0
    assert state["layout"] == {"global_batch": 4, "order_micro_batch": 4, "world_size": 1, "batch_size": 4,
                               "grad_accum": 1}


def test_corrupt_metrics_row_is_refused_on_resume(tiny_recipe, tmp_path):
    from kdforge.train import _rewrite_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(KDForgeError, match=r"line 2 is not a metrics row.*repair or delete that line"):
        _rewrite_metrics(path, 1)
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    _rewrite_metrics(path, 1)
    assert path.read_text() == '{"step": 1}\n'


def test_batch_layout_keeps_the_global_batch_across_world_sizes():
    from kdforge.distributed import batch_layout

    two = batch_layout(2, 1, 2)  # 2 ranks x batch 2
    saved = {"global_batch": two.global_batch, "order_micro_batch": two.order_micro_batch, "world_size": 2}
    one = batch_layout(2, 1, 1, saved)  # resumed by 1 process: accumulates 2 micro-batches of 2
    assert (one.global_batch, one.batch_size, one.grad_accum) == (4, 2, 2)
    four = batch_layout(2, 1, 4, saved)  # by 4 processes: 1 block each
    assert (four.global_batch, four.batch_size, four.grad_accum) == (4, 1, 1)
    assert batch_layout(2, 1, 2, saved) == two  # the same world size: the recipe's layout
    for layout in (one, four):  # every step reads the same blocks, in the same order, whatever the split
        for step in (0, 7, 40):  # 40: a later epoch
            want = torch.cat(two.step_indices(50, step, 3, 0) + two.step_indices(50, step, 3, 1))
            parts = [layout.step_indices(50, step, 3, r) for r in range(layout.world_size)]
            got = torch.cat([parts[r][j] for j in range(layout.grad_accum) for r in range(layout.world_size)])
            assert torch.equal(got, want)
    with pytest.raises(KDForgeError, match=r"checkpointed with 2 process\(es\) .* 3 processes cannot split"):
        batch_layout(2, 1, 3, saved)
    with pytest.raises(KDForgeError, match="under DeepSpeed .* resume with 2 processes"):
        batch_layout(2, 1, 1, saved, deepspeed=True)


def test_nan_loss_stops_and_names_the_step(tiny_recipe, monkeypatch):
    original = Distiller.forward

    def nan_at_step_4(self, batch, **kw):
        total, values = original(self, batch, **kw)
        return (total * float("nan") if kw.get("step") == 4 else total), values

    monkeypatch.setattr(Distiller, "forward", nan_at_step_4)
    with pytest.raises(KDForgeError, match=r"loss became nan at step 4.*step_00000003"):
        train(parse_recipe(tiny_recipe), progress=False)
    assert (Path(tiny_recipe["output_dir"]) / "checkpoints" / "step_00000003").is_dir()


def test_other_recipe_in_same_output_dir_is_refused(tiny_recipe):
    train(parse_recipe(tiny_recipe), progress=False)
    changed = {**tiny_recipe, "seed": 1}
    with pytest.raises(KDForgeError, match="different recipe"):
        train(parse_recipe(changed), progress=False)


def test_unwritable_output_dir(tiny_recipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(KDForgeError, match="cannot write to output dir"):
        train(parse_recipe({**tiny_recipe, "output_dir": str(blocker / "run")}), progress=False)


def test_too_short_corpus(tiny_recipe, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the king")
    with pytest.raises(KDForgeError, match="fewer than one block of data.seq_len=32; add text or lower data.seq_len"):
        train(parse_recipe({**tiny_recipe, "data": {**tiny_recipe["data"], "corpus": str(short)}}), progress=False)


def test_jsonl_corpus_and_missing_field(tiny_recipe, tiny_assets, tmp_path):
    rows = [{"text": line} for line in tiny_assets["train"].read_text().splitlines()]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "corpus": str(path)}}
    recipe["train"] = {**recipe["train"], "steps": 2}
    assert (train(parse_recipe(recipe), progress=False) / "final.json").is_file()
    recipe["data"]["text_field"] = "body"
    with pytest.raises(KDForgeError, match="no field 'body'"):
        train(parse_recipe({**recipe, "output_dir": str(tmp_path / "o2")}), progress=False)


def test_grad_accumulation_matches_one_big_batch(tiny_recipe):
    """Two micro-batches normalised by the global token count give the big batch's gradient."""
    from kdforge.train import prepare
    from kdforge.distiller import shifted_targets

    setup = prepare(parse_recipe(tiny_recipe))
    d = setup.distiller
    ids = setup.train_blocks.ids[:4]
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0  # uneven valid counts make a per-micro-batch mean wrong
    big = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    loss, _ = d(big)
    loss.backward()
    ref = [p.grad.clone() for p in d.student.parameters()]
    d.zero_grad()
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    n = sum(shifted_targets(h)[1].sum() for h in halves).float()
    for h in halves:
        d(h, num_tokens=n)[0].backward()
    for a, b in zip(ref, (p.grad for p in d.student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_distiller_returns_detached_named_terms(tiny_recipe):
    from kdforge.train import prepare

    setup = prepare(parse_recipe(tiny_recipe))
    ids = setup.train_blocks.ids[:2]
    total, terms = setup.distiller({"input_ids": ids, "labels": ids})
    assert set(terms) == {"cross_entropy", "forward_kl"}
    assert total.requires_grad and not any(v.requires_grad for v in terms.values())
    torch.testing.assert_close(total, 0.5 * terms["cross_entropy"] + 0.5 * terms["forward_kl"])


def test_the_exported_student_carries_a_model_card_and_its_own_name(tiny_recipe):
    """Issue 16: a model card (teacher, objective, data, held-out figures, kdforge version); config.json no longer
    names the teacher the student's config was derived from."""
    from kdforge import __version__

    out = train(parse_recipe(tiny_recipe), progress=False)
    card = (out / "student" / "README.md").read_text()
    final = json.loads((out / "final.json").read_text())
    assert f"kdforge {__version__}" in card and str(tiny_recipe["teacher"]["model"]) in card
    assert "`cross_entropy` weight 0.5" in card and "`forward_kl` weight 0.5" in card
    assert f"| held-out perplexity | {final['student']['perplexity']:.4g} | {final['teacher']['perplexity']:.4g} |" in card
    config = json.loads((out / "student" / "config.json").read_text())
    assert config.get("_name_or_path", "tiny") == "tiny"
