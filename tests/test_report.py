"""kdforge report: self-contained HTML + Markdown for runs and benches, partial inputs, and real headless Chromium."""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from evalkit import CHROMIUM, chromium, recipe_dict
from kdforge import Distiller
from kdforge.cli import app
from kdforge.errors import KDForgeError
from kdforge.recipe import EvalSpec, parse_recipe
from kdforge.report.build import build_report
from kdforge.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def evaluated_run(tiny_assets, tmp_path_factory):
    """A finished tiny run with eval.json (generations, CKA) from `kdforge eval`."""
    from kdforge.evaluate.suite import run_eval

    run = train(parse_recipe(recipe_dict(tiny_assets, tmp_path_factory.mktemp("rep") / "run")), progress=False)
    run_eval(run, spec=EvalSpec(ood=None, new_tokens=4, cka_tokens=64), baseline=run)
    return run


def test_run_report_has_results_curves_cka_manifest_and_generations(evaluated_run, tmp_path):
    res = runner.invoke(app, ["report", str(evaluated_run), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "report.html").read_text()
    manifest = json.loads((evaluated_run / "manifest.json").read_text())
    assert "<table>" in page and "held-out ppl" in page and "KL(S‖T)" in page
    assert page.count('src="data:image/png;base64,') == 2  # loss curves + CKA heatmap
    assert manifest["recipe_hash"] in page and "torch" in page and "hardware" in page
    assert "Generations (greedy)" in page and "To be, or not to be" in page and ">baseline<" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing external
    md = (tmp_path / "report.md").read_text()
    assert "| model | held-out ppl |" in md and "## Manifest" in md and "Missing" not in md
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (tmp_path / link).is_file()
    assert "report_files/loss_curves.png" in md and "report_files/cka.png" in md


def test_partial_run_report_says_what_is_missing(tiny_assets, tmp_path, monkeypatch):
    recipe = parse_recipe(recipe_dict(tiny_assets, tmp_path / "run", save_every=2))
    original = Distiller.forward

    def dies_at_step_3(self, batch, **kw):
        if kw.get("step") == 3:
            raise KeyboardInterrupt
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    res = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "missing: final.json" in res.output and "last logged step 3 of 4" in res.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert 'id="missing"' in page and "kdforge eval" in page and page.count("data:image/png") == 1


def test_empty_and_absent_directories(tmp_path):
    (tmp_path / "empty" / "runA").mkdir(parents=True)
    (tmp_path / "empty" / "runA" / "metrics.jsonl").write_text("")
    with pytest.raises(KDForgeError, match="neither a run .* it holds runs: runA: report on one of them"):
        build_report(tmp_path / "empty")
    (tmp_path / "bare").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "bare")])
    assert res.exit_code != 0 and "neither a run" in res.output
    assert list((tmp_path / "bare").iterdir()) == [] and not (tmp_path / "empty" / "report.md").exists()
    with pytest.raises(KDForgeError, match="does not exist"):
        build_report(tmp_path / "absent")
    res = runner.invoke(app, ["report", str(tmp_path / "absent")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_partial_bench_report_builds_tables_from_finished_cells(evaluated_run, tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(evaluated_run, bench / "cells" / "default" / "fkl" / "seed0")
    # what `kdforge reproduce cells/default/fkl/seed0/manifest.json` leaves beside the cell: not a cell
    shutil.copytree(evaluated_run, bench / "cells" / "default" / "fkl" / "seed0-reproduce")
    (bench / "cells" / "default" / "ce_baseline" / "seed0").mkdir(parents=True)
    (bench / "cells" / "default" / "ce_baseline" / "seed0" / "failed.json").write_text('{"error": "ValueError: x"}')
    (bench / "plan.json").write_text(json.dumps({"baseline": "ce_baseline", "methods": ["ce_baseline", "fkl"],
                                                 "cells": [{"key": k, "dir": str(bench / "cells" / k)} for k in
                                                           ("default/ce_baseline/seed0", "default/fkl/seed0",
                                                            "default/fkl/seed1")]}))
    html_path, md_path, missing = build_report(bench)
    assert any("results.json" in m and "1 of 3 planned cells" in m for m in missing)
    assert any("not started: default/fkl/seed1" in m for m in missing)
    md = md_path.read_text()
    assert "| ce_baseline (CE baseline) | 0/1 |" in md and "| fkl | 1/1 |" in md and "ValueError: x" in md
    page = html_path.read_text()
    assert page.count("data:image/png") == 2 and "fkl, seed0" in page


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium absent (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium_without_network_or_console_errors(evaluated_run, tmp_path):
    html_path, _, _ = build_report(evaluated_run, tmp_path / "out")
    url = html_path.resolve().as_uri()
    got = chromium(url, tmp_path / "a", "--dump-dom")
    assert got["returncode"] == 0, got["stderr"][-2000:]
    dom = got["stdout"]
    assert "<table>" in dom and "held-out ppl" in dom
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', dom)) == 2
    assert got["console"] == [] and got["requests"] == []
    shot = tmp_path / "shot.png"
    got = chromium(url, tmp_path / "b", f"--screenshot={shot}", "--window-size=1200,1600")
    assert got["returncode"] == 0 and shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
    assert got["console"] == [] and got["requests"] == []


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium absent (apt-get install -y chromium)")
def test_the_chromium_check_catches_external_resources_and_console_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><img src="http://example.invalid/x.png">'
                   '<script>console.error("broken")</script></body></html>')
    got = chromium(bad.as_uri(), tmp_path / "c", "--dump-dom")
    assert got["requests"] == ["http://example.invalid/x.png"]
    assert any("broken" in line for line in got["console"])


def test_a_demo_folder_rebuilds_the_demo_page_never_a_poorer_one(evaluated_run, tmp_path):
    """Issue 16: `kdforge report runs/demo` replaced the demo's page with a 'holds neither a run' stub. A demo folder
    (two runs and metrics.json) gets the same page the demo writes; the curve compares cross-entropy on both runs."""
    from kdforge.demo import write_demo_report

    demo = tmp_path / "demo"
    for name in ("baseline", "distilled"):
        shutil.copytree(evaluated_run, demo / name)
    summary = write_demo_report(demo, {"baseline": demo / "baseline", "distilled": demo / "distilled"})
    assert summary["gap_closed"] in (None, 0.0)
    page = (demo / "report.html").read_text()
    assert "Held-out results" in page and "data:image/png" in page and "distilled" in page
    md = (demo / "report.md").read_text()
    assert "report_files/demo_cross_entropy.png" in md
    assert "x lower than the baseline" in md or "did NOT beat" in md
    teacher, baseline = summary["rows"][0]["perplexity"], summary["rows"][1]["perplexity"]
    assert ("Gap closed: the distilled student closes 0% of the baseline-to-teacher gap" in md if baseline > teacher
            else "Gap closed: none to close" in md)  # two copies of one run: nothing closed
    assert summary["rows"][0]["model"].startswith("teacher")
    res = runner.invoke(app, ["report", str(demo)])
    assert res.exit_code == 0, res.output
    assert (demo / "report.html").read_text() == page  # the same page, rebuilt


def test_gap_closed_is_the_share_of_the_log_perplexity_gap():
    from kdforge.demo import gap_closed

    # the README's demo figures: teacher 72.14, baseline 350.0, distilled 309.2
    direct = (math.log(350.0) - math.log(309.2)) / (math.log(350.0) - math.log(72.14))
    assert gap_closed(72.14, 350.0, 309.2) == pytest.approx(direct) and round(direct, 4) == 0.0785
    assert gap_closed(72.14, 350.0, 72.14) == pytest.approx(1.0) and gap_closed(72.14, 350.0, 350.0) == 0.0
    assert gap_closed(72.14, 350.0, 400.0) < 0 and math.isnan(gap_closed(100.0, 90.0, 95.0))


def test_a_demo_with_a_cut_student_reports_the_gap_closed_from_scratch(evaluated_run, tmp_path):
    """A demo whose student is cut from the teacher also trains the same sizes from fresh weights (scratch): its row
    comes first and metrics.json gives the share of the scratch-to-teacher gap the distilled student closes."""
    from kdforge.demo import write_demo_report

    demo = tmp_path / "demo"
    perplexities = {"scratch": 600.0, "baseline": 270.0, "distilled": 237.0}
    for name, ppl in perplexities.items():
        shutil.copytree(evaluated_run, demo / name)
        final = json.loads((demo / name / "final.json").read_text())
        final["teacher"]["perplexity"], final["student"]["perplexity"] = 74.0, ppl
        (demo / name / "final.json").write_text(json.dumps(final))
    summary = write_demo_report(demo, {name: demo / name for name in perplexities})
    assert [r["model"] for r in summary["rows"]][1:] == ["student, scratch (fresh weights)", "student, baseline",
                                                         "student, distilled"]
    log = math.log
    assert summary["gap_closed"] == pytest.approx((log(270) - log(237)) / (log(270) - log(74)))
    assert summary["gap_closed_from_scratch"] == pytest.approx((log(600) - log(237)) / (log(600) - log(74)))
    md = (demo / "report.md").read_text()
    assert f"closes {summary['gap_closed_from_scratch']:.0%} of the gap to the teacher" in md


def test_the_scratch_run_is_the_baseline_with_fresh_weights_of_the_cut_students_sizes(tmp_path):
    from transformers import LlamaConfig

    from kdforge.demo import baseline_of, demo_recipe, scratch_of

    distilled = demo_recipe(quick=True, out=tmp_path)
    cut = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=768, head_dim=64)
    scratch = scratch_of(baseline_of(distilled, tmp_path), cut, tmp_path)
    assert scratch.student.init == "config" and scratch.student.prune is None
    assert scratch.student.config == {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "intermediate_size": 768, "head_dim": 64}
    assert [t.loss for t in scratch.objective] == ["cross_entropy"] and scratch.seed == distilled.seed
    assert scratch.output_dir == str(tmp_path / "scratch") and scratch.train == distilled.train
