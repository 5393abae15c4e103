"""Real 2-process CPU training on gloo (torchrun), plus bf16 and gradient checkpointing in one process.

Two launches serve all the multi-process tests (start-up dominates on 2 cores), see tests/distributed_entry.py:
  1. 2 ranks refusing to resume a one-process run whose global batch (3) they cannot split; a DDP run at per-rank
     batch 2, uninterrupted and stopped at step 4 (resumed here by one process); DDP run; FSDP2 run interrupted at
     step 4 and resumed in the same processes; a DDP run whose rank 1 is SIGKILLed at step 4 (after the step-3
     checkpoint); before the DDP and FSDP runs, a gradient check with uneven valid-token counts per rank.
  2. `kdforge distill` under torchrun on the killed run's directory: it resumes from the step-3 checkpoint.

FSDP on CPU: torch's FSDP2 (`fully_shard`) works with gloo, but accelerate 1.15 enables FSDP only on GPU-like
devices; on a CPU-only machine an FSDP accelerate config silently trains with DDP (kdforge warns). The entry script
therefore switches accelerate's state to FSDP2 itself; everything after that (accelerate's fsdp2 prepare, kdforge's
gathered checkpoints and resume, rank-0 export) is the real code path.

DeepSpeed: runs only when `deepspeed` is installed (it is not in the default venv; see docs/distributed.md).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdforge.distiller import Distiller
from kdforge.recipe import parse_recipe
from kdforge.train import prepare, train

ROOT = Path(__file__).resolve().parent.parent
ENTRY = Path(__file__).resolve().parent / "distributed_entry.py"

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()) or sys.platform == "win32",
    reason="needs torch.distributed with gloo",
)


def _recipe(tiny_assets, out: Path, batch_size: int = 4, projector: bool = True) -> dict:
    """The tiny recipe of conftest, with a trainable projector (a hidden-state term) so extras must sync too. The
    term starts at step 1: at step 0 its projector gets no gradient, which DDP must be told about."""
    objective = [{"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5}]
    if projector:
        objective.append({"loss": "hidden_mse", "weight": 1.0, "student": "model.layers.-1",
                          "teacher": "model.layers.-1", "projector": "linear", "start_step": 1})
    return {
        "name": "tiny-dist", "seed": 0, "output_dir": str(out),
        "teacher": {"model": str(tiny_assets["teacher"]), "dtype": "float32"},
        "student": {"init": "config", "config": {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}},
        "data": {"corpus": str(tiny_assets["train"]), "validation": [str(tiny_assets["val"])], "seq_len": 32,
                 "max_eval_tokens": 1024},
        "objective": objective,
        # fp32 pinned: the equivalence checks hold to 1e-5 in fp32 (precision `auto` picks bf16 on a bf16 CPU)
        "train": {"steps": 6, "batch_size": batch_size, "lr": 3e-3, "warmup_steps": 2, "save_every": 3,
                  "log_every": 1, "bf16": False},
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", CUDA_VISIBLE_DEVICES="",
               TOKENIZERS_PARALLELISM="false")
    return env


def _torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(out: Path) -> list[dict]:
    """Metric rows without the one wall-clock field, tokens_per_s."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _rows(out)]


def _quality(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "final.json").read_text())["student"].items() if k != "tokens_per_s"}


