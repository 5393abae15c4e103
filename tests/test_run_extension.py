"""A finished run can be extended, rewound to a chosen checkpoint, and continued under new bookkeeping; a resume on
changed data is refused (issue 16)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.train import train


def _recipe(base: dict, **train_keys) -> dict:
    return {**base, "train": {**base["train"], **train_keys}}


def _log(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_bookkeeping_keys_and_steps_do_not_change_the_recipe_hash(tiny_recipe):
    base = parse_recipe(tiny_recipe).hash()
    assert parse_recipe(_recipe(tiny_recipe, log_every=5, save_every=2, keep_checkpoints=4, eval_every=3,
                                steps=20)).hash() == base
    assert parse_recipe({**tiny_recipe, "output_dir": "elsewhere"}).hash() == base
    assert parse_recipe(_recipe(tiny_recipe, lr=1e-2)).hash() != base


def test_a_finished_run_is_extended_from_its_last_checkpoint(tiny_recipe):
    out = Path(tiny_recipe["output_dir"])
    train(parse_recipe(_recipe(tiny_recipe, steps=4, save_every=2)), progress=False)
    assert json.loads((out / "final.json").read_text())["step"] == 4
    train(parse_recipe(_recipe(tiny_recipe, steps=6, save_every=2, log_every=2)), progress=False)
    final = json.loads((out / "final.json").read_text())
    assert final["step"] == 6
    rows = _log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 6]  # the first 4 rows kept, then step 6 (log_every 2)
    assert rows[4]["tokens"] == 6 * rows[0]["tokens"]  # the cumulative counter continues
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["train"]["steps"] == 6
    assert list((out / "superseded").glob("*/final.json"))  # the 4-step result is kept, not deleted
    with pytest.raises(KDForgeError, match="finished 6 steps, so train.steps=3 cannot shorten it"):
        train(parse_recipe(_recipe(tiny_recipe, steps=3)), progress=False)


def test_resume_from_a_chosen_checkpoint_matches_a_run_stopped_there(tiny_recipe, tmp_path):
    out = Path(tiny_recipe["output_dir"])
    recipe = parse_recipe(_recipe(tiny_recipe, steps=6, save_every=2, keep_checkpoints=3))
    train(recipe, progress=False)
    first = json.loads((out / "final.json").read_text())
    train(recipe, progress=False, resume_from="step_00000002")
    again = json.loads((out / "final.json").read_text())
    strip = lambda f: {k: v for k, v in f["student"].items() if k != "tokens_per_s"}  # noqa: E731
    assert strip(again) == strip(first)  # steps 3-6 replayed exactly from the step-2 checkpoint
    moved = list((out / "superseded").glob("*"))
    assert moved and (moved[0] / "step_00000006").is_dir() and (moved[0] / "student").is_dir()
    with pytest.raises(KDForgeError, match=r"--resume-from step_00000099: .* has no such checkpoint \(it has: "):
        train(recipe, progress=False, resume_from="step_00000099")


def test_a_resume_on_changed_data_is_refused(tiny_recipe, tmp_path, monkeypatch):
    from kdforge.distiller import Distiller

    corpus = tmp_path / "train.txt"
    corpus.write_text(Path(tiny_recipe["data"]["corpus"]).read_text())
    recipe = parse_recipe({**_recipe(tiny_recipe, steps=6, save_every=2),
                           "data": {**tiny_recipe["data"], "corpus": str(corpus)}})
    original = Distiller.forward

    def stop_at_step_3(self, batch, **kw):
        if kw.get("step") == 3:
            raise KeyboardInterrupt
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", stop_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    monkeypatch.setattr(Distiller, "forward", original)
    corpus.write_text(corpus.read_text().replace("king", "queen"))
    with pytest.raises(KDForgeError, match="changed since the run started .* resuming would train on other data"):
        train(recipe, progress=False)


def test_precision_and_an_older_manifest_schema_do_not_refuse_a_resume(tiny_recipe, caplog):
    """Precision auto resolves by the machine, so it is not part of the recipe hash (a resume under another one is
    logged); a manifest written under an older schema (another hash of the same recipe) is re-read, not refused."""
    import logging

    out = Path(tiny_recipe["output_dir"])
    train(parse_recipe(_recipe(tiny_recipe, steps=4, save_every=2)), progress=False)
    assert parse_recipe({**tiny_recipe, "teacher": {**tiny_recipe["teacher"], "dtype": "bfloat16"}}).hash() == \
        parse_recipe(tiny_recipe).hash()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["recipe_hash"] = "0123456789abcdef"  # what an older kdforge computed for the same recipe
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "final.json").unlink()
    bf16 = {**tiny_recipe, "teacher": {**tiny_recipe["teacher"], "dtype": "bfloat16"}}
    with caplog.at_level(logging.INFO, logger="kdforge"):
        train(parse_recipe(_recipe(bf16, steps=4, save_every=2)), progress=False)
    assert "resumes with teacher bfloat16" in caplog.text
    assert (out / "final.json").is_file()
