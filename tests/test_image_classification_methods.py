"""task image_classification, the methods that reach into the CNNs beyond their logits: CAT-KD's class activation
maps (tap `cam`: the linear head applied as a 1x1 conv, or per position for a flatten head) pinned on a hand-computed
case and against a direct computation, and Block-KD's stepping stones running the live teacher's blocks while its
logits come from the once-computed store. The recipes themselves run end to end in test_image_classification.py."""
from __future__ import annotations

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


def test_pwkd_is_refused_for_images_in_one_line(tmp_path):
    # PWKD's teacher curriculum: depth-truncated sub-networks exist for decoder LMs only (a CNN's head does not fit
    # an earlier block's output), and the paper's width sub-networks need a jointly trained slimmable teacher
    r = _recipe("digits_kd", tmp_path / "r")
    r["teacher"]["curriculum"] = {"stages": [{"layers": 2}, {}]}
    with pytest.raises(KDForgeError, match="no curriculum") as err:
        parse_recipe(r)
    assert "\n" not in str(err.value)
