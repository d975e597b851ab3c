"""Frechet distance against the scipy.linalg.sqrtm reference; LPIPS / FID plumbing without pretrained weights.

No pretrained weights exist on the test machines, so the tests check (a) that missing weights give
MetricUnavailable, never a number, and (b) the loading and data paths with randomly initialised state dicts
written to a temporary folder. Values from random networks are meaningless: those tests are plumbing only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from study.metrics import perceptual as pc


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """Point the default weights folder at an empty directory, so the tests never see real weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


def random_gaussian(d: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.normal(size=(d, 2 * d))
    return rng.normal(size=d), a @ a.T / (2 * d) + 1e-3 * np.eye(d)


def scipy_reference(mu1, s1, mu2, s2) -> float:
    """pytorch-fid's formula (Heusel et al.'s TTUR code) with scipy.linalg.sqrtm."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


@pytest.mark.parametrize("d", [1, 5, 40])
def test_frechet_distance_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    (mu1, s1), (mu2, s2) = random_gaussian(d, rng), random_gaussian(d, rng)
    ref = scipy_reference(mu1, s1, mu2, s2)
    assert pc.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    # Symmetric, and tensors work as well as arrays.
    t = [torch.from_numpy(a) for a in (mu2, s2, mu1, s1)]
    assert pc.frechet_distance(*t) == pytest.approx(ref, rel=1e-9, abs=1e-9)


def test_frechet_distance_identical_and_closed_form():
    rng = np.random.default_rng(0)
    mu, s = random_gaussian(30, rng)
    assert pc.frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9 * np.trace(s))
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = 4 * 6 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert pc.frechet_distance(np.zeros(6), np.diag(a), np.full(6, 2.0), np.diag(b)) == pytest.approx(expected)
    # Singular covariance (fewer samples than dimensions) stays finite and real.
    low_rank = np.outer(np.arange(5.0), np.arange(5.0))
    assert np.isfinite(pc.frechet_distance(np.zeros(5), low_rank, np.zeros(5), np.eye(5)))
    with pytest.raises(ValueError):
        pc.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_lpips_unavailable_without_weights(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    for where in (None, tmp_path / "nowhere" / pc.ALEXNET_WEIGHTS_FILE, tmp_path):
        out = pc.lpips_distance(x, x, alexnet_weights=where)
        assert isinstance(out, pc.MetricUnavailable), out
        assert out.name == "lpips"
        assert pc.ALEXNET_WEIGHTS_FILE in out.reason
    assert "hub" in pc.load_lpips().reason  # the default place is named: $TORCH_HOME/hub/checkpoints


def test_fid_unavailable_without_weights(tmp_path):
    x = torch.rand(4, 3, 16, 16)
    for where in (None, tmp_path / "missing.pth"):
        out = pc.fid(x, x, inception_weights=where)
        assert isinstance(out, pc.MetricUnavailable), out
        assert out.name == "fid" and pc.INCEPTION_WEIGHTS_FILE in out.reason


def test_lpips_loads_local_backbone_and_wheel_heads(tmp_path):
    """Plumbing only: a randomly initialised AlexNet trunk stands in for the ImageNet weights."""
    import lpips
    from torchvision.models import alexnet

    torch.manual_seed(0)
    features = {k: v for k, v in alexnet().state_dict().items() if k.startswith("features.")}  # trunk only
    torch.save(features, tmp_path / pc.ALEXNET_WEIGHTS_FILE)
    net = pc.load_lpips(tmp_path)  # a folder holding the standard file name
    assert isinstance(net, nn.Module) and not net.training
    state = net.state_dict()
    torch.testing.assert_close(state["net.slice1.0.weight"], features["features.0.weight"])
    torch.testing.assert_close(state["net.slice5.10.bias"], features["features.10.bias"])
    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/alex.pth", map_location="cpu", weights_only=True)
    for key, value in heads.items():
        torch.testing.assert_close(state[key], value)

    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 64, 64, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    same, diff = pc.lpips_distance(x, x, net), pc.lpips_distance(x, y, net, batch_size=2)
    assert same.shape == diff.shape == (3,)
    assert torch.allclose(same, torch.zeros(3), atol=1e-6) and torch.all(diff > 0)

    torch.save({"features.0.weight": features["features.0.weight"]}, tmp_path / "broken.pth")
    with pytest.raises(ValueError):
        pc.load_lpips(tmp_path / "broken.pth")


class TinyFeatures(nn.Module):
    """A fixed random conv net mapping [0, 1] images to 8-d features (plumbing only, not a perceptual metric)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_fid_plumbing_with_injected_extractor():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(96, 3, 16, 16, generator=g)
    extractor = TinyFeatures()
    same = pc.fid(real, real.clone(), extractor, batch_size=32)
    assert isinstance(same, pc.FIDResult)
    assert same.value == pytest.approx(0.0, abs=1e-9)
    assert "TinyFeatures" in same.implementation and same.num_real == same.num_fake == 96
    shifted = pc.fid(real, (real + 0.3).clamp(0, 1), extractor, implementation="tiny")
    assert shifted.value > 1e-3 and shifted.implementation == "tiny"
    # An iterable of batches (e.g. a data loader) gives the same statistics as one tensor.
    batched = pc.fid(list(real.split(40)), list(((real + 0.3).clamp(0, 1)).split(25)), extractor)
    assert batched.value == pytest.approx(shifted.value, rel=1e-9)


def test_feature_statistics_match_numpy():
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(1e3 + rng.normal(size=(123, 6)))  # a large common offset: tests the shift
    mu, sigma, n = pc.feature_statistics(feats, nn.Identity(), batch_size=50)
    assert n == 123
    np.testing.assert_allclose(mu.numpy(), feats.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats.numpy(), rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError):
        pc.feature_statistics(feats[:1], nn.Identity())


def test_inception_feature_extractor_plumbing(tmp_path):
    """Plumbing only: a random torchvision Inception-v3 state dict stands in for the Google weights."""
    from torchvision.models import inception_v3

    torch.save(
        inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(),
        tmp_path / pc.INCEPTION_WEIGHTS_FILE,
    )
    net = pc.load_inception_features(tmp_path / pc.INCEPTION_WEIGHTS_FILE)
    assert isinstance(net, pc.InceptionPoolFeatures)
    net.train()  # must stay in eval mode: batch-norm statistics are those of the pretrained network
    assert not net.training and not net.inception.training
    with torch.no_grad():
        feats = net(torch.rand(2, 1, 32, 32))  # grey, small: repeated to RGB and resized to 299
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    with pytest.raises(ValueError):
        torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
        pc.load_inception_features(tmp_path / "wrong.pth")