def _tail(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout + proc.stderr)[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_assets, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_assets, root / "unused")))
    logits_only = root / "gradcheck.yaml"
    logits_only.write_text(yaml.safe_dump(_recipe(tiny_assets, root / "unused", projector=False)))
    small = root / "small.yaml"  # per-rank batch 2 (global batch 4 on 2 ranks), logits only
    small.write_text(yaml.safe_dump(_recipe(tiny_assets, root / "unused", batch_size=2, projector=False)))
    odd = _recipe(tiny_assets, root / "odd", batch_size=3, projector=False)  # global batch 3 in one process
    odd["train"].update(steps=2, save_every=1)
    (root / "odd.yaml").write_text(yaml.safe_dump(odd))
    with pytest.MonkeyPatch.context() as patch:  # one process, stopped after the step-1 checkpoint
        original = Distiller.forward
        patch.setattr(Distiller, "forward", lambda self, batch, **kw: _stop(1, kw) or original(self, batch, **kw))
        with pytest.raises(KeyboardInterrupt):
            train(parse_recipe(odd), progress=False)
    first = _torchrun(str(ENTRY), str(recipe), "--refuse", str(root / "odd.yaml"), str(root / "odd"),
                      "--resize", str(small), str(root / "resize_ref"), str(root / "resized"), "4",
                      "--ddp", str(root / "ddp"), "--fsdp", str(root / "fsdp"),
                      "--fsdp-interrupt-at", "4", "--killed", str(root / "killed"), "--die-at", "4",
                      "--gradcheck", str(logits_only), str(root / "gradcheck"))
    resumed = _torchrun("-m", "kdforge.cli", "distill", str(recipe), "--out", str(root / "killed"), "--no-progress")
    return {"root": root, "recipe": recipe, "small": small, "first": first, "resumed": resumed, "assets": tiny_assets}


def _stop(step: int, kw: dict) -> None:
    if kw.get("step") == step:
        raise KeyboardInterrupt


def _blocks_by_step(*paths: Path) -> dict[int, list[int]]:
    """The blocks trained on at each (0-based) step, all ranks and micro-batches together, sorted."""
    steps: dict[int, list[int]] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["blocks"])
    return {k: sorted(v) for k, v in steps.items()}


def test_two_process_run_resumed_by_one_process_keeps_global_batch_and_data(runs, monkeypatch, caplog):
    """Per-rank batch 2 on 2 ranks, stopped at step 4 (checkpoint at 3), resumed by this one process: it accumulates
    2 micro-batches of 2, and every step trains on exactly the blocks of the uninterrupted 2-process run."""
    root = runs["root"]
    ref_blocks = _blocks_by_step(*(root / f"resize_ref.blocks.rank{r}.jsonl" for r in (0, 1)))
    assert sorted(ref_blocks) == [0, 1, 2, 3, 4, 5] and (root / "resized" / "checkpoints").is_dir(), \
        _tail(runs["first"])
    assert _blocks_by_step(*(root / f"resized.blocks.rank{r}.jsonl" for r in (0, 1))) == \
        {s: ref_blocks[s] for s in range(4)}
    seen: list[tuple[int, list[int]]] = []
    original = Distiller.forward

    def record(self, batch, **kw):
        seen.append((kw["step"], batch["block_index"].tolist()))
        return original(self, batch, **kw)

    monkeypatch.setattr(Distiller, "forward", record)
    caplog.set_level("INFO", logger="kdforge")
    train(parse_recipe(yaml.safe_load(runs["small"].read_text())), progress=False, out=root / "resized")
    assert "resuming under 1 process(es) a run checkpointed under 2: re-derived per-rank batch 2 x grad_accum 2" \
        in caplog.text and "global batch stays 4 blocks" in caplog.text
    assert [s for s, _ in seen] == [3, 3, 4, 4, 5, 5] and all(len(b) == 2 for _, b in seen)
    got = {}
    for step, blocks in seen:
        got.setdefault(step, []).extend(blocks)
    assert {s: sorted(b) for s, b in got.items()} == {s: ref_blocks[s] for s in (3, 4, 5)}
    # The same data and global batch: the log matches the uninterrupted run (summed in another order: to 1e-5).
    resumed, ref = _steps(root / "resized"), _steps(root / "resize_ref")
    assert resumed[:3] == ref[:3]
    for g, w in zip(resumed, ref, strict=True):
        assert set(g) == set(w) and g["tokens"] == w["tokens"]
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-5), (w["step"], key)
    state = torch.load(root / "resized" / "checkpoints" / "step_00000006" / "trainer_state.pt", weights_only=False)
    assert state["layout"] == {"global_batch": 4, "order_micro_batch": 4, "world_size": 1, "batch_size": 2,
                               "grad_accum": 2}


