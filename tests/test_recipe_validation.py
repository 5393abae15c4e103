"""Every numeric recipe value has a range, checked when the recipe is read (before any model loads); `--set` and YAML
mistakes are one line naming the key, the position or the range."""
from __future__ import annotations

import pytest

from kdforge.errors import KDForgeError
from kdforge.recipe import apply_overrides, load_recipe, parse_recipe


@pytest.mark.parametrize("section,key,value,message", [
    ("train", "clip_grad_norm", -1, "train.clip_grad_norm: Input should be greater than 0"),
    ("train", "lr", -0.001, "train.lr: Input should be greater than 0"),
    ("train", "lr", float("nan"), "train.lr: Input should be a finite number"),
    ("train", "weight_decay", -0.1, "train.weight_decay: Input should be greater than or equal to 0"),
    ("train", "min_lr_ratio", 1.5, "train.min_lr_ratio: Input should be less than or equal to 1"),
    ("train", "warmup_steps", -2, "train.warmup_steps: Input should be greater than or equal to 0"),
    ("train", "log_every", 0, "train.log_every: Input should be greater than or equal to 1"),
    ("train", "keep_checkpoints", 0, "train.keep_checkpoints: Input should be greater than or equal to 1"),
    ("train", "projector_lr", 0, "train.projector_lr: Input should be greater than 0"),
    ("data", "max_eval_tokens", 0, "data.max_eval_tokens: Input should be greater than or equal to 1"),
])
def test_numeric_values_out_of_range_are_refused_naming_key_and_range(section, key, value, message):
    with pytest.raises(KDForgeError, match=message.replace("(", r"\(")):
        parse_recipe({section: {key: value}})


@pytest.mark.parametrize("term,message", [
    ({"loss": "forward_kl", "temperature": 0}, "temperature must be a number > 0"),
    ({"loss": "forward_kl", "temperature": -2.0}, "temperature must be a number > 0"),
    ({"loss": "forward_kl", "weight": -1}, "weight: Input should be greater than or equal to 0"),
    ({"loss": "forward_kl", "weight": float("nan")}, "weight: Input should be a finite number"),
    ({"loss": "fitnets_hint", "start_step": 5, "end_step": 5}, "end_step \\(5\\) must be greater than start_step"),
])
def test_term_values_out_of_range_are_refused(term, message):
    with pytest.raises(KDForgeError, match=message):
        parse_recipe({"objective": [term]})


def test_bad_overrides_are_one_line():
    data = {"objective": [{"loss": "cross_entropy"}], "train": {"steps": 3}}
    with pytest.raises(KDForgeError, match=r"objective is a list of 1 item\(s\); '3' is not an index of it \(0..0\)"):
        apply_overrides(data, ["objective.3.weight=1"])
    with pytest.raises(KDForgeError, match=r"train.steps is a single value \(3\), so it has no 'x'"):
        apply_overrides(data, ["train.steps.x=1"])
    with pytest.raises(KDForgeError, match="not valid YAML"):
        apply_overrides(data, ["train.lr=[1"])
    assert apply_overrides(data, ["objective.-1.weight=0.5"])["objective"][0]["weight"] == 0.5


def test_a_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  steps: 3\n  lr: 0.1: 2\n")
    with pytest.raises(KDForgeError, match=r"not valid YAML: mapping values are not allowed here \(line 4, column 10\)"):
        load_recipe(path)


def test_help_and_recipe_errors_load_no_heavy_library(tmp_path):
    """`kdforge --help` and a bad recipe answer without importing torch or transformers (well under 1 s of CPU)."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: -1}\n")
    probe = ("import sys\nfrom kdforge.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules), code)\n")
    for args in (["--help"], ["distill", str(bad)], ["cache-teacher", str(bad)]):
        out = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert "HEAVY [] " in out.stdout, (args, out.stdout, out.stderr)
    assert "train.lr: Input should be greater than 0" in out.stderr
