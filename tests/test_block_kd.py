"""Block-KD stepping stones: exact teacher reproduction, 1/2^(n-i) weights, gradient routing, export, CNN stages."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge import Distiller
from kdforge.errors import KDForgeError
from kdforge.losses.logits import reverse_kl
from kdforge.models import student_from_teacher_layers, tiny_llama
from kdforge.teachers.stepping_stones import DecoderBlocks, SteppingStones

VOCAB = 64


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(vocab_size=VOCAB, hidden=32, layers=4, heads=4, seed=1).eval().requires_grad_(False)


def _batch(pad: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 9:] = 0  # right padding on one row
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _stones(d: Distiller) -> SteppingStones:
    return d.stepping_stones["0"]


def _student_blocks(d: Distiller, batch):
    return d._student_forward(batch)[1]["block_kd.s"]


def test_stepping_stones_of_the_teachers_own_layers_reproduce_its_logits(teacher):
    """A student made of the teacher's first 3 layers, identity connectors, and the identity layer map: every stepping
    stone *is* the teacher, so its logits equal the teacher's and the loss is 0."""
    student = student_from_teacher_layers(teacher, [0, 1, 2])
    d = Distiller(teacher, student, [{"loss": "block_kd", "projector": "identity", "layer_map": [[0, 0], [1, 1]]}])
    batch = _batch()
    stones = _stones(d)
    assert stones.pairs == [(0, 0), (1, 1)] and stones.weights == [0.25, 0.5]
    with torch.no_grad():
        logits = stones.stone_logits(_student_blocks(d, batch), batch)
        ref = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for z in logits:
        torch.testing.assert_close(z, ref, rtol=0, atol=1e-5)
    total, values = d(batch)
    assert values["block_kd"].abs() < 1e-6


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2"])
def test_block_runner_replicates_the_model_forward(model_type):
    """embed -> blocks 0..n -> norm -> head, run by kdforge, equals the model's own forward (padding, sliding windows
    and per-layer mask types included, and Gemma 2's logit soft-cap, tight enough to bite on a fresh model's logits);
    and two slices chain to the same result."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=4),
        "qwen2": lambda: transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=1),
        "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=8),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, sliding_window=4,
                                                    final_logit_softcapping=0.05),
    }[model_type]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    blocks = DecoderBlocks(model)
    batch = _batch()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        h = blocks.embed(batch["input_ids"])
        ctx = blocks.context(batch, h)
        out = blocks.head(blocks.run(blocks.run(h, 0, 1, ctx), 1, 3, ctx))
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=0, atol=1e-5)


def test_weights_are_one_over_two_to_the_n_minus_i(teacher):
    student = tiny_llama(vocab_size=VOCAB, hidden=24, layers=4, heads=4, seed=2)
    d = Distiller(teacher, student, [{"loss": "block_kd", "kd_loss": "reverse_kl", "temperature": 2.0}])
    stones = _stones(d)
    # 4 student blocks: stones N_1, N_2, N_3 (student blocks 0, 1, 2); N_4 is the student itself
    assert [s for s, _ in stones.pairs] == [0, 1, 2]
    assert stones.weights == [1 / 8, 1 / 4, 1 / 2]
    batch = _batch()
    with torch.no_grad():
        _, values = d(batch)
        logits = stones.stone_logits(_student_blocks(d, batch), batch)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, 1:].bool()
        parts = [reverse_kl(z[:, :-1], t, mask=mask, temperature=2.0) for z in logits]
    assert all(p > 0 for p in parts)
    torch.testing.assert_close(values["block_kd"], sum(w * p for w, p in zip(stones.weights, parts)))


def test_gradients_reach_student_and_connectors_not_teacher(teacher):
    student = tiny_llama(vocab_size=VOCAB, hidden=24, layers=3, heads=4, seed=3)
    d = Distiller(teacher, student, [{"loss": "block_kd"}])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    total, _ = d(_batch())
    total.backward()
    for conn in _stones(d).connectors:
        assert conn.weight.grad is not None and conn.weight.grad.abs().sum() > 0
    # only blocks 0..1 feed stepping stones (block 2 is N_n, the student itself, not part of this term)
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert student.model.embed_tokens.weight.grad.abs().sum() > 0
    assert student.model.layers[2].mlp.down_proj.weight.grad is None
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_a_bf16_teacher_runs_its_blocks_under_bf16_autocast(teacher):
    """teacher_dtype bfloat16: the teacher's blocks inside the stepping stones run under bf16 autocast (as the teacher's
    own forward does), the stone logits come back in fp32, the loss matches the fp32 stones to bf16 precision, and the
    gradients still reach the connectors."""
    student = tiny_llama(vocab_size=VOCAB, hidden=24, layers=3, heads=4, seed=3)
    batch = _batch()
    fp32 = Distiller(teacher, student, [{"loss": "block_kd"}])
    bf16 = Distiller(teacher, student, [{"loss": "block_kd"}], teacher_dtype="bfloat16")
    bf16.stepping_stones.load_state_dict(fp32.stepping_stones.state_dict())
    seen = []
    hook = teacher.model.layers[-1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with torch.no_grad():
            logits = _stones(bf16).stone_logits(_student_blocks(bf16, batch), batch)
    finally:
        hook.remove()
    assert seen and all(dt == torch.bfloat16 for dt in seen)
    assert all(z.dtype == torch.float32 for z in logits)
    total, values = bf16(batch)
    _, ref = fp32(batch)
    torch.testing.assert_close(values["block_kd"], ref["block_kd"], rtol=0.05, atol=1e-3)
    total.backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in _stones(bf16).connectors)


def test_connectors_are_trainable_extras_and_never_exported(teacher, tiny_recipe):
    from kdforge.recipe import parse_recipe
    from kdforge.train import param_groups

    student = tiny_llama(vocab_size=VOCAB, hidden=24, layers=3, heads=4, seed=4)
    d = Distiller(teacher, student, [{"loss": "cross_entropy"}, {"loss": "block_kd", "projector": "mlp"}])
    extras = {k for k in d.state_dict() if not k.startswith("student.")}  # what a checkpoint's extras hold
    assert extras and all(k.startswith("stepping_stones.0.connectors.") for k in extras)  # no teacher weights
    assert not any("connector" in k or "stepping" in k for k in student.state_dict())
    groups = param_groups(d, parse_recipe(tiny_recipe))
    connector_ids = {id(p) for p in _stones(d).parameters()}
    assert connector_ids == {id(p) for p in groups[-1]["params"]}


def test_block_kd_recipe_trains_and_exports_a_plain_student(tiny_recipe):
    import json
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from kdforge.recipe import parse_recipe
    from kdforge.train import train

    recipe = {**tiny_recipe, "objective": [
        {"loss": "cross_entropy", "weight": 0.5}, {"loss": "forward_kl", "weight": 0.5},
        {"loss": "block_kd", "weight": 1.0, "temperature": 1.0, "kd_loss": "forward_kl", "projector": "linear"}]}
    recipe["train"] = {**recipe["train"], "steps": 2, "save_every": 2}
    out = train(parse_recipe(recipe), progress=False)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss/block_kd"] > 0 for r in rows)
    extras = load_file(str(Path(out) / "checkpoints" / "step_00000002" / "extras.safetensors"))
    assert set(extras) == {"stepping_stones.0.connectors.0.weight", "stepping_stones.0.connectors.0.bias"}
    AutoModelForCausalLM.from_pretrained(Path(out) / "student")  # a plain transformers folder, no connectors


def test_clear_errors(teacher):
    student = tiny_llama(vocab_size=VOCAB, hidden=24, layers=3, heads=4, seed=5)
    with pytest.raises(KDForgeError, match="unknown kd_loss 'kl'"):
        Distiller(teacher, student, [{"loss": "block_kd", "kd_loss": "kl"}])
    with pytest.raises(KDForgeError, match="needs labels"):
        Distiller(teacher, student, [{"loss": "block_kd", "kd_loss": "decoupled_kd"}])
    with pytest.raises(KDForgeError, match="in_dim == out_dim"):
        Distiller(teacher, student, [{"loss": "block_kd", "projector": "identity"}])
    with pytest.raises(KDForgeError, match="has no argument 'beta'"):
        Distiller(teacher, student, [{"loss": "block_kd", "beta": 0.5}])
    with pytest.raises(KDForgeError, match="no stepping stones"):
        Distiller(teacher, tiny_llama(vocab_size=VOCAB, hidden=24, layers=1, heads=4), [{"loss": "block_kd"}])
    with pytest.raises(KDForgeError, match="teacher has 4 layers"):
        Distiller(teacher, student, [{"loss": "block_kd", "layer_map": [[0, 4]]}])


# --- sequential CNN stages ---------------------------------------------------------------------------------------


class StageNet(nn.Module):
    """The stage convention: `stages` run in order, then `head`."""

    def __init__(self, widths: list[int], classes: int = 5, pool_first: bool = True):
        super().__init__()
        blocks, c_in = [], 3
        for k, c in enumerate(widths):
            layers = [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if k == 0 and pool_first:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            c_in = c
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes))

    def forward(self, x):
        return self.head(self.stages(x))


def test_cnn_stepping_stones():
    torch.manual_seed(0)
    teacher = StageNet([16, 32, 32]).eval().requires_grad_(False)
    student = StageNet([8, 8, 16], pool_first=False)  # stage maps 8x8 where the teacher's are 4x4: pooled to fit
    x = torch.randn(6, 3, 8, 8)
    batch = {"inputs": x, "labels": torch.randint(0, 5, (6,))}
    d = Distiller(teacher, student, [{"loss": "cross_entropy"}, {"loss": "block_kd", "temperature": 4.0}],
                  example_batch=batch)
    stones = _stones(d)
    assert stones.pairs == [(0, 0), (1, 1)] and stones.weights == [0.25, 0.5]
    assert all(isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1) for c in stones.connectors)
    total, values = d(batch)
    assert values["block_kd"] > 0
    total.backward()
    assert all(c.weight.grad.abs().sum() > 0 for c in stones.connectors)
    assert student.stages[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # a student that is a copy of the teacher, identity connectors: every stone is the teacher -> loss 0
    twin = StageNet([16, 32, 32]).eval()
    twin.load_state_dict(teacher.state_dict())
    d2 = Distiller(teacher, twin, [{"loss": "block_kd", "projector": "identity"}], example_batch=batch)
    d2.eval()
    with torch.no_grad():
        assert d2(batch)[1]["block_kd"].abs() < 1e-6
    with pytest.raises(KDForgeError, match="use projector conv1x1"):
        Distiller(teacher, student, [{"loss": "block_kd", "projector": "linear"}], example_batch=batch)
