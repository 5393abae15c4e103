"""Partial-to-whole KD: a curriculum of teachers (depth-truncated sub-networks or other models) with a cyclic LR."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kdforge import Distiller
from kdforge.errors import KDForgeError
from kdforge.losses.logits import forward_kl
from kdforge.models import student_from_teacher_layers, tiny_llama
from kdforge.recipe import CurriculumSpec, parse_recipe
from kdforge.teachers.curriculum import CurriculumTeacher, TeacherStage
from kdforge.train import lr_lambda, stage_boundaries

VOCAB = 64


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(vocab_size=VOCAB, hidden=32, layers=4, heads=4, seed=1).eval().requires_grad_(False)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _three_stages(teacher) -> CurriculumTeacher:
    return CurriculumTeacher(teacher, [TeacherStage(0, 3, layers=1), TeacherStage(3, 6, layers=2),
                                       TeacherStage(6, 10)])


def test_stage_switching_at_the_right_steps(teacher, caplog):
    cur = _three_stages(teacher)
    assert [cur.stage_index(s) for s in range(10)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert cur.boundaries == [3, 6]
    calls = []
    hooks = [layer.register_forward_hook(lambda m, a, o, j=j: calls.append(j))
             for j, layer in enumerate(teacher.model.layers)]
    try:
        with caplog.at_level(logging.INFO, logger="kdforge"):
            for step in range(10):
                calls.clear()
                cur(_batch(), step=step)
                assert calls == list(range([1, 1, 1, 2, 2, 2, 4, 4, 4, 4][step]))  # only the first L blocks run
    finally:
        for h in hooks:
            h.remove()
    switches = [r.getMessage() for r in caplog.records if "stage" in r.getMessage() and "from step" in r.getMessage()]
    assert [m.split(" from step ")[1].split(":")[0] for m in switches] == ["0", "3", "6"]
    assert "stage 2/3" in switches[1] and "depth 2 of 4" in switches[1]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_truncated_teacher_equals_a_model_of_its_first_layers(teacher, depth):
    cur = CurriculumTeacher(teacher, [TeacherStage(0, 1, layers=depth)])
    batch = _batch()
    manual = student_from_teacher_layers(teacher, list(range(depth))).eval()
    with torch.no_grad():
        ref = manual(**batch).logits
    got = cur(batch, step=0).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=0, atol=1e-5)
    full = cur(batch).logits if depth == 4 else teacher(**batch).logits
    assert not torch.allclose(got, full)


def test_distiller_threads_the_step_to_the_curriculum(teacher):
    student = tiny_llama(vocab_size=VOCAB, hidden=24, layers=2, heads=4, seed=2)
    d = Distiller(_three_stages(teacher), student, [{"loss": "forward_kl"}])
    batch = _batch()
    with torch.no_grad():
        s = student(**batch).logits[:, :-1]
        mask = batch["attention_mask"][:, 1:].bool()
        for step, depth in ((0, 1), (4, 2), (9, 4)):
            t = student_from_teacher_layers(teacher, list(range(depth))).eval()(**batch).logits[:, :-1]
            torch.testing.assert_close(d(batch, step=step)[1]["forward_kl"], forward_kl(s, t, mask=mask))


def test_lr_restarts_at_stage_boundaries():
    spec = CurriculumSpec.model_validate({"stages": [{"layers": 1, "steps": 30}, {"layers": 2}, {}]})
    assert spec.stage_steps(100) == [30, 35, 35]
    recipe = parse_recipe({"teacher": {"model": "t", "curriculum": spec.model_dump()}, "train": {"steps": 100}})
    bounds = stage_boundaries(recipe)
    assert bounds == [30, 65]
    lrs = [lr_lambda(s, 5, 100, 0.1, bounds) for s in range(100)]
    for start, stop in ((0, 30), (30, 65), (65, 100)):
        stage = lrs[start:stop]
        assert stage[:5] == pytest.approx([(k + 1) / 5 for k in range(5)])  # warm-up restarts
        assert stage[4] == pytest.approx(1.0) and stage[-1] < 0.15  # peak, then cosine to ~min_lr_ratio per stage
    no_restart = parse_recipe({"teacher": {"model": "t", "curriculum": {**spec.model_dump(), "cyclic_lr": False}},
                               "train": {"steps": 100}})
    assert stage_boundaries(no_restart) == []
    assert [lr_lambda(s, 5, 100, 0.1) for s in range(100)] == [lr_lambda(s, 5, 100, 0.1, []) for s in range(100)]


def test_curriculum_recipe_validation_errors(teacher):
    base = {"teacher": {"model": "t"}, "train": {"steps": 10}}
    with pytest.raises(KDForgeError, match="sum to 8 but train.steps is 10"):
        parse_recipe({**base, "teacher": {"model": "t", "curriculum": {"stages": [{"steps": 4}, {"steps": 4}]}}})
    with pytest.raises(KDForgeError, match="leaving 0 for 1 stage"):
        parse_recipe({**base, "teacher": {"model": "t", "curriculum": {"stages": [{"steps": 10}, {}]}}})
    with pytest.raises(KDForgeError, match="layers"):
        parse_recipe({**base, "teacher": {"model": "t", "curriculum": {"stages": [{"layers": 0}]}}})
    with pytest.raises(KDForgeError, match="unknown recipe key 'teacher.curriculum.stages.0.depth'"):
        parse_recipe({**base, "teacher": {"model": "t", "curriculum": {"stages": [{"depth": 2}]}}})
    with pytest.raises(KDForgeError, match="stage 2 asks for 5 teacher layers but the teacher has 4"):
        CurriculumTeacher(teacher, [TeacherStage(0, 5, layers=2), TeacherStage(5, 10, layers=5)])
    cur = CurriculumTeacher(teacher, [TeacherStage(0, 5, layers=2)])

    class HiddenStateTaps:
        def names(self):
            return ["h"]

        def needs_hf_outputs(self):
            return {"output_hidden_states": True}

    with pytest.raises(KDForgeError, match="cannot give HF-output taps"):
        cur(_batch(), HiddenStateTaps(), step=0)


def test_stages_of_other_models_load_lazily_and_release(teacher):
    other = tiny_llama(vocab_size=VOCAB, hidden=16, layers=2, heads=2, seed=7)
    loads = []

    def load(name):
        loads.append(name)
        return other if name == "small" else tiny_llama(vocab_size=VOCAB + 1, hidden=16, layers=2, heads=2)

    cur = CurriculumTeacher(teacher, [TeacherStage(0, 2, model="small", layers=1), TeacherStage(2, 4)], load=load)
    assert loads == []
    batch = _batch()
    ref = student_from_teacher_layers(other, [0]).eval()(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(cur(batch, step=1).logits[valid], ref[valid], rtol=0, atol=1e-5)
    assert loads == ["small"] and not other.training and not any(p.requires_grad for p in other.parameters())
    torch.testing.assert_close(cur(batch, step=2).logits, teacher(**batch).logits)
    bad = CurriculumTeacher(teacher, [TeacherStage(0, 2, model="big-vocab")], load=load)
    with pytest.raises(KDForgeError, match="has 65 vocabulary entries but the teacher has 64"):
        bad(batch, step=0)


def test_two_stage_curriculum_end_to_end(tiny_recipe, caplog):
    from kdforge.train import train

    recipe = dict(tiny_recipe)
    recipe["teacher"] = {**recipe["teacher"], "curriculum": {"stages": [{"layers": 1, "steps": 3}, {}]}}
    recipe["train"] = {**recipe["train"], "steps": 6, "save_every": 6}
    parsed = parse_recipe(recipe)
    assert parse_recipe(json.loads(json.dumps(parsed.model_dump(mode="json")))) == parsed
    with caplog.at_level(logging.INFO, logger="kdforge"):
        out = Path(train(parsed, progress=False))
    assert any("stage 2/2 from step 3" in r.getMessage() for r in caplog.records)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["teacher"]["curriculum"] == {
        "stages": [{"layers": 1, "model": None, "steps": 3}, {"layers": None, "model": None, "steps": None}],
        "cyclic_lr": True}
    assert parse_recipe(manifest["recipe"]).hash() == manifest["recipe_hash"] == parsed.hash()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"lr"' in line]
    peak = recipe["train"]["lr"]
    # logged after each step: the lr of the next one; the warm-up of 2 steps restarts at the stage boundary (step 3)
    lrs = [r["lr"] / peak for r in rows]
    assert lrs == pytest.approx([lr_lambda(s, 2, 6, 0.1, [3]) for s in range(1, 7)])
    assert lrs[1] == pytest.approx(1.0) and lrs[2] == pytest.approx(0.5)
    assert (out / "student" / "config.json").is_file()
