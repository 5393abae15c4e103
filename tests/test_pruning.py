"""student.init pruned: structured (Minitron-style) pruning of a Llama teacher into a smaller Llama."""
from __future__ import annotations

import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.models import tiny_llama
from kdforge.pruning import prune
from kdforge.recipe import PruneSpec, parse_recipe


def _teacher(layers: int = 3, heads: int = 8, seed: int = 1):
    # 8 query heads over 4 KV heads (2 per group), hidden 64, intermediate 128
    return tiny_llama(vocab_size=128, hidden=64, layers=layers, heads=heads, seed=seed).eval()


def _ids(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_nothing_pruned_is_the_teacher():
    teacher = _teacher()
    student = prune(teacher, PruneSpec(calibration_tokens=64), _ids())
    ids = _ids(2, 16, seed=5)
    assert torch.equal(_logits(student, ids), _logits(teacher, ids))
    assert student.kdforge_teacher_layers == [0, 1, 2]


def test_dead_mlp_channels_are_the_ones_pruned():
    teacher = _teacher()
    dead = [3, 10, 11, 40, 77, 100]
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.mlp.up_proj.weight[dead] = 0  # act(gate) * 0: these channels never fire
    ids = _ids(2, 16, seed=5)
    for n_pruned in (len(dead), len(dead) - 1):  # all of them, or all but one
        student = prune(teacher, PruneSpec(intermediate_size=128 - n_pruned), _ids())
        assert student.config.intermediate_size == 128 - n_pruned
        torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=1e-5)


def test_an_identity_block_is_the_one_removed():
    teacher = _teacher(layers=4)
    with torch.no_grad():  # block 2 adds nothing to the residual stream
        teacher.model.layers[2].self_attn.o_proj.weight.zero_()
        teacher.model.layers[2].mlp.down_proj.weight.zero_()
    student = prune(teacher, PruneSpec(layers=3), _ids())
    assert student.kdforge_teacher_layers == [0, 1, 3]
    assert student.config.num_hidden_layers == 3
    ids = _ids(2, 16, seed=5)
    torch.testing.assert_close(_logits(student, ids), _logits(teacher, ids), rtol=0, atol=1e-5)


def test_heads_keep_whole_kv_groups_and_head_dim(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = _teacher()
    spec = PruneSpec(num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, hidden_size=48, layers=2)
    student = prune(teacher, spec, _ids())
    c = student.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.hidden_size, c.num_hidden_layers) \
        == (4, 2, 96, 48, 2)
    assert c.head_dim == 8  # the teacher's 64 / 8
    attn = student.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (32, 48) and attn.k_proj.weight.shape == (16, 48)
    assert attn.o_proj.weight.shape == (48, 32)
    student.save_pretrained(tmp_path / "s")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = _ids(2, 16, seed=5)
    assert torch.equal(_logits(loaded, ids), _logits(student, ids))


def test_query_heads_are_cut_evenly_per_kv_group():
    teacher = _teacher()
    student = prune(teacher, PruneSpec(num_attention_heads=4), _ids())  # 4 KV groups kept, 1 query head each
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (4, 4)
    q = student.model.layers[0].self_attn.q_proj.weight.view(4, 8, 64)
    t = teacher.model.layers[0].self_attn.q_proj.weight.view(4, 2, 8, 64)  # [group, head in group, dim, in]
    for g in range(4):  # student query head g is one of the teacher's query heads of KV group g
        assert any(torch.equal(q[g], t[g, h]) for h in range(2))


@pytest.mark.parametrize("spec, message", [
    (PruneSpec(num_attention_heads=6, num_key_value_heads=4), "valid with num_key_value_heads 4: 4, 8"),
    (PruneSpec(num_attention_heads=6), "valid with num_key_value_heads 4: 4, 8"),
    (PruneSpec(num_attention_heads=6, num_key_value_heads=2), "valid with num_key_value_heads 2: 2, 4"),
    (PruneSpec(num_attention_heads=16, num_key_value_heads=8), "the teacher has 4; valid: 1..4"),
    (PruneSpec(layers=5), "student.prune.layers is 5 but the teacher has 3; valid: 1..3"),
    (PruneSpec(intermediate_size=200), "valid: 1..128"),
    (PruneSpec(hidden_size=65), "valid: 1..64"),
])
def test_bad_sizes_are_refused_in_one_line(spec, message):
    with pytest.raises(KDForgeError, match=message) as err:
        prune(_teacher(), spec, _ids())
    assert "\n" not in str(err.value)


def test_other_architectures_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(KDForgeError, match="Llama-style teachers .*'gpt2'"):
        prune(gpt2, PruneSpec(layers=1), _ids())


def test_a_pruned_student_trains_and_exports(tiny_recipe, tiny_assets):
    from transformers import AutoModelForCausalLM

    from kdforge.train import prepare, train

    recipe = parse_recipe({**tiny_recipe, "student": {"init": "pruned", "prune": {
        "layers": 2, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
        "hidden_size": 32, "calibration_tokens": 256}}})
    setup = prepare(recipe)
    c = setup.student.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.hidden_size) == (2, 64, 2, 1, 32)
    out = train(recipe, setup=setup, progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out / "student").eval()
    assert exported.config.num_hidden_layers == 2 and exported.config.hidden_size == 32
    ids = setup.train_blocks.ids[:2]
    torch.testing.assert_close(_logits(exported, ids), _logits(setup.student, ids), rtol=0, atol=1e-5)


def test_init_pruned_needs_sizes(tiny_recipe):
    with pytest.raises(KDForgeError, match="student.init pruned needs student.prune"):
        parse_recipe({**tiny_recipe, "student": {"init": "pruned"}})
