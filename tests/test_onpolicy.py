"""On-policy distillation (kdforge.onpolicy): GKD's student-generated batches, DistiLLM's adaptive schedule and replay
buffer, MiniLLM's teacher-mixed sampling and policy-gradient loss (kdforge.losses.policy), resume."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import KDForgeError
from kdforge.generate import generate_batch
from kdforge.losses.policy import minillm_policy
from kdforge.onpolicy import (AdaptiveSchedule, OnPolicy, ReplayBuffer, derived_seed, mixed_sample, onpolicy_for,
                              prompts_of)
from kdforge.recipe import GenerateSpec, OnPolicySpec, parse_recipe


def _pairs(n: int, seed: int) -> list[dict]:
    from conftest import make_text

    return [{"prompt": make_text(6 + i % 4, seed + i).replace("\n", " ")[:18 + 5 * (i % 3)],
             "response": make_text(5, seed + 50 + i).replace("\n", " ")[:24]} for i in range(n)]


@pytest.fixture()
def op_recipe(tiny_recipe, tmp_path):
    for name, rows in (("train", _pairs(12, 0)), ("val", _pairs(4, 100))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {**tiny_recipe, "data": {"prompts": str(tmp_path / "train.jsonl"),
                                    "validation": [str(tmp_path / "val.jsonl")], "seq_len": 32},
            "objective": [{"loss": "generalized_jsd", "beta": 0.5}],
            "onpolicy": {"lambda": 1.0, "max_new_tokens": 8, "temperature": 1.0}}


def _setup(recipe_dict):
    from kdforge.data.packing import make_batch
    from kdforge.train import prepare

    setup = prepare(parse_recipe(recipe_dict))
    return setup, make_batch(setup.train_blocks, torch.arange(4))


def test_lambda_one_trains_on_the_students_samples_and_lambda_zero_is_off_policy(op_recipe):
    setup, batch = _setup(op_recipe)
    policy = onpolicy_for(setup)
    out = policy.batches([batch], step=3)[0]
    prompts = prompts_of(batch)
    # the responses are exactly what the student samples from the batch's prompts with the step's seed
    gen = GenerateSpec(max_new_tokens=8, do_sample=True, temperature=1.0)
    expected = generate_batch(setup.student, setup.tokenizer, prompts, gen, seed=derived_seed(0, "generate", 3, 0, 0))
    eos = setup.tokenizer.eos_token_id
    for i, (p, e) in enumerate(zip(prompts, expected)):
        response = e["ids"] + ([eos] if e["finish"] == "eos" else [])
        n = len(p) + len(response)
        assert out["input_ids"][i, :n].tolist() == p + response
        assert out["labels"][i, :len(p)].eq(-100).all() and out["labels"][i, len(p):n].tolist() == response
        assert out["labels"][i, n:].eq(-100).all() and out["attention_mask"][i].sum() == n
    with torch.no_grad():
        on, _ = setup.distiller(out)
        off, _ = setup.distiller(batch)
    assert not torch.isclose(on, off), "the KD term is computed on the student's samples, not the data's responses"
    # lambda 0: every batch is the data's own, so the loss is the off-policy loss
    setup0, batch0 = _setup({**op_recipe, "onpolicy": {**op_recipe["onpolicy"], "lambda": 0.0}})
    policy0 = onpolicy_for(setup0)
    kept = policy0.batches([batch0, batch0], step=3)
    assert all(k is batch0 for k in kept)
    with torch.no_grad():
        assert torch.equal(setup0.distiller(kept[0])[0], setup0.distiller(batch0)[0])
    assert policy0.log_fields()["onpolicy/generated"] == 0.0


def test_gkd_loss_on_a_generated_batch_is_the_generalized_jsd_of_its_response_tokens(op_recipe):
    setup, batch = _setup(op_recipe)  # chunked logit losses (train.logit_chunk_size auto)
    out = onpolicy_for(setup).batches([batch], step=0)[0]
    with torch.no_grad():
        _, values = setup.distiller(out)
        s = setup.student(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1].double()
        t = setup.teacher(input_ids=out["input_ids"], attention_mask=out["attention_mask"]).logits[:, :-1].double()
    mask = (out["labels"][:, 1:] != -100) & out["attention_mask"][:, 1:].bool()
    ps, pt = s.softmax(-1), t.softmax(-1)
    m = 0.5 * pt + 0.5 * ps
    jsd = 0.5 * (pt * (pt.log() - m.log())).sum(-1) + 0.5 * (ps * (ps.log() - m.log())).sum(-1)
    direct = jsd[mask].mean()
    assert mask.sum() > 8
    assert float(values["generalized_jsd"]) == pytest.approx(float(direct), rel=1e-4)


def test_distillm_threshold_rises_only_when_the_validation_loss_rises_by_eps():
    sched = AdaptiveSchedule(init_threshold=0.0, step=0.1, loss_eps=0.1)
    assert sched.observe(2.0) is False and sched.reference == 2.0  # the loss before training: the reference
    assert sched.observe(2.05) is False and sched.threshold == 0.0  # a rise below eps
    assert sched.observe(1.6) is False and sched.threshold == 0.0  # falling: unchanged, reference kept
    assert sched.observe(2.1) is True and sched.threshold == pytest.approx(0.1) and sched.reference == 2.1
    assert sched.observe(2.15) is False  # measured from the loss at the last rise
    assert sched.observe(2.2) is True and sched.threshold == pytest.approx(0.2)
    for k in range(20):
        sched.observe(3.0 + k)
    assert sched.threshold == 1.0  # capped
    # fresh generations get theta * (1 - step/steps), the rest of theta is replay (the authors' 'decreasing')
    sched = AdaptiveSchedule(init_threshold=0.5)
    assert sched.fresh_threshold(0, 10) == pytest.approx(0.45) and sched.fresh_threshold(9, 10) == 0.0
    assert AdaptiveSchedule(0.5, replay_ratio="constant").fresh_threshold(3, 10) == 0.25


def test_distillm_controller_generates_fills_the_fifo_buffer_then_replays(op_recipe):
    losses = iter([2.0, 2.5, 2.0])
    recipe = {**op_recipe, "onpolicy": {"max_new_tokens": 6, "adaptive": {
        "init_threshold": 0.9, "eval_every": 1, "capacity": 4, "loss_eps": 0.1}}, "train": {
        **op_recipe["train"], "steps": 4}}
    setup, batch = _setup(recipe)
    policy = OnPolicy(setup.recipe.onpolicy, seed=0, steps=4, student=setup.student, teacher=setup.teacher,
                      tokenizer=setup.tokenizer, validation_loss=lambda: next(losses))
    policy.start(None)  # the reference loss before training
    assert policy.adaptive.reference == 2.0 and policy.adaptive.threshold == 0.9
    first = policy.batches([batch], step=0)[0]  # buffer empty and r < 0.9 or not: see the counts
    policy.after_step(1)  # validation 2.5: rose by >= 0.1
    assert policy.adaptive.threshold == pytest.approx(1.0)
    policy.after_step(2)  # validation 2.0: falling, unchanged
    assert policy.adaptive.threshold == pytest.approx(1.0)
    if policy.counts["generated"] == 0:  # r >= 0.9 at step 0: one more step at theta 1 generates
        first = policy.batches([batch], step=1)[0]
    assert len(policy.buffer) == 4 and policy.counts["generated"] == 1
    # the last step: fresh share theta*(1 - 4/4) = 0, buffer full, r < theta = 1: a replayed batch of buffered rows
    replayed = policy.batches([batch], step=3)[0]
    assert policy.counts["replayed"] == 1
    assert sorted(map(tuple, replayed["input_ids"].tolist())) == sorted(map(tuple, first["input_ids"].tolist()))
    # first in, first out: a second batch pushed into a full buffer drops the oldest rows
    buf = ReplayBuffer(6)
    buf.push(first)
    buf.push(batch)
    assert len(buf) == 6 and [r[0].tolist() for r in buf.rows][:2] == first["input_ids"][2:].tolist()


def test_minillm_per_token_loss_on_a_hand_made_case():
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.2, 0.5, 0.1], [2.0, -1.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    t = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 0.3], [0.5, 0.5, -2.0], [3.0, 0.0, 0.0]]])
    y = torch.tensor([[1, 0, 2, 0]])
    mask = torch.tensor([[True, True, True, False]])  # the last position is padding
    alpha, gamma, scale = 0.2, 0.95, 0.5

    def sm(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    q = [sm(s[0, i].tolist()) for i in range(3)]
    p = [sm(t[0, i].tolist()) for i in range(3)]
    r = [(math.log(p[i][y[0, i]]) - math.log(q[i][y[0, i]])) / scale for i in range(3)]
    ret = [r[1] + gamma * r[2], r[2], 0.0]  # the paper's R_{t+1}: future rewards only
    adv = [ret[0] / 2, ret[1] / 1, 0.0]  # length-normalised by the tokens summed (none: 0)
    mean = sum(adv) / 3
    std = math.sqrt(sum((a - mean) ** 2 for a in adv) / 2 + 1e-8)  # unbiased variance, as torch.var_mean
    adv = [(a - mean) / std for a in adv]
    w = [q[i][y[0, i]] / (alpha * p[i][y[0, i]] + (1 - alpha) * q[i][y[0, i]]) for i in range(3)]
    kl = [sum(q[i][v] * (math.log(q[i][v]) - math.log(p[i][v])) for v in range(3)) for i in range(3)]
    direct = [-adv[i] * w[i] + kl[i] for i in range(3)]
    per_token = minillm_policy(s, t, labels=y, mask=mask, alpha=alpha, gamma=gamma, reward_scaling=scale,
                               reduction="none")
    assert per_token[0, :3].tolist() == pytest.approx(direct, rel=1e-5, abs=1e-6)
    assert per_token[0, 3] == 0
    # the gradient: -A·w·∇log q(y) (REINFORCE with the fixed advantage and weight) + ∇KL(q‖p) exactly
    minillm_policy(s, t, labels=y, mask=mask, alpha=alpha, gamma=gamma, reward_scaling=scale).backward()
    s2 = s.detach().clone().requires_grad_(True)
    log_q = F.log_softmax(s2[0, :3], -1)
    log_p = F.log_softmax(t[0, :3], -1)
    ref = (-torch.tensor(adv) * torch.tensor(w) * log_q.gather(-1, y[0, :3, None]).squeeze(-1)).sum()
    ref = (ref + (log_q.exp() * (log_q - log_p)).sum()) / 3
    ref.backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-6)
    # the authors' code sums from the current token: another advantage, same single-step term
    current = minillm_policy(s.detach(), t, labels=y, mask=mask, long_term_from="current", reduction="none")
    assert not torch.allclose(current[0, :3], per_token[0, :3].detach())


def test_teacher_mixed_sampling_follows_the_mixture_with_kv_caches(op_recipe):
    setup, batch = _setup(op_recipe)
    tok = setup.tokenizer
    prompts = prompts_of(batch)
    prompts[0] = prompts[0][len(prompts[0]) // 2:]  # prompts of other lengths, so left padding is exercised whatever
    assert len({len(p) for p in prompts}) > 1       # lengths the session's freshly trained BPE gives them
    # alpha 1 at a near-zero temperature is the teacher's greedy continuation (as transformers generate makes it)
    mixed = mixed_sample(setup.student, setup.teacher, prompts, alpha=1.0, temperature=1e-4, max_new_tokens=6,
                         eos=None, pad=tok.pad_token_id, seed=1)
    greedy = generate_batch(setup.teacher, tok, prompts, GenerateSpec(max_new_tokens=6, stop_at_eos=False))
    assert [m["ids"] for m in mixed] == [g["ids"] for g in greedy]
    # and alpha 0 the student's
    mixed = mixed_sample(setup.student, setup.teacher, prompts, alpha=0.0, temperature=1e-4, max_new_tokens=6,
                         eos=None, pad=tok.pad_token_id, seed=1)
    greedy = generate_batch(setup.student, tok, prompts, GenerateSpec(max_new_tokens=6, stop_at_eos=False))
    assert [m["ids"] for m in mixed] == [g["ids"] for g in greedy]


def test_student_vocabulary_beyond_the_teachers_is_refused(op_recipe):
    from kdforge.models import tiny_llama

    setup, _ = _setup(op_recipe)
    big = tiny_llama(vocab_size=setup.teacher.config.vocab_size + 8)
    with pytest.raises(KDForgeError, match="student's vocabulary has") as err:
        OnPolicy(OnPolicySpec(), seed=0, steps=1, student=big, teacher=setup.teacher, tokenizer=setup.tokenizer)
    assert "\n" not in str(err.value)


def test_refusals_name_the_fix(op_recipe, tiny_recipe):
    from kdforge.onpolicy import check_objective

    with pytest.raises(Exception, match="set data.prompts"):
        parse_recipe({**tiny_recipe, "onpolicy": {"lambda": 0.5}})
    recipe = parse_recipe({**op_recipe, "onpolicy": None, "objective": [{"loss": "minillm_policy"}]})
    with pytest.raises(KDForgeError, match="lambda: 1, teacher_mix: 0.2"):
        check_objective(recipe, None)
    recipe = parse_recipe({**op_recipe, "onpolicy": {"lambda": 1, "teacher_mix": 0.2},
                           "objective": [{"loss": "minillm_policy", "alpha": 0.2}]})
    check_objective(recipe, None)
    with pytest.raises(KDForgeError, match="logit_chunk_size: null"):
        check_objective(recipe, 256)


def test_resumed_run_makes_the_same_generations_and_replays(op_recipe, tmp_path, monkeypatch):
    """A DistiLLM run resumed from its step-2 checkpoint generates and replays exactly what the uninterrupted run did
    from step 2 on, ends with the same replay buffer and threshold, and the same student."""
    from kdforge.train import train

    seen: list[tuple[int, list]] = []
    original = OnPolicy.generate

    def record(self, batch, seed, by_teacher=False):
        out = original(self, batch, seed, by_teacher)
        seen.append((seed, out["input_ids"].tolist()))
        return out

    monkeypatch.setattr(OnPolicy, "generate", record)
    recipe = parse_recipe({**op_recipe, "onpolicy": {"max_new_tokens": 6, "adaptive": {
        "init_threshold": 0.9, "eval_every": 2, "capacity": 8, "loss_eps": 0.0}},
        "train": {**op_recipe["train"], "steps": 6, "save_every": 2, "keep_checkpoints": 3}})
    run = train(recipe, progress=False, out=tmp_path / "a")
    whole = list(seen)
    assert len(whole) >= 2
    shutil.copytree(run, tmp_path / "b")
    seen.clear()
    train(recipe, progress=False, out=tmp_path / "b", resume_from="step_00000002")
    step_seeds = {derived_seed(0, "generate", s, 0, 0): s for s in range(6)}
    after = [g for g in whole if step_seeds[g[0]] >= 2]
    assert after, "the resumed part generates (else this test would compare nothing)"
    assert seen == after
    a = torch.load(tmp_path / "a/checkpoints/step_00000006/trainer_state.pt", weights_only=True)["onpolicy"]
    b = torch.load(tmp_path / "b/checkpoints/step_00000006/trainer_state.pt", weights_only=True)["onpolicy"]
    assert a["counts"] == b["counts"] and a["threshold"] == b["threshold"] and a["reference"] == b["reference"]
    assert a["counts"]["replayed"] + a["counts"]["generated"] >= 3
    assert all(torch.equal(a["buffer"][k], b["buffer"][k]) for k in ReplayBuffer.KEYS)
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "a/student/model.safetensors")
    wb = load_file(tmp_path / "b/student/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(x) for x in (tmp_path / "a/metrics.jsonl").read_text().splitlines()]
    assert "onpolicy/threshold" in rows[-1] and "onpolicy/validation_loss" in rows[-1]


def test_seq_kd_gives_the_other_batches_the_teachers_samples(op_recipe):
    setup, batch = _setup({**op_recipe, "onpolicy": {**op_recipe["onpolicy"], "lambda": 0.0, "seq_kd": True}})
    policy = onpolicy_for(setup)
    out = policy.batches([batch], step=2)[0]
    prompts = prompts_of(batch)
    gen = GenerateSpec(max_new_tokens=8, do_sample=True, temperature=1.0)
    expected = generate_batch(setup.teacher, setup.tokenizer, prompts, gen, seed=derived_seed(0, "generate", 2, 0, 0))
    eos = setup.tokenizer.eos_token_id
    for i, (p, e) in enumerate(zip(prompts, expected)):
        response = e["ids"] + ([eos] if e["finish"] == "eos" else [])
        assert out["input_ids"][i, :len(p) + len(response)].tolist() == p + response
    assert policy.log_fields() == {"onpolicy/generated": 0.0, "onpolicy/teacher_generated": 1.0}