def test_resume_under_a_world_size_that_cannot_split_the_global_batch_is_refused(runs):
    for rank in (0, 1):
        path = runs["root"] / f"odd.refused.rank{rank}.txt"
        assert path.is_file(), _tail(runs["first"])
        message = path.read_text()
        assert "\n" not in message
        assert ("checkpointed with 1 process(es) and a global batch of 3 blocks, which 2 processes cannot split "
                "evenly") in message and "resume with a number of processes that divides 3" in message
    assert not (runs["root"] / "odd" / "final.json").exists()


def test_ddp_two_ranks_match_one_process_with_twice_the_batch(runs, tmp_path):
    ddp = runs["root"] / "ddp"
    assert (ddp / "final.json").is_file(), _tail(runs["first"])
    assert json.loads((ddp / "manifest.json").read_text())["hardware"]["world_size"] == 2
    single = train(parse_recipe(_recipe(runs["assets"], tmp_path / "single", batch_size=8)), progress=False)
    got, want = _steps(ddp), _steps(single)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes the log
    assert "loss/hidden_mse" not in got[0] and "loss/hidden_mse" in got[1]  # the staged term
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)
    # The projector (a trainable extra in the Distiller) was trained and kept in sync across the ranks.
    from safetensors.torch import load_file

    ext = "checkpoints/step_00000006/extras.safetensors"
    got_extras, want_extras = load_file(str(ddp / ext)), load_file(str(single / ext))
    start = load_file(str(ddp / "checkpoints/step_00000003/extras.safetensors"))
    assert set(got_extras) == set(want_extras) and got_extras
    for k in want_extras:
        torch.testing.assert_close(got_extras[k], want_extras[k], rtol=1e-4, atol=1e-6)
        assert not torch.equal(got_extras[k], start[k])


def test_global_token_normalisation_with_uneven_counts_per_rank(runs):
    for mode in ("ddp", "fsdp"):
        path = runs["root"] / f"gradcheck.{mode}.json"
        assert path.is_file(), _tail(runs["first"])
        res = json.loads(path.read_text())
        a, b = res["local_counts"]
        assert a < b / 2  # really uneven
        worst = max(res["errors"], key=res["errors"].get)
        assert res["errors"][worst] < 1e-5, (mode, worst, res["errors"][worst])
    assert json.loads((runs["root"] / "gradcheck.fsdp.json").read_text())["sharded_params"] > 0


def test_killed_rank_then_rerun_matches_the_uninterrupted_run(runs):
    killed, ddp = runs["root"] / "killed", runs["root"] / "ddp"
    first, resumed = runs["first"], runs["resumed"]
    assert first.returncode != 0 and "SIGKILL" in first.stderr, _tail(first)
    assert resumed.returncode == 0, _tail(resumed)
    out = resumed.stdout + resumed.stderr
    assert out.count("done: ") == 1 and out.count("resuming from") == 1, out[-2000:]  # rank 0 alone reports
    assert "step_00000003" in out
    assert _steps(killed) == _steps(ddp)  # bit-identical
    assert _quality(killed) == _quality(ddp)


