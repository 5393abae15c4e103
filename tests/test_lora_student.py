"""student.lora: distil into a peft LoRA adapter. Only the adapter trains, feature taps keep the plain model's paths,
the export is a merged plain-transformers student/ plus the adapter in student_adapter/, and resume is exact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from kdforge import Distiller  # noqa: E402
from kdforge.errors import KDForgeError  # noqa: E402
from kdforge.recipe import parse_recipe  # noqa: E402
from kdforge.train import prepare, train  # noqa: E402


@pytest.fixture(scope="module")
def base_student(tiny_assets) -> Path:
    """A small pretrained student folder with the teacher's tokenizer."""
    from transformers import AutoTokenizer

    from kdforge.models import tiny_llama

    folder = tiny_assets["root"] / "lora_base"
    if not (folder / "config.json").is_file():
        tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
        tiny_llama(vocab_size=len(tok), hidden=32, layers=2, heads=4, seed=3).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


def _recipe(tiny_recipe, base_student: Path, out: Path) -> dict:
    return {**tiny_recipe, "output_dir": str(out),
            "student": {"init": "pretrained", "model": str(base_student),
                        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "objective": [*tiny_recipe["objective"],
                          {"loss": "hidden_mse", "name": "hidden", "weight": 0.1, "student": "model.layers.-1",
                           "teacher": "model.layers.-1", "projector": "linear"}]}


def _ids(tiny_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets["teacher"])("the king doth speak", return_tensors="pt")


def test_only_the_adapter_trains_and_the_export_is_merged_and_adapter(tiny_recipe, tiny_assets, base_student,
                                                                       tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = parse_recipe(_recipe(tiny_recipe, base_student, tmp_path / "run"))
    setup = prepare(recipe)
    before = {n: p.detach().clone() for n, p in setup.student.named_parameters()}
    assert {n for n, p in setup.student.named_parameters() if p.requires_grad} == \
        {n for n in before if ".lora_" in n}
    out = train(recipe, setup=setup, progress=False)
    changed = {n for n, p in setup.student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)  # the base weights are untouched
    assert any(".lora_B." in n for n in changed)  # lora_B starts at zero: the update is not a no-op

    inputs = _ids(tiny_assets)
    setup.student.eval()
    with torch.no_grad():
        peft_logits = setup.student(**inputs).logits
        exported = AutoModelForCausalLM.from_pretrained(out / "student").eval()
        assert type(exported).__name__ == "LlamaForCausalLM"
        merged_logits = exported(**inputs).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_student), out / "student_adapter")
        adapter_logits = adapter.eval()(**inputs).logits
        torch.testing.assert_close(adapter_logits, peft_logits, rtol=0, atol=0)
        torch.testing.assert_close(merged_logits, peft_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged_logits, setup.student.merge_and_unload()(**inputs).logits, rtol=0, atol=0)
    final = json.loads((out / "final.json").read_text())
    assert final["student_parameters"] == sum(p.numel() for p in exported.parameters())
    assert 0 < final["adapter_parameters"] < final["student_parameters"]
    assert (out / "checkpoints" / "step_00000006" / "student" / "adapter_model.safetensors").is_file()


def test_taps_resolve_with_or_without_the_peft_prefix(tiny_recipe, base_student, tmp_path):
    for path in ("model.layers.-1", "base_model.model.model.layers.-1", "hidden_states.-1"):
        recipe = _recipe(tiny_recipe, base_student, tmp_path / "run")
        recipe["objective"][-1]["student"] = path
        taps = prepare(parse_recipe(recipe)).distiller.student_taps
        assert taps is not None


def test_lora_run_resumes_exactly(tiny_recipe, base_student, tmp_path, monkeypatch):
    ref = train(parse_recipe(_recipe(tiny_recipe, base_student, tmp_path / "ref")), progress=False)
    recipe = parse_recipe(_recipe(tiny_recipe, base_student, tmp_path / "killed"))
    original = Distiller.forward

    def dies_at_step_5(self, batch, **kw):
        if kw.get("step") == 4:  # the checkpoint is at 3
            raise RuntimeError("killed")
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", dies_at_step_5)
    with pytest.raises(RuntimeError, match="killed"):
        train(recipe, progress=False)
    monkeypatch.setattr(Distiller, "forward", original)
    out = train(recipe, progress=False)
    read = lambda p: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # noqa: E731
                      for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert read(out) == read(ref)
    from safetensors.torch import load_file

    a, b = (load_file(str(p / "student_adapter" / "adapter_model.safetensors")) for p in (ref, out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_needs_peft_and_existing_target_modules(tiny_recipe, base_student, tmp_path, monkeypatch):
    bad = _recipe(tiny_recipe, base_student, tmp_path / "bad")
    bad["student"]["lora"]["target_modules"] = ["qkv_proj"]
    with pytest.raises(KDForgeError, match="student.lora could not wrap the LlamaForCausalLM: .*target_modules"):
        prepare(parse_recipe(bad))
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kw):
        if name == "peft" or name.startswith("peft."):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(KDForgeError, match=r"student.lora needs the peft package; install it with `pip install peft`"):
        prepare(parse_recipe(_recipe(tiny_recipe, base_student, tmp_path / "nopeft")))
