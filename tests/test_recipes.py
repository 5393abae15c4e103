"""Every recipe in recipes/ runs: on a tiny random teacher/student here (the real SmolLM2 runs in benchmarks)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdforge.recipe import parse_recipe
from kdforge.train import train

RECIPES = sorted(Path(__file__).resolve().parents[1].joinpath("recipes").glob("*.yaml"))
# causal-LM recipes; the image-classification ones (task: image_classification, on the real digits) run in
# tests/test_image_classification.py
LM_RECIPES = [p for p in RECIPES if yaml.safe_load(p.read_text()).get("task", "causal_lm") == "causal_lm"]
TINY_STUDENT = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 12}


def tiny_version(path: Path, assets: dict, out: Path) -> dict:
    """The recipe with the tiny teacher (48 wide, 3 layers, 4 heads of 12), a tiny student and 2 short steps."""
    r = yaml.safe_load(path.read_text())
    r["output_dir"] = str(out)
    r["teacher"] = {**r["teacher"], "model": str(assets["teacher"]), "dtype": "float32"}
    if r["student"].get("init", "config") == "config":
        r["student"]["config"] = dict(TINY_STUDENT)
    elif r["student"]["init"] == "pruned":  # the demo: cut to 2 of the tiny teacher's 3 blocks and 32 of its 48 channels
        r["student"]["prune"] = {"layers": 2, "hidden_size": 32, "calibration_tokens": 128}
    else:
        r["student"]["layers"] = [0, -1]
    r["data"] = {"corpus": str(assets["train"]), "validation": [str(assets["val"])], "seq_len": 32,
                 "max_eval_tokens": 256}
    r.pop("generate", None)  # on the tiny corpus here; generate-then-distil (seqkd.yaml) runs in tests/test_generate.py
    if r.get("onpolicy"):  # on-policy recipes answer prompts: pairs of lines of the tiny texts (tests/test_onpolicy.py)
        for split in ("train", "val"):
            lines = [x for x in assets[split].read_text().splitlines() if x][:24]
            (out.parent / f"{out.name}.{split}.jsonl").write_text("".join(
                json.dumps({"prompt": lines[i], "response": lines[i + 1]}) + "\n" for i in range(0, len(lines), 2)))
        r["data"] = {"prompts": str(out.parent / f"{out.name}.train.jsonl"), "seq_len": 32, "max_eval_tokens": 256,
                     "validation": [str(out.parent / f"{out.name}.val.jsonl")]}
        r["onpolicy"]["max_new_tokens"] = 6
        if r["onpolicy"].get("adaptive"):
            r["onpolicy"]["adaptive"].update(eval_every=1, init_threshold=0.5)
    if r["student"].get("tokenizer"):  # cross-tokenizer recipes train on prompt–response records, tokenized twice
        lines = [x for x in assets["train"].read_text().splitlines() if x][:40]
        (out.parent / f"{out.name}.pairs.jsonl").write_text("".join(
            json.dumps({"prompt": lines[i], "response": lines[i + 1]}) + "\n" for i in range(0, len(lines), 2)))
        r["data"] = {"prompts": str(out.parent / f"{out.name}.pairs.jsonl"), "validation_split": 0.25,
                     "seq_len": 32, "max_eval_tokens": 256}
        r["student"]["tokenizer"] = "bpe:320"  # the tiny teacher's BPE has 128 entries over 90 characters: the span
        for term in r["objective"]:  # method's figures on this pair are far below what SmolLM2's give
            if term["loss"] == "span_kl":
                term.update(min_shared_fraction=0.2, min_aligned_fraction=0.1)
    r["train"].update(steps=2, batch_size=2, save_every=2, log_every=1, warmup_steps=1)
    for term in r["objective"]:
        if "num_relation_heads" in term:
            term["num_relation_heads"] = 4  # divides the tiny widths 48 (q) and 24 (k, v)
    curriculum = r["teacher"].get("curriculum")
    if curriculum:  # the tiny teacher has 3 layers: one stage per depth
        curriculum["stages"] = [{"layers": 1, "steps": 1}, {"layers": 3, "steps": 1}]
    return r


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {"demo", "tinybert", "minilm", "pkd", "cka", "fam", "distilbert", "block_kd", "pwkd"} <= names
    assert {"digits_kd", "digits_dkd", "digits_cakd", "digits_logit_std", "digits_fitnets", "digits_at",
            "digits_fam"} <= names


@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_on_tiny_models(path, tiny_assets, tmp_path):
    recipe = parse_recipe(tiny_version(path, tiny_assets, tmp_path / path.stem))
    out = train(recipe, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k[len("loss/"):] for k in rows[-1] if k.startswith("loss/")}
    assert logged == {t.label for t in recipe.objective}, "every term is computed and logged"
    assert all(v == v and abs(v) < 1e6 for r in rows for k, v in r.items() if k.startswith("loss"))
    assert (out / "student" / "config.json").is_file()


# SmolLM2-135M-Instruct's config (the embedded teacher), enough to validate the recipes' real student configs offline.
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}


@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.stem)
def test_recipe_student_config_is_valid_at_full_size(path):
    """The full-size student each recipe asks for passes transformers' config validation (e.g. heads divide width)."""
    from transformers import LlamaConfig

    student = yaml.safe_load(path.read_text())["student"]
    if student.get("init", "config") == "config":
        config = LlamaConfig(**{**SMOLLM2, **student["config"]})
        assert config.num_attention_heads * config.head_dim >= 1


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_precision_is_auto(path):
    """Shipped recipes leave the teacher's precision to the machine they run on (issue #10); the student trains in
    float32 unless a recipe asks otherwise (and then by the machine too)."""
    r = yaml.safe_load(path.read_text())
    assert r["teacher"]["dtype"] == "auto"
    assert r["train"].get("bf16", False) in (False, "auto")


def test_demo_uses_auto_precision():
    from kdforge.demo import demo_recipe
    from kdforge.precision import what_auto_means

    r, here = demo_recipe(quick=True), what_auto_means()
    assert r.teacher.dtype == here.dtype and r.train.bf16 is False