def test_fsdp2_shards_matches_ddp_and_resumes(runs):
    fsdp, ddp = runs["root"] / "fsdp", runs["root"] / "ddp"
    assert (fsdp / "final.json").is_file(), _tail(runs["first"])
    prepared = [json.loads(line) for line in (runs["root"] / "fsdp.prepared.jsonl").read_text().splitlines()]
    # gradcheck, the interrupted run, the resumed run: all really sharded (every parameter a DTensor)
    assert len(prepared) == 3
    assert all(p["class"] == "FSDPDistiller" and p["dtensor_params"] == p["params"] > 0 for p in prepared)
    for g, w in zip(_steps(fsdp), _steps(ddp), strict=True):
        assert set(g) == set(w)
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-5), (g["step"], key)
    assert _quality(fsdp) == pytest.approx(_quality(ddp), rel=1e-5)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(fsdp / "student")  # gathered to rank 0, a plain folder
    assert torch.isfinite(student(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cpu_matches_ddp(runs, stage, tmp_path):
    """accelerate launch with examples/accelerate/deepspeed_zero3.yaml (stage set here); the first DeepSpeed start
    on a machine JIT-compiles its CPU communication op (a few minutes, then cached).

    Close to DDP, not equal: at step 0 the staged projector term is off; torch's AdamW skips a parameter without a
    gradient, while DeepSpeed's flat partitions step it with a zero gradient, which shifts its bias correction
    afterwards (about 2e-5 relative in the loss by step 6; without a staged term the curves agree to 1e-7)."""
    import socket

    config = yaml.safe_load((ROOT / "examples/accelerate/deepspeed_zero3.yaml").read_text())
    config["deepspeed_config"]["zero_stage"] = stage
    path = tmp_path / "ds.yaml"
    path.write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"zero{stage}"
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
                           "--main_process_port", str(port), str(ENTRY), str(runs["recipe"]), "--deepspeed", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, _tail(proc)
    for g, w in zip(_steps(out), _steps(runs["root"] / "ddp"), strict=True):
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-4)
    assert _quality(out)["perplexity"] == pytest.approx(_quality(runs["root"] / "ddp")["perplexity"], rel=1e-4)


# ---------------------------------------------------------------------------------------------- one process


def _batch(setup, n: int = 4) -> dict:
    ids = setup.train_blocks.ids[:n]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_bf16_student_and_teacher_step_is_finite(tiny_assets, tmp_path):
    recipe = _recipe(tiny_assets, tmp_path / "bf16")
    recipe["teacher"]["dtype"] = "bfloat16"
    recipe["train"].update(bf16=True, steps=2, save_every=0)
    setup = prepare(parse_recipe(recipe))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = setup.student(input_ids=_batch(setup)["input_ids"]).logits
        loss, values = setup.distiller(_batch(setup), step=1)  # step 1: the projector term is active
    assert logits.dtype == torch.bfloat16  # autocast really ran the student in bf16
    assert setup.distiller.teacher_source(_batch(setup)).logits.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in values.values())
    grads = [p.grad for p in setup.distiller.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    out = train(parse_recipe(recipe), progress=False)  # the same through the loop: train.bf16 + teacher.dtype
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _rows(out))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_assets, tmp_path):
    grads = {}
    for checkpointing in (False, True):
        recipe = _recipe(tiny_assets, tmp_path / "gc")
        recipe["student"]["gradient_checkpointing"] = checkpointing
        setup = prepare(parse_recipe(recipe))
        assert setup.student.is_activation_checkpointing == checkpointing
        setup.distiller.train()
        setup.distiller(_batch(setup), step=1)[0].backward()
        grads[checkpointing] = {n: p.grad for n, p in setup.distiller.named_parameters() if p.requires_grad}
    assert set(grads[True]) == set(grads[False]) and all(g is not None for g in grads[False].values())
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_feature_term_normalisation_with_uneven_masks(tiny_assets, tmp_path):
    from kdforge.batches import shifted_targets

    setup = prepare(parse_recipe(_recipe(tiny_assets, tmp_path / "feat")))
    d = setup.distiller
    big = _batch(setup)
    big["attention_mask"][0, 5:] = 0
    big["labels"] = big["input_ids"].masked_fill(big["attention_mask"] == 0, -100)
    d(big, step=1)[0].backward()
    ref = {n: p.grad.clone() for n, p in d.named_parameters() if p.requires_grad}
    d.zero_grad()
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    n = sum(shifted_targets(h)[1].sum() for h in halves).float()
    for h in halves:
        d(h, num_tokens=n, step=1)[0].backward()
    for name, p in d.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[name], rtol=1e-4, atol=1e-7, msg=name)
