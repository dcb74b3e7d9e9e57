"""Metrics on known cases, using the project's shipped digits classifier (model_store/digits)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.cli import main as kdiff
from service.training.datasets import digits
from service.training.evaluate import real_baseline
from service.training.evaluation import accuracy, features, frechet_distance, load_classifier, steps_for_nfe

STORE = Path(__file__).resolve().parents[2] / "model_store" / "digits"


@pytest.fixture(scope="module")
def clf():
    return load_classifier(STORE)


def test_frechet_distance_closed_forms() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)  # same covariance
    b = rng.normal(size=(20000, 4)) * 2.0  # N(0, 4I): FD = 4 * (1 + 4 - 2 * 2) = 4
    assert frechet_distance(rng.normal(size=(20000, 4)), b) == pytest.approx(4.0, rel=0.05)


def test_classifier_accuracy_and_shuffled_labels_give_chance(clf) -> None:
    test = digits("test", 16)
    assert accuracy(clf, test.images, test.labels) >= 0.95
    shuffled = test.labels[torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(0))]
    assert 0.03 <= accuracy(clf, test.images, shuffled) <= 0.2


def test_real_vs_real_fd_matches_baseline_and_corruption_is_far(clf) -> None:
    base = real_baseline(clf, 1000, 16, seed=0)["fd_real_vs_real"]
    train, test = digits("train", 16), digits("test", 16)
    other = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:1000]
    test_feats = features(clf, test.images)
    fd_other = frechet_distance(features(clf, train.images[other]), test_feats)
    assert fd_other == pytest.approx(base, rel=0.35)
    noisy = (train.images[other] + 0.5 * torch.randn_like(train.images[other])).clamp(-1, 1)
    assert frechet_distance(features(clf, noisy), test_feats) > 3 * base


def test_steps_for_nfe() -> None:
    assert steps_for_nfe("dpmpp_2m", 20) == 20
    assert steps_for_nfe("heun", 19) == 10  # heun uses 2N - 1 evaluations
    with pytest.raises(ValueError):
        steps_for_nfe("dpm_adaptive", 10)


def test_eval_cli_on_an_untrained_model_scores_badly(tmp_path, capsys) -> None:
    from service.models.unet import UNetConfig
    from service.training.trainer import TrainConfig, Trainer

    cfg = UNetConfig(
        image_size=16,
        widths=[8, 16],
        depths=[1, 1],
        self_attn=[False, False],
        mapping_dim=16,
        groups=4,
        num_classes=10,
    )
    Trainer(cfg, TrainConfig(out=str(tmp_path / "m")), digits("train", 16)).save()
    out = tmp_path / "res.json"
    rc = kdiff(
        [
            "eval",
            "--model",
            str(tmp_path / "m"),
            "--classifier",
            str(STORE),
            "--n",
            "100",
            "--nfe",
            "2,3",
            "--samplers",
            "euler,heun",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "q.png"),
        ]
    )
    assert rc == 0 and (tmp_path / "q.png").exists()
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["nfe"], r["steps"]) for r in result["rows"]] == [
        ("euler", 2, 2),
        ("euler", 3, 3),
        ("heun", 2, 1),
        ("heun", 3, 2),
    ]
    for row in result["rows"]:  # an untrained net denoises to a blur: chance accuracy, FD far above baseline
        assert row["accuracy"] < 0.4 and row["fd"] > 2 * result["baseline"]["fd_real_vs_real"]
    assert "FD/base" in capsys.readouterr().out
    assert kdiff(["eval", "--model", "no-such-model"]) == 1
    # a cell that cannot run is reported and skipped; the rest of the table still comes out
    model = ["eval", "--model", str(tmp_path / "m"), "--classifier", str(STORE), "--n", "20", "--nfe", "1"]
    assert kdiff([*model, "--samplers", "dpm_fast,euler", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["sampler"], r["nfe"]) for r in result["rows"]] == [("euler", 1)]
    assert [(r["sampler"], r["nfe"]) for r in result["skipped"]] == [("dpm_fast", 1)]
    assert "dpm_fast" in capsys.readouterr().out and "steps >= 2" in result["skipped"][0]["reason"]
    assert kdiff([*model, "--samplers", "euler,warp"]) == 1  # unknown names fail before sampling
    assert "unknown sampler 'warp'" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_model_meets_the_bar() -> None:
    from service.training.evaluate import run_eval

    result = run_eval(STORE, ["dpmpp_2m"], "karras", [20], 1000, log=lambda s: None)
    row = result["rows"][0]
    assert row["accuracy"] >= 0.95 and row["fd"] <= 2 * result["baseline"]["fd_real_vs_real"]
