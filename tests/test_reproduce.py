"""Reproducibility: the same recipe and seed give identical metrics; `kdforge reproduce` reruns and diffs."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from evalkit import recipe_dict
from kdforge.cli import app
from kdforge.recipe import parse_recipe
from kdforge.reproduce import diff_metrics
from kdforge.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tiny_assets, tmp_path_factory):
    return train(parse_recipe(recipe_dict(tiny_assets, tmp_path_factory.mktemp("repro") / "run")), progress=False)


def test_same_recipe_and_seed_give_identical_metrics_and_another_seed_does_not(run, tiny_assets, tmp_path):
    again = train(parse_recipe(recipe_dict(tiny_assets, tmp_path / "again")), progress=False)
    other = train(parse_recipe({**recipe_dict(tiny_assets, tmp_path / "other"), "seed": 1}), progress=False)
    read = lambda d: json.loads((d / "final.json").read_text())  # noqa: E731
    assert diff_metrics(read(run), read(again)) == []
    changed = {k for k, _, _ in diff_metrics(read(run), read(other))}
    assert "student.perplexity" in changed and not any("tokens_per_s" in k for k in changed)


def test_diff_ignores_speed_and_honours_tolerance():
    a = {"student": {"perplexity": 10.0, "tokens_per_s": 5.0}, "step": 4}
    b = {"student": {"perplexity": 10.0001, "tokens_per_s": 9.0}, "step": 4}
    assert diff_metrics(a, b) == [("student.perplexity", 10.0, 10.0001)]
    assert diff_metrics(a, b, rtol=1e-4) == []
    assert diff_metrics(a, {"step": 4}) == [("student.perplexity", 10.0, None)]


def test_reproduce_command_matches_then_reports_a_tampered_metric(run, tmp_path):
    res = runner.invoke(app, ["reproduce", str(run / "manifest.json"), "--out", str(tmp_path / "r1")])
    assert res.exit_code == 0, res.output
    assert "every final metric matches" in res.output and (tmp_path / "r1" / "final.json").is_file()
    final = json.loads((run / "final.json").read_text())
    final["student"]["perplexity"] *= 1.01
    (tmp_path / "tampered").mkdir()
    for name in ("manifest.json", "metrics.jsonl"):
        (tmp_path / "tampered" / name).write_text((run / name).read_text())
    (tmp_path / "tampered" / "final.json").write_text(json.dumps(final))
    res = runner.invoke(app, ["reproduce", str(tmp_path / "tampered"), "--out", str(tmp_path / "r1")])
    assert res.exit_code == 1 and "student.perplexity" in res.output and "differences (1)" in res.output


def test_reproduce_refuses_unfinished_or_foreign_input(tmp_path, run):
    res = runner.invoke(app, ["reproduce", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "not found" in res.output
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "manifest.json").write_text((run / "manifest.json").read_text())
    res = runner.invoke(app, ["reproduce", str(tmp_path / "half" / "manifest.json")])
    assert res.exit_code == 2 and "never finished" in res.output
    (tmp_path / "x.json").write_text("{}")
    res = runner.invoke(app, ["reproduce", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "no recipe" in res.output
