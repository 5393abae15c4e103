"""kdforge bench: a tiny matrix on the offline fixtures — baseline row, failures, resume, statistics, workers."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evalkit import recipe_dict
from kdforge.bench import load_matrix, plan_cells, run_bench
from kdforge.cli import app
from kdforge.errors import KDForgeError

LIGHT_EVAL = {"ood": None, "cka_tokens": 64, "new_tokens": 4, "prompts": ["the king", "O lady"]}
FKL = [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}]


def write_matrix(tmp: Path, assets: dict, methods: dict, seeds=(0, 1), **extra) -> Path:
    (tmp / "base.yaml").write_text(yaml.safe_dump(recipe_dict(assets, tmp / "unused")))
    matrix = {"name": "tiny", "base": "base.yaml", "methods": methods, "seeds": list(seeds), "eval": LIGHT_EVAL,
              **extra}
    path = tmp / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def bench(tiny_assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    methods = {
        "fkl": {"objective": FKL},
        "crashes": {"objective": [{"loss": "forward_kl", "beta": 0.5}]},  # fails when the cell builds its loss
        "invalid": ["train.stepz=3"],  # fails when the cell's recipe is validated
    }
    matrix = write_matrix(tmp, tiny_assets, methods)
    results = run_bench(matrix, out=tmp / "out")
    return {"matrix": matrix, "out": tmp / "out", "results": results}


def test_every_cell_runs_failures_are_one_line_and_the_rest_continue(bench):
    cells = {(c["method"], c["seed"]): c for c in bench["results"]["cells"]}
    assert set(cells) == {(m, s) for m in ("ce_baseline", "fkl", "crashes", "invalid") for s in (0, 1)}
    for s in (0, 1):
        assert cells[("fkl", s)]["status"] == "done" and cells[("ce_baseline", s)]["status"] == "done"
        assert cells[("crashes", s)]["status"] == "failed"
        assert "has no argument 'beta'" in cells[("crashes", s)]["error"]
        assert "\n" not in cells[("crashes", s)]["error"]
        assert "unknown recipe key 'train.stepz'" in cells[("invalid", s)]["error"]
    crash_dir = Path(cells[("crashes", 0)]["dir"])
    assert "beta" in json.loads((crash_dir / "failed.json").read_text())["error"]
    fkl0 = Path(cells[("fkl", 0)]["dir"])
    assert {"final.json", "eval.json", "cka.json", "cka.png", "manifest.json"} <= {p.name for p in fkl0.iterdir()}


def test_baseline_row_is_added_first_and_cells_share_data_and_steps(bench):
    res = bench["results"]
    assert res["baseline"] == "ce_baseline"
    assert list(res["summary"]["default"])[0] == "ce_baseline"
    recipes = {}
    for c in res["cells"]:
        if c["status"] == "done":
            recipes[(c["method"], c["seed"])] = json.loads((Path(c["dir"]) / "manifest.json").read_text())["recipe"]
    base = recipes[("ce_baseline", 0)]
    assert [t["loss"] for t in base["objective"]] == ["cross_entropy"]
    for (method, seed), r in recipes.items():
        assert r["data"] == base["data"] and r["train"] == base["train"] and r["seed"] == seed
    md = (bench["out"] / "results.md").read_text()
    assert "| ce_baseline (CE baseline) | 2/2 |" in md and "| crashes | 0/2 |" in md
    assert "### failed cells" in md and "has no argument 'beta'" in md


def test_mean_and_std_are_over_seeds_of_last_step_values(bench):
    res = bench["results"]
    dirs = [Path(c["dir"]) for c in res["cells"] if c["method"] == "fkl"]
    ppl = [json.loads((d / "final.json").read_text())["student"]["perplexity"] for d in dirs]
    assert ppl[0] != ppl[1]  # seeds differ
    got = res["summary"]["default"]["fkl"]["metrics"]["perplexity"]
    assert got["mean"] == pytest.approx(statistics.mean(ppl)) and got["std"] == pytest.approx(statistics.stdev(ppl))
    assert got["n"] == 2
    last = [json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in dirs]
    assert last[0]["step"] == 4  # the final step, not the best one
    train_loss = res["summary"]["default"]["fkl"]["metrics"]["train_loss"]["mean"]
    assert train_loss == pytest.approx(statistics.mean(r["loss"] for r in last))
    assert "gen_token_agreement" in res["summary"]["default"]["fkl"]["metrics"]


def test_rerun_skips_finished_cells_and_reevaluates_a_missing_eval(bench):
    res = bench["results"]
    fkl0 = Path(next(c["dir"] for c in res["cells"] if c["method"] == "fkl" and c["seed"] == 0))
    stamp = (fkl0 / "final.json").stat().st_mtime_ns
    (fkl0 / "eval.json").unlink()
    again = run_bench(bench["matrix"], out=bench["out"])
    status = {(c["method"], c["seed"]): c["status"] for c in again["cells"]}
    assert status[("fkl", 1)] == "skipped" and status[("ce_baseline", 0)] == "skipped"
    assert status[("fkl", 0)] == "done" and status[("crashes", 0)] == "failed"
    assert (fkl0 / "final.json").stat().st_mtime_ns == stamp and (fkl0 / "eval.json").is_file()
    assert again["summary"]["default"]["fkl"]["metrics"]["perplexity"] == \
        res["summary"]["default"]["fkl"]["metrics"]["perplexity"]


def test_a_ce_only_method_in_the_matrix_is_the_baseline(tiny_assets, tmp_path):
    matrix = write_matrix(tmp_path, tiny_assets, {"fkl": {"objective": FKL},
                                                  "plain": {"objective": [{"loss": "cross_entropy"}]}},
                          students={"small": {"student.config.hidden_size": 16}, "wide": []})
    spec, base = load_matrix(matrix)
    cells, baseline = plan_cells(spec, base, tmp_path / "out")
    assert baseline == "plain" and [c.method for c in cells[:2]] == ["plain", "plain"]
    assert len(cells) == 2 * 2 * 2 and cells[0].recipe["student"]["config"]["hidden_size"] == 16
    assert cells[0].dir.endswith("cells/small/plain/seed0")


def test_bad_matrix_files_are_one_line_errors(tmp_path):
    with pytest.raises(KDForgeError, match="not found"):
        load_matrix(tmp_path / "nope.yaml")
    (tmp_path / "m.yaml").write_text("methods: {}\n")
    with pytest.raises(KDForgeError, match="methods is empty"):
        load_matrix(tmp_path / "m.yaml")
    (tmp_path / "m.yaml").write_text("base: missing.yaml\nmethods: {a: {}}\n")
    with pytest.raises(KDForgeError, match="base recipe 'missing.yaml' not found"):
        load_matrix(tmp_path / "m.yaml")
    res = CliRunner().invoke(app, ["bench", str(tmp_path / "m.yaml")])
    assert res.exit_code == 2 and "base recipe" in res.output


def test_workers_run_cells_in_a_spawned_process_pool_with_identical_results(tiny_assets, tmp_path, bench):
    matrix = write_matrix(tmp_path, tiny_assets, {"fkl": {"objective": FKL}}, seeds=[0])
    res = CliRunner().invoke(app, ["bench", str(matrix), "--out", str(tmp_path / "out"), "--workers", "2"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(c["method"], c["status"]) for c in data["cells"]] == [("ce_baseline", "done"), ("fkl", "done")]
    assert (tmp_path / "out" / "report.html").is_file()
    # the same recipe and seed in another process gives the same numbers as the sequential bench
    quality = lambda d: {k: v for k, v in json.loads((Path(d) / "final.json").read_text())["student"].items()  # noqa
                         if "per_s" not in k}
    seq = next(c["dir"] for c in bench["results"]["cells"] if c["method"] == "fkl" and c["seed"] == 0)
    par = next(c["dir"] for c in data["cells"] if c["method"] == "fkl")
    assert quality(par) == quality(seq)


def test_seeds_methods_and_recipe_overrides_from_the_command_line(tiny_assets, tmp_path):
    matrix = write_matrix(tmp_path, tiny_assets, {"plain": {"objective": [{"loss": "cross_entropy"}]},
                                                  "fkl": {"objective": FKL}, "other": {"objective": FKL}})
    spec, base = load_matrix(matrix, ["train.steps=2", "objective.0.weight=0.25"], seeds=[7], only_methods=["fkl"])
    cells, baseline = plan_cells(spec, base, tmp_path / "out")
    assert baseline == "plain" and [(c.method, c.seed) for c in cells] == [("plain", 7), ("fkl", 7)]
    assert all(c.recipe["train"]["steps"] == 2 for c in cells)
    assert cells[1].recipe["objective"][0]["weight"] == 0.25  # --set comes after the method's own overrides
    with pytest.raises(KDForgeError, match="method 'nope' is not in the matrix"):
        load_matrix(matrix, only_methods=["nope"])
    res = CliRunner().invoke(app, ["bench", str(matrix), "--dry-run", "--seeds", "0,1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "6 cells; CE baseline: plain" in res.output


def test_results_markdown_names_an_embedding_matrix_first_row_a_reference_not_a_ce_baseline():
    from kdforge.bench import results_markdown

    def row(**m):
        return {"seeds": 2, "failed": 0, "metrics": {k: {"mean": v, "std": 0.01, "n": 2} for k, v in m.items()}}

    def data(summary):
        return {"name": "m", "seeds": [0, 1], "statistics": "mean ± std", "baseline": "first", "summary": summary,
                "methods": list(summary["default"]), "failed": []}

    emb = results_markdown(data({"default": {"first": row(spearman_cosine=0.5), "kd": row(spearman_cosine=0.7)}}))
    assert "Reference row: `first`." in emb and "| first (reference) |" in emb and "CE baseline" not in emb
    ce = results_markdown(data({"default": {"first": row(perplexity=30.0), "kd": row(perplexity=25.0)}}))
    assert "CE baseline: `first`." in ce and "| first (CE baseline) |" in ce
