"""train.log_with: metrics.csv (the same rows as metrics.jsonl, also after a resume) and accelerate's trackers
(TensorBoard here), and a clear refusal of an unknown or not-installed tracker."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kdforge import Distiller
from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.train import train


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _csv(out: Path) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return [{k: float(v) if k != "step" else int(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _tensorboard_steps(out: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs" / "tiny"))  # the scalars (hparams sit in a subfolder)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def _purge_steps(out: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e.step for f in sorted((out / "logs" / "tiny").glob("events.out.tfevents.*"))
            for e in EventFileLoader(str(f)).Load() if e.HasField("session_log") and e.session_log.status == 1]


def _recipe(tiny_recipe, out: Path) -> dict:
    return {**tiny_recipe, "output_dir": str(out),
            "train": {**tiny_recipe["train"], "log_with": ["tensorboard", "csv"], "eval_every": 4}}


def test_tensorboard_and_csv_beside_metrics_jsonl_also_after_a_resume(tiny_recipe, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    ref = train(parse_recipe(_recipe(tiny_recipe, tmp_path / "ref")), progress=False)
    assert list(ref.glob("logs/tiny/events.out.tfevents.*"))
    assert _csv(ref) == _jsonl(ref)  # every row, the eval row's new columns included
    assert set(_csv(ref)[4]) == {"step", "eval/perplexity", "eval/bits_per_char"}
    assert _tensorboard_steps(ref, "loss") == [1, 2, 3, 4, 5, 6]

    recipe = parse_recipe(_recipe(tiny_recipe, tmp_path / "killed"))
    original = Distiller.forward

    def dies_at_step_5(self, batch, **kw):
        if kw.get("step") == 4:  # steps 1-4 logged (and the eval row of 4), the checkpoint is at 3
            raise RuntimeError("killed")  # no checkpoint at the stop: the rows of step 4 must be dropped
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train(recipe, progress=False)
    assert [r["step"] for r in _csv(tmp_path / "killed")] == [1, 2, 3, 4, 4]
    monkeypatch.setattr(Distiller, "forward", original)
    out = train(recipe, progress=False)
    assert _csv(out) == _jsonl(out)
    assert _strip(_csv(out)) == _strip(_csv(ref))
    assert _tensorboard_steps(out, "loss") == [1, 2, 3, 4, 5, 6]
    assert _purge_steps(out) == [4]  # TensorBoard is told to drop the first launch's events from step 4 on


def test_unknown_or_missing_tracker_is_refused_in_one_line(tiny_recipe, monkeypatch):
    with pytest.raises(KDForgeError, match="unknown tracker 'tensorbord'; choose from csv, tensorboard"):
        parse_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "log_with": ["tensorbord"]}})
    import accelerate.tracking

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    recipe = parse_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "log_with": ["csv", "wandb"]}})
    with pytest.raises(KDForgeError, match=r"names wandb, but its package is not installed; install it with "
                                           r"`pip install wandb`") as err:
        train(recipe, progress=False)
    assert "\n" not in str(err.value)


def test_log_with_leaves_the_recipe_hash_alone(tiny_recipe):
    plain = parse_recipe(tiny_recipe)
    logged = parse_recipe({**tiny_recipe, "train": {**tiny_recipe["train"], "log_with": ["csv"]}})
    assert plain.hash() == logged.hash()  # bookkeeping: a run can be resumed with another log_with
