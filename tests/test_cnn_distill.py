"""The non-LM path end to end: a small CNN teacher trained on scikit-learn's bundled 8x8 digits, distilled into a
smaller CNN with the Distiller in a plain loop (CE + forward KL + attention transfer + a conv1x1 FitNets hint + a
FAM-projected feature term), against a CE-only student trained identically."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdforge import Distiller

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def _block(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class TeacherCNN(nn.Module):
    def __init__(self):
        super().__init__()
        # features.0, .1: 8x8 maps; .2 pools to 4x4; .3: 4x4
        self.features = nn.Sequential(_block(1, 16), _block(16, 32), _block(32, 64, pool=True), _block(64, 64))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


class StudentCNN(nn.Module):
    def __init__(self):
        super().__init__()
        # features.0: 8x8 (-> FAM to teacher features.1), features.1: 4x4 (-> teacher features.3)
        self.features = nn.Sequential(_block(1, 8), _block(8, 16, pool=True))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


@pytest.fixture(scope="module")
def digits():
    data = sklearn_datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


def _batches(n: int, size: int, epoch: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
    return [order[i: i + size] for i in range(0, n, size)]


@torch.no_grad()
def _accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train()
    return acc


@pytest.fixture(scope="module")
def teacher(digits):
    (x, y), (xv, yv) = digits
    torch.manual_seed(0)
    model = TeacherCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(5):
        for idx in _batches(len(y), 64, epoch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = _accuracy(model, xv, yv)
    assert acc > 0.9, f"the teacher only reached {acc:.3f}"
    model.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


OBJECTIVE = [
    {"loss": "cross_entropy"},
    {"loss": "forward_kl", "temperature": 4.0},
    {"loss": "attention_transfer", "weight": 2.0, "student": "features.1", "teacher": "features.3"},
    {"loss": "fitnets_hint", "weight": 0.05, "student": "features.1", "teacher": "features.3", "projector": "conv1x1"},
    {"loss": "hidden_mse", "name": "fam_hint", "weight": 0.1, "student": "features.0", "teacher": "features.1",
     "projector": "fam"},
]


def _train_student(teacher, digits, objective, epochs: int = 3) -> tuple[Distiller, float]:
    (x, y), (xv, yv) = digits
    torch.manual_seed(1)
    student = StudentCNN()
    d = Distiller(teacher, student, objective, example_batch={"inputs": x[:4], "labels": y[:4]})
    opt = torch.optim.Adam([p for p in d.parameters() if p.requires_grad], lr=3e-3)
    d.train()
    for epoch in range(epochs):
        for idx in _batches(len(y), 64, epoch):
            loss, _ = d({"inputs": x[idx], "labels": y[idx]})
            opt.zero_grad()
            loss.backward()
            opt.step()
    return d, _accuracy(student, xv, yv)


def test_cnn_feature_terms_compute_and_reach_student_and_projectors(teacher, digits):
    (x, y), _ = digits
    torch.manual_seed(1)
    d = Distiller(teacher, StudentCNN(), OBJECTIVE, example_batch={"inputs": x[:4], "labels": y[:4]})
    hint, fam = d.feature_terms["1"].projectors[0], d.feature_terms["2"].projectors[0]
    assert isinstance(hint, nn.Conv2d) and hint.kernel_size == (1, 1) and type(fam).__name__ == "FrequencyAttention"
    d.train()
    total, values = d({"inputs": x[:32], "labels": y[:32]})
    assert set(values) == {"cross_entropy", "forward_kl", "attention_transfer", "fitnets_hint", "fam_hint"}
    assert all(torch.isfinite(v) and v > 0 for v in values.values())
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert hint.weight.grad.abs().sum() > 0
    assert fam.global_filter.grad.abs().sum() > 0 and fam.local.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training  # the Distiller's train() never puts the teacher in train mode


def test_distilled_student_is_as_accurate_as_a_ce_only_student(teacher, digits):
    _, ce_acc = _train_student(teacher, digits, [{"loss": "cross_entropy"}])
    _, kd_acc = _train_student(teacher, digits, OBJECTIVE)
    assert kd_acc > 0.9, f"distilled student accuracy {kd_acc:.3f}"
    assert kd_acc >= ce_acc - 0.03, f"distilled {kd_acc:.3f} vs CE-only {ce_acc:.3f}"
