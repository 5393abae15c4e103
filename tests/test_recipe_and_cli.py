"""Recipe validation and the CLI's one-line errors."""
from __future__ import annotations

import yaml
import pytest
from typer.testing import CliRunner

from kdforge.cli import app
from kdforge.errors import KDForgeError
from kdforge.recipe import load_recipe, parse_recipe
from kdforge.train import prepare

runner = CliRunner()


def test_unknown_key_lists_valid_keys(tiny_recipe):
    bad = {**tiny_recipe, "train": {**tiny_recipe["train"], "stepz": 3}}
    with pytest.raises(KDForgeError, match=r"unknown recipe key 'train.stepz' \(valid: .*steps"):
        parse_recipe(bad)
    with pytest.raises(KDForgeError, match=r"unknown recipe key 'teachr'.*teacher"):
        parse_recipe({**tiny_recipe, "teachr": {}})


def test_unknown_loss_and_argument(tiny_recipe):
    with pytest.raises(KDForgeError, match="unknown loss 'forward_kll'; valid losses: .*forward_kl"):
        prepare(parse_recipe({**tiny_recipe, "objective": [{"loss": "forward_kll"}]}))
    with pytest.raises(KDForgeError, match="loss 'forward_kl' has no argument 'beta'; valid: .*temperature"):
        prepare(parse_recipe({**tiny_recipe, "objective": [{"loss": "forward_kl", "beta": 0.5}]}))


def test_overrides_parse_as_yaml(tiny_recipe, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    r = load_recipe(path, ["train.steps=11", "objective.1.temperature=2.0", "train.bf16=true"])
    assert r.train.steps == 11 and r.objective[1].params == {"temperature": 2.0} and r.train.bf16 is True


def test_vocab_mismatch_names_both_sizes_and_truncation_works(tiny_recipe):
    student = {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 1, "vocab_size": 140}}
    with pytest.raises(KDForgeError, match=r"teacher vocabulary has 128 entries but the student's has 140"):
        prepare(parse_recipe({**tiny_recipe, "student": student}))
    setup = prepare(parse_recipe({**tiny_recipe, "student": student, "truncate_to_shared_vocab": True}))
    ids = setup.train_blocks.ids[:2]
    total, _ = setup.distiller({"input_ids": ids, "labels": ids})
    assert total.isfinite()


def test_student_from_teacher_layers_copies_weights(tiny_recipe):
    r = parse_recipe({**tiny_recipe, "student": {"init": "from_teacher", "layers": [0, -1]}})
    setup = prepare(r)
    t, s = setup.teacher.state_dict(), setup.student.state_dict()
    assert setup.student.config.num_hidden_layers == 2
    assert (s["model.layers.1.mlp.up_proj.weight"] == t["model.layers.2.mlp.up_proj.weight"]).all()
    assert (s["model.embed_tokens.weight"] == t["model.embed_tokens.weight"]).all()
    with pytest.raises(KDForgeError, match="teacher layer 40 but the teacher has 3 layers"):
        prepare(parse_recipe({**tiny_recipe, "student": {"init": "from_teacher", "layers": [0, 40]}}))


def test_cli_errors_are_one_line_without_traceback(tmp_path, tiny_recipe):
    res = runner.invoke(app, ["distill", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2
    assert "recipe file" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**tiny_recipe, "teacher": {"model": str(tmp_path / "nope")}}))
    res = runner.invoke(app, ["distill", str(bad)])
    assert res.exit_code == 2 and "not found" in res.output and "Traceback" not in res.output


def test_cli_distill_and_eval(tmp_path, tiny_recipe, tiny_assets):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    res = runner.invoke(app, ["distill", str(path), "--set", "train.steps=2", "--no-progress"])
    assert res.exit_code == 0, res.output
    out = tiny_recipe["output_dir"]
    res = runner.invoke(app, ["eval", out, "--teacher", str(tiny_assets["teacher"]), "--corpus",
                              str(tiny_assets["val"]), "--seq-len", "32", "--max-tokens", "512"])
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output and "bits/char" in res.output and "student" in res.output


