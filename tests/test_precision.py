"""`auto` precision (issue #10): bf16 only where the hardware runs it natively; explicit choices kept; bad values refused
with one clear line; the run manifest records what was used."""
from __future__ import annotations

import logging

import pytest
import torch

from kdforge import precision
from kdforge.errors import KDForgeError
from kdforge.recipe import parse_recipe
from kdforge.teachers.live import LiveTeacher


def fake_machine(monkeypatch, capability: str, avx512_bf16: bool = False, amx: bool = False,
                 cuda: bool | None = None) -> None:
    """Pretend to run on a machine: the CPU capability queries, and a CUDA device with/without bf16 (None: none)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bool(cuda))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    monkeypatch.delenv("KDFORGE_AUTO_PRECISION", raising=False)  # conftest pins auto for the other tests
    precision.auto_precision.cache_clear()


def auto(recipe: dict) -> dict:
    """The tiny recipe (pinned to float32 for the other tests) back on precision auto."""
    return {**recipe, "teacher": {**recipe["teacher"], "dtype": "auto"}, "train": {**recipe["train"], "bf16": "auto"}}


def test_the_environment_pins_what_auto_means(monkeypatch):
    fake_machine(monkeypatch, "AVX512", avx512_bf16=True)
    monkeypatch.setenv("KDFORGE_AUTO_PRECISION", "float32")
    assert precision.auto_precision() == precision.Precision("float32", "pinned by KDFORGE_AUTO_PRECISION")
    precision.auto_precision.cache_clear()
    monkeypatch.setenv("KDFORGE_AUTO_PRECISION", "fp8")
    with pytest.raises(KDForgeError, match="KDFORGE_AUTO_PRECISION='fp8': use float32 or bfloat16"):
        precision.auto_precision()


@pytest.fixture(autouse=True)
def fresh_cache():
    precision.auto_precision.cache_clear()
    yield
    precision.auto_precision.cache_clear()  # later tests see the real machine again


def test_avx2_only_cpu_gets_fp32(monkeypatch):
    fake_machine(monkeypatch, "AVX2")
    p = precision.detect()
    assert p.dtype == "float32" and not p.bf16
    assert "AVX2" in p.reason and "without native bf16" in p.reason
    r = parse_recipe({"teacher": {"model": "smollm2-135m"}})  # the schema default is auto
    assert r.teacher.dtype == "float32" and r.train.bf16 is False


@pytest.mark.parametrize("flags", [{"avx512_bf16": True}, {"amx": True}], ids=["avx512_bf16", "amx"])
def test_native_bf16_cpu_gets_bf16(monkeypatch, flags):
    fake_machine(monkeypatch, "AVX512", **flags)
    p = precision.detect()
    assert p.dtype == "bfloat16" and "AVX512" in p.reason
    r = parse_recipe({"teacher": {"model": "smollm2-135m", "dtype": "auto"}, "train": {"bf16": "auto"}})
    assert r.teacher.dtype == "bfloat16" and r.train.bf16 is True


def test_avx512_without_bf16_gets_fp32(monkeypatch):
    fake_machine(monkeypatch, "AVX512")
    assert precision.detect().dtype == "float32"


@pytest.mark.parametrize("bf16_ok, want", [(True, "bfloat16"), (False, "float32")])
def test_cuda_follows_is_bf16_supported(monkeypatch, bf16_ok, want):
    fake_machine(monkeypatch, "AVX2", cuda=bf16_ok)
    p = precision.detect()
    assert p.dtype == want and "Fake GPU" in p.reason


def test_explicit_choices_are_kept(monkeypatch):
    fake_machine(monkeypatch, "AVX2")  # auto would say fp32 here
    r = parse_recipe({"teacher": {"model": "m", "dtype": "bfloat16"}, "train": {"bf16": True}})
    assert r.teacher.dtype == "bfloat16" and r.train.bf16 is True
    fake_machine(monkeypatch, "AVX512", avx512_bf16=True)  # auto would say bf16 here
    r = parse_recipe({"teacher": {"model": "m", "dtype": "float32"}, "train": {"bf16": False}})
    assert r.teacher.dtype == "float32" and r.train.bf16 is False


@pytest.mark.parametrize("data, expected", [
    ({"teacher": {"model": "m", "dtype": "fp16"}},
     "invalid recipe: teacher.dtype: Input should be 'auto', 'float32' or 'bfloat16'"),
    ({"train": {"bf16": "fast"}}, "invalid recipe: train.bf16: Value error, must be true, false or auto, not 'fast'"),
])
def test_invalid_value_is_refused_in_one_line(data, expected):
    with pytest.raises(KDForgeError) as err:
        parse_recipe(data)
    assert str(err.value) == expected and "\n" not in str(err.value)


def test_a_recipe_error_is_reported_before_precision_is_resolved(monkeypatch):
    """auto is resolved only once the whole recipe validated: a bad recipe neither probes the hardware nor logs."""
    monkeypatch.setattr(precision, "detect", lambda: pytest.fail("precision resolved for an invalid recipe"))
    with pytest.raises(KDForgeError, match="train.steps"):
        parse_recipe({"teacher": {"model": "m"}, "train": {"steps": 0}})
    assert parse_recipe({"teacher": {"model": "m", "dtype": "float32"}, "train": {"bf16": False}}).train.bf16 is False


def test_live_teacher_resolves_auto_and_refuses_bad_values(monkeypatch):
    from kdforge.models import tiny_llama

    model = tiny_llama()
    fake_machine(monkeypatch, "AVX2")
    assert LiveTeacher(model, "auto").dtype == "float32"
    fake_machine(monkeypatch, "AVX512", amx=True)
    assert LiveTeacher(model, "auto").dtype == "bfloat16"
    with pytest.raises(KDForgeError, match="teacher dtype must be auto, float32 or bfloat16, not 'float16'"):
        LiveTeacher(model, "float16")


def test_choice_is_logged_once_in_one_line(monkeypatch, caplog):
    fake_machine(monkeypatch, "AVX2")
    with caplog.at_level(logging.INFO, logger="kdforge"):
        parse_recipe({"teacher": {"model": "m"}})
        parse_recipe({"teacher": {"model": "m"}})
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision auto")]
    assert lines == ["precision auto -> float32: CPU capability AVX2 without native bf16 (no AVX512_BF16/AMX): "
                     "bf16 autocast would be emulated, several times slower than fp32"]


@pytest.mark.parametrize("capability, flags, want", [("AVX2", {}, "float32"),
                                                     ("AVX512", {"avx512_bf16": True}, "bfloat16")])
def test_manifest_records_resolved_precision(monkeypatch, tiny_recipe, capability, flags, want):
    from kdforge.train import manifest

    fake_machine(monkeypatch, capability, **flags)
    m = manifest(parse_recipe(auto(tiny_recipe)))
    assert m["recipe"]["teacher"]["dtype"] == want and m["recipe"]["train"]["bf16"] is (want == "bfloat16")
    assert m["precision"]["teacher_dtype"] == want and m["precision"]["student_bf16"] is (want == "bfloat16")
    assert m["precision"]["auto"] == want and capability in m["precision"]["auto_reason"]


def test_manifest_of_a_trained_run(tiny_recipe):
    """A real (2-step) run writes the precision entry, with auto resolved for this machine."""
    import json

    from kdforge.train import train

    tiny_recipe["train"].update(steps=2, save_every=2)
    out = train(parse_recipe(auto(tiny_recipe)), progress=False)
    m = json.loads((out / "manifest.json").read_text())
    here = precision.what_auto_means()  # float32, pinned by conftest
    assert m["precision"] == {"teacher_dtype": here.dtype, "student_bf16": here.bf16, "auto": here.dtype,
                              "auto_reason": here.reason}
