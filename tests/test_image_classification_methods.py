"""task image_classification, the methods that reach into the CNNs beyond their logits: CAT-KD's class activation
maps (tap `cam`: the linear head applied as a 1x1 conv, or per position for a flatten head) pinned on a hand-computed
case and against a direct computation, and Block-KD's stepping stones running the live teacher's blocks while its
logits come from the once-computed store; PWKD's slimmable teacher (its width sub-networks against plain CNNs of the
sliced weights), its stages and learning-rate restarts. The recipes themselves run end to end in
test_image_classification.py (PWKD's here)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("sklearn.datasets")

from kdforge.errors import KDForgeError  # noqa: E402
from kdforge.losses.cam import cat_kd, class_activation_maps  # noqa: E402
from kdforge.recipe import parse_recipe  # noqa: E402
from kdforge.taps import Taps  # noqa: E402
from kdforge.tasks import image_classification as ic  # noqa: E402
from kdforge.train import prepare  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(autouse=True)
def _cache_env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path_factory.getbasetemp() / "kdforge_cache"))


def tiny(head: str) -> ic.CNN:
    torch.manual_seed(0)
    return ic.CNN({"channels": [3, 4], "pool_after": [1], "head": head, "num_classes": 5}, (6, 6)).eval()


def test_class_maps_by_hand():
    # features [1, C=2, 1, 2]: positions (0, 0) and (0, 1); channel 0 = [1, 2], channel 1 = [3, 4]
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    gap = torch.tensor([[1.0, -1.0], [2.0, 0.5]])  # [K=2, C=2]: the same weights at every position
    assert class_activation_maps(f, gap).tolist() == [[[[1 - 3, 2 - 4]], [[2 + 1.5, 4 + 2]]]]
    assert class_activation_maps(f, gap[:, :, None, None]).tolist() == class_activation_maps(f, gap).tolist()
    # a flatten head: one weight per channel and position, [K=1, C=2, H=1, W=2]
    per_position = torch.tensor([[[[1.0, 0.0]], [[0.0, -2.0]]]])
    assert class_activation_maps(f, per_position).tolist() == [[[[1.0, -8.0]]]]
    with pytest.raises(KDForgeError, match=r"position-wise \[K, 2, 1, 2\] weight, got \(1, 2, 2, 2\)"):
        class_activation_maps(f, torch.zeros(1, 2, 2, 2))


@pytest.mark.parametrize("head", ["avgpool", "flatten"])
def test_the_cnn_cams_are_its_head_as_a_1x1_conv_and_pool_back_to_its_logits(head):
    model = tiny(head)
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():
        features = model.features(x)  # [4, 4, 3, 3]
        linear = model.classifier[-1]
        if head == "avgpool":  # the authors' conversion: the FC weight as a bias-free 1x1 convolution
            direct = F.conv2d(features, linear.weight[:, :, None, None])
            pooled = direct.mean(dim=(2, 3))
        else:  # each position's share of the flattened dot product
            w = linear.weight.view(5, 4, 3, 3)
            direct = torch.stack([(w[k] * features).sum(1) for k in range(5)], dim=1)
            pooled = direct.sum(dim=(2, 3))
        cams = model.class_maps(x)
        logits = model(x)
    assert cams.shape == (4, 5, 3, 3)
    torch.testing.assert_close(cams, direct)
    torch.testing.assert_close(pooled + linear.bias, logits)
    # the tap `cam` captures the same maps; untapped, the module never runs, and the weights are unchanged
    taps = Taps(model, {"c": "cam"})
    with taps.capture() as store, torch.no_grad():
        again = model(x)
    torch.testing.assert_close(store["c"], cams)
    torch.testing.assert_close(again, logits)
    assert not any("cam" in k for k in model.state_dict())
    calls = []
    model.cam.forward = lambda *a: calls.append(1)
    model(x)
    assert not calls


def _recipe(name: str, out: Path, steps: int = 4) -> dict:
    r = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    r["output_dir"] = str(out)
    r["train"].update(steps=steps, save_every=steps, log_every=1, warmup_steps=1)
    return r


def test_cat_kd_on_the_digits_cnns_equals_a_direct_computation(tmp_path):
    setup = prepare(parse_recipe(_recipe("digits_cat_kd", tmp_path / "r")))
    source = setup.distiller.teacher_source
    assert isinstance(source, ic.PrecomputedTeacher) and source.features["cat_kd.t"].shape == (1347, 10, 4, 4)
    batch = setup.task.make_batch(setup.train_blocks, torch.arange(16))
    with torch.no_grad():
        _, values = setup.distiller(batch)
        s = F.normalize(F.adaptive_avg_pool2d(setup.student.class_maps(batch["inputs"]), 2).flatten(2), dim=2)
        t = F.normalize(F.adaptive_avg_pool2d(setup.teacher.class_maps(batch["inputs"]), 2).flatten(2), dim=2)
        ce = F.cross_entropy(setup.student(batch["inputs"]), batch["labels"])
    assert float(values["cat_kd"]) == pytest.approx(float(F.mse_loss(s, t)), rel=1e-5)  # the authors' scale
    assert float(values["cross_entropy"]) == pytest.approx(float(ce), rel=1e-5)


def test_cat_kd_binarize_thresholds_the_teachers_maps_at_their_mean_absolute_value():
    t = torch.tensor([[[[4.0, -2.0], [1.0, 1.0]]]])  # mean |t| = 2: only the 4 exceeds it
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    # pool 1x1, no normalisation: (mean(s) - mean(binarised t))^2 = (2.5 - 0.25)^2
    assert float(cat_kd(s, t, pool_size=1, normalize=False, binarize=True)) == pytest.approx(2.25 ** 2)
    assert float(cat_kd(s, t, pool_size=1, normalize=False)) == pytest.approx((2.5 - 1.0) ** 2)


def test_block_kd_runs_the_live_teachers_blocks_beside_its_stored_logits(tmp_path):
    setup = prepare(parse_recipe(_recipe("digits_block_kd", tmp_path / "r")))
    d = setup.distiller
    assert isinstance(d.teacher_source, ic.PrecomputedTeacher) and d.teacher_source.model is setup.teacher
    stones = d.stepping_stones["0"]
    assert stones.pairs == [(0, 1)] and stones.weights == [0.5]  # student block 0 -> teacher blocks 2, 3 + head
    batch = setup.task.make_batch(setup.train_blocks, torch.arange(8))
    whole, blocks = [], []
    h1 = setup.teacher.register_forward_hook(lambda *a: whole.append(1))
    h2 = setup.teacher.features[2].register_forward_hook(lambda *a: blocks.append(1))
    d.train()
    total, values = d(batch)
    total.backward()
    h1.remove()
    h2.remove()
    assert not whole and blocks == [1], "the teacher's logits are read from the store; only its blocks run"
    assert stones.connectors[0].weight.grad.abs().sum() > 0
    assert setup.student.features[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in setup.teacher.parameters())
    # the stone's value, computed directly: the connector, the teacher's last two blocks and head, forward KL at T=4
    with torch.no_grad():
        hidden = stones.connectors[0](setup.student.features[0](batch["inputs"]))
        z = setup.teacher.classifier(setup.teacher.features[3](setup.teacher.features[2](hidden))) / 4
        p = setup.teacher(batch["inputs"]).div(4).log_softmax(-1)
        kl = (p.exp() * (p - z.log_softmax(-1))).sum(-1).mean() * 16
    assert float(values["block_kd"]) == pytest.approx(0.5 * float(kl), rel=1e-4)


def test_block_kd_with_crossfit_is_refused_in_one_line(tmp_path):
    r = _recipe("digits_block_kd", tmp_path / "r")
    r["teacher"]["crossfit"] = {"folds": 2}
    with pytest.raises(KDForgeError, match="a block_kd term runs the teacher's own blocks") as err:
        prepare(parse_recipe(r))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- PWKD: a slimmable teacher CNN


def _slimmable(head: str, widths=(0.3, 0.5, 1.0)) -> ic.SlimmableCNN:
    torch.manual_seed(0)
    model = ic.SlimmableCNN({"channels": [3, 5], "pool_after": [1], "head": head, "num_classes": 4,
                             "widths": list(widths)}, (6, 6))
    for m in model.modules():  # BatchNorms with statistics and affine weights of their own, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            for t in (m.running_mean, m.running_var, m.weight, m.bias):
                t.data = torch.rand_like(t) + 0.5
    return model.eval()


@pytest.mark.parametrize("head", ["avgpool", "flatten"])
@pytest.mark.parametrize("width", [0.3, 0.5])
def test_a_width_sub_network_is_a_plain_cnn_of_the_first_channels(head, width):
    model = _slimmable(head)
    kept = [ic.slim_channels(c, width) for c in (3, 5)]
    assert kept == ([1, 2] if width == 0.3 else [2, 3])  # ceil(w x C), 0.3 x 5 = 1.5 -> 2
    small = ic.CNN({"channels": kept, "pool_after": [1], "head": head, "num_classes": 4}, (6, 6)).eval()
    c_in = 1
    with torch.no_grad():
        for i, c in enumerate(kept):  # the sliced conv weights and the width's own BatchNorm
            small.features[i][0].weight.copy_(model.features[i][0].weight[:c, :c_in])
            small.features[i][0].bias.copy_(model.features[i][0].bias[:c])
            small.features[i][1].load_state_dict(model.slim_norms[f"{width:g}".replace(".", "_")][i].state_dict())
            c_in = c
        w = model.classifier[-1].weight
        head_weight = w[:, :c_in] if head == "avgpool" else w.view(4, 5, 3, 3)[:, :c_in].reshape(4, -1)
        small.classifier[-1].weight.copy_(head_weight)
        small.classifier[-1].bias.copy_(model.classifier[-1].bias)
        x = torch.randn(7, 1, 6, 6)
        torch.testing.assert_close(model(x, width=width), small(x))
    with pytest.raises(KDForgeError, match="has widths \\[0.3, 0.5, 1.0\\], not 0.75"):
        model(x, width=0.75)


@pytest.mark.parametrize("head", ["avgpool", "flatten"])
def test_the_full_width_is_the_plain_cnn_with_the_same_weights(head):
    model = _slimmable(head)
    plain = ic.CNN({"channels": [3, 5], "pool_after": [1], "head": head, "num_classes": 4}, (6, 6)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("slim_norms.")})
    x = torch.randn(5, 1, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
        torch.testing.assert_close(model(x, width=1.0), plain(x))
    torch.manual_seed(0)  # the same seed draws the plain CNN's initial weights (BatchNorms draw nothing)
    fresh = ic.CNN({"channels": [3, 5], "pool_after": [1], "head": head, "num_classes": 4}, (6, 6))
    assert torch.equal(fresh.features[0][0].weight, _slimmable(head).features[0][0].weight)


def _pwkd(out: Path, steps: int = 8) -> dict:
    r = _recipe("digits_pwkd", out, steps=steps)
    # a tiny teacher, trained fast
    r["teacher"]["config"].update(channels=[4, 8], pool_after=[1], epochs=1, widths=[0.5, 1.0])
    r["teacher"]["curriculum"]["stages"] = [{"width": 0.5}, {"width": 1.0}]
    return r


def test_pwkd_stages_restart_the_learning_rate_and_distil_from_each_width(tmp_path):
    from kdforge.train import lr_lambda, stage_boundaries

    r = _pwkd(tmp_path / "r")
    r["teacher"]["curriculum"]["stages"] = [{"width": 0.5, "steps": 3}, {"width": 1.0}]
    r["train"]["warmup_steps"] = 2
    recipe = parse_recipe(r)
    assert "widths" not in parse_recipe(_recipe("digits_kd", tmp_path / "k")).teacher.config  # its cache key of old
    setup = prepare(recipe)
    source = setup.distiller.teacher_source
    assert isinstance(source, ic.WidthCurriculum) and setup.distiller.teacher_takes_step
    assert source.stages == [(0, 3, 0.5), (3, 8, 1.0)] and source.boundaries == stage_boundaries(recipe) == [3]
    # each stage: warm-up over 2 steps, then cosine from the peak to m over what is left of it (steps 2; 5, 6, 7)
    m = recipe.train.min_lr_ratio
    lr = [lr_lambda(s, 2, 8, m, stage_boundaries(recipe)) for s in range(8)]
    cosine = [m + (1 - m) * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert lr == pytest.approx([0.5, 1.0, 1.0, 0.5, 1.0, *cosine])
    batch = setup.task.make_batch(setup.train_blocks, torch.arange(5, 21))
    with torch.no_grad():
        for step, width in ((0, 0.5), (2, 0.5), (3, 1.0), (7, 1.0)):
            expected = setup.teacher(batch["inputs"], width=width)
            torch.testing.assert_close(source(batch, step=step).logits.float(), expected.float(),
                                       atol=0.05, rtol=0.02)  # the teacher's dtype (auto: bf16 on such CPUs)
        assert not torch.allclose(setup.teacher(batch["inputs"], width=0.5), setup.teacher(batch["inputs"]))


def test_a_width_stage_begun_mid_training_runs_on_the_teachers_device():
    """WidthCurriculum computes a stage's logits when the stage begins, after kdforge.train has moved the teacher to
    its device; the stored images (on the CPU) must go there too. The meta device stands in for a GPU: a CPU image
    reaching a meta model raises."""
    from kdforge.teachers.live import LiveTeacher

    model = _slimmable("avgpool").to("meta")
    data = ic.ImageSet(images=torch.rand(7, 1, 6, 6), labels=torch.zeros(7, dtype=torch.long), rows=torch.arange(7),
                       source="seven images")
    source = ic.WidthCurriculum(LiveTeacher(model), data, [(0, 2, 0.3), (2, 4, 1.0)])
    batch = {"inputs": torch.rand(3, 1, 6, 6, device="meta"), "index": torch.tensor([0, 4, 6], device="meta")}
    for step in (0, 3):
        out = source(batch, step=step)
        assert isinstance(source._current[1], ic.PrecomputedTeacher) and source._current[1].logits.shape == (7, 4)
        assert out.logits.shape == (3, 4) and out.logits.device.type == "meta"


def test_pwkd_recipe_runs_end_to_end(tmp_path):
    from kdforge.train import train

    train(parse_recipe(_pwkd(tmp_path / "r", steps=4)), progress=False, out=tmp_path / "r")
    final = json.loads((tmp_path / "r" / "final.json").read_text())
    assert final["step"] == 4 and all(0 <= final[m]["accuracy"] <= 1 for m in ("student", "teacher"))
    assert ic.is_cnn_folder(tmp_path / "r" / "student")


@pytest.mark.parametrize("change, message", [
    (lambda r: r["teacher"]["config"].pop("widths"), "set teacher.model: cnn and teacher.config.widths"),
    (lambda r: r["teacher"]["curriculum"].update(stages=[{"layers": 2}, {}]), "layers / model cut or swap a decoder"),
    (lambda r: r["teacher"]["curriculum"].update(stages=[{"width": 0.25}, {}]), "width 0.25, which teacher.config"),
    (lambda r: r["teacher"]["config"].update(widths=[0.5, 0.25, 1.0]), "must ascend strictly within"),
    (lambda r: r["teacher"]["config"].update(widths=[0.5]), "end at 1.0"),
    (lambda r: r["teacher"].update(crossfit={"folds": 2}), "remove one of them"),
])
def test_pwkd_misuse_is_refused_in_one_line(tmp_path, change, message):
    r = _pwkd(tmp_path / "r")
    change(r)
    with pytest.raises(KDForgeError, match=message) as err:
        parse_recipe(r)
    assert "\n" not in str(err.value)


def test_pwkd_with_feature_terms_is_refused_in_one_line(tmp_path):
    r = _pwkd(tmp_path / "r")
    r["objective"].append({"loss": "attention_transfer", "student": "features.1", "teacher": "features.1"})
    with pytest.raises(KDForgeError, match="logits only") as err:
        prepare(parse_recipe(r))
    assert "\n" not in str(err.value)


def test_a_width_stage_is_refused_for_a_language_model_in_one_line():
    with pytest.raises(KDForgeError, match="stage width slims a teacher CNN") as err:
        parse_recipe({"teacher": {"model": "smollm2-135m", "curriculum": {"stages": [{"width": 0.5}, {}]}}})
    assert "\n" not in str(err.value)