def test_help_explains_commands():
    res = runner.invoke(app, ["--help"])
    for cmd in ("distill", "eval", "demo"):
        assert cmd in res.output


def test_allocator_tuning_applies_on_linux():
    import sys

    from kdforge.runtime import keep_freed_memory_in_heap

    assert keep_freed_memory_in_heap() is sys.platform.startswith("linux")


def test_invalid_student_architecture_is_one_clear_line(tiny_recipe):
    bad = {**tiny_recipe, "student": {"init": "config", "config": {"hidden_size": 30, "num_attention_heads": 4}}}
    with pytest.raises(KDForgeError, match="student.config is not a valid LlamaConfig: .*not a multiple"):
        prepare(parse_recipe(bad))


def test_set_with_a_space_is_one_line_naming_the_fix(tmp_path):
    res = runner.invoke(app, ["distill", str(tmp_path / "r.yaml"), "--set", "train.steps", "10"])
    assert res.exit_code == 2
    assert res.output.strip() == "error: --set takes key=value: write --set train.steps=10"


def test_version_and_eval_help_keep_their_text():
    from kdforge import __version__

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"kdforge {__version__}"
    res = runner.invoke(app, ["eval", "--help"])
    assert "kdforge[lmeval]" in res.output  # not eaten as rich markup


def test_taps_lists_module_paths_and_hf_outputs(tiny_assets):
    res = runner.invoke(app, ["taps", str(tiny_assets["teacher"])])
    assert res.exit_code == 0, res.output
    assert "model.layers.*.self_attn.q_proj" in res.output and "x3" in res.output
    assert "hidden_states.0 .. hidden_states.3" in res.output
    res = runner.invoke(app, ["taps", str(tiny_assets["teacher"]), "--glob", "model.layers.*"])
    assert res.output.split() == ["model.layers.0", "model.layers.1", "model.layers.2"]
    res = runner.invoke(app, ["taps", str(tiny_assets["teacher"]), "--glob", "model.nothing.*"])
    assert res.exit_code == 2 and "matches" in res.output


@pytest.mark.parametrize("user, online, expected", [(None, None, "1"), ("0", None, "0"), ("1", "1", "1"),
                                                    (None, "1", None)])
def test_cli_respects_a_user_set_hf_hub_offline(monkeypatch, tmp_path, user, online, expected):
    import os

    for name, value in (("HF_HUB_OFFLINE", user), ("KDFORGE_ONLINE", online)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    runner.invoke(app, ["distill", str(tmp_path / "missing.yaml")])  # the callback runs, the command fails fast
    assert os.environ.get("HF_HUB_OFFLINE") == expected


def test_a_hub_id_offline_says_how_to_go_online():
    from kdforge.models import load_causal_lm

    with pytest.raises(KDForgeError, match="set HF_HUB_OFFLINE=0 to download it"):
        load_causal_lm("kdforge-test/no-such-model")


def test_the_demo_table_fits_80_columns():
    from rich.console import Console
    from rich.table import Table

    from kdforge.cli import _demo_cell

    assert _demo_cell("parameters", 134_515_008) == "134.5M" and _demo_cell("model", "student, distilled") == "distilled"
    assert _demo_cell("model", "teacher (SmolLM2-135M-Instruct)") == "teacher" and _demo_cell("kl", None) == "—"
    table = Table()
    for label in ("model", "parameters", "held-out ppl", "bits/char", "top-1 agr.", "KL(T‖S)"):
        table.add_column(label, min_width=len(label))
    table.add_row("distilled", "15.7M", "309.2", "2.516", "0.2909", "2.273")
    console = Console(width=80, record=True)
    console.print(table)
    text = console.export_text()
    assert "parameters" in text and "bits/char" in text and "…" not in text
