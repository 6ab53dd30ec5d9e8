"""Domain FID, paired FID, PSNR and the shipped classifier/statistics (ditquant/evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ditquant.evaluation import (DomainFeatureExtractor, FashionMNISTClassifier, domain_fid, domain_fid_metric,
                                 inception_fid, load_classifier, paired_fid, psnr)
from ditquant.evaluation import metrics
from ditquant.models.bundled import CLASSIFIER_FILE, REFERENCE_STATS_FILE
from ditquant.models.bundled.fashion_mnist import DEFAULT_ROOT, load_fashion_mnist

needs_dataset = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                   reason=f"Fashion-MNIST not installed at {DEFAULT_ROOT}")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def test_split():
    return load_fashion_mnist("test")


def _blobs(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random shapes in [0, 1], (n, 1, 28, 28): images without any dataset."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    return F.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)


# --- shipped artifacts (must not skip: CI has no dataset) -------------------------------------------------------

def test_shipped_artifacts_are_small_and_consistent():
    for f in (CLASSIFIER_FILE, REFERENCE_STATS_FILE, CLASSIFIER_FILE.with_suffix(".json")):
        assert f.is_file(), f"{f} missing: run python -m ditquant.models.bundled.train_classifier"
        assert f.stat().st_size < 4 * 2**20
    info = json.loads(CLASSIFIER_FILE.with_suffix(".json").read_text())
    assert info["test_accuracy"] >= 0.90
    stats, metadata = metrics.load_reference_stats(REFERENCE_STATS_FILE)
    d = info["feature_dim"]
    assert stats["features_sum"].shape == (d,) and stats["features_cov_sum"].shape == (d, d)
    assert stats["features_sum"].dtype == stats["features_cov_sum"].dtype == torch.float64
    assert int(stats["features_num_samples"]) == 10_000
    assert metadata["classifier_sha256"] == metrics.file_sha256(CLASSIFIER_FILE)


def test_domain_fid_preloads_reference_and_reset_keeps_it():
    fid = domain_fid()
    assert int(fid.real_features_num_samples) == 10_000
    fid.update(_blobs(64), real=False)
    first = float(fid.compute())
    fid.reset()
    assert int(fid.real_features_num_samples) == 10_000 and int(fid.fake_features_num_samples) == 0
    fid.update(_blobs(64), real=False)
    assert float(fid.compute()) == pytest.approx(first, rel=1e-6)


def test_noise_is_far_from_reference():
    fid = domain_fid()
    fid.update(torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(0)), real=False)
    assert float(fid.compute()) > 50.0  # measured ≈ 130; 1,000 real test images give ≈ 0.4


def test_extractor_accepts_what_torchmetrics_may_feed():
    extractor = DomainFeatureExtractor()
    assert extractor.num_features == extractor.classifier.feature_dim  # so torchmetrics does not probe at 299x299
    x = _blobs(4)
    ref = extractor(x)
    assert ref.shape == (4, extractor.num_features)
    assert torch.allclose(extractor(x.repeat(1, 3, 1, 1)), ref, atol=1e-5)  # RGB → gray
    assert torch.allclose(extractor((x * 255).round().byte()), ref, atol=0.05 * ref.abs().max())  # uint8 in [0, 255]
    with pytest.raises(ValueError, match="28x28"):  # never resized: the reference statistics are of 28x28 images
        extractor(torch.rand(1, 3, 299, 299))
    extractor.train()
    assert not extractor.training and not extractor.classifier.training  # BatchNorm stays frozen inside Lightning


def test_paired_fid_zero_for_identical_sets_and_grows_with_distortion():
    a = _blobs(200, seed=1)
    same = paired_fid(a, a)
    assert abs(same) < 1e-3
    slightly = paired_fid(a, (a + 0.02 * torch.randn_like(a)).clamp(0, 1))
    heavily = paired_fid(a, (a + 0.3 * torch.randn_like(a)).clamp(0, 1))
    assert same < slightly < heavily


def test_psnr_per_image_mean():
    a = torch.zeros(2, 1, 4, 4)
    b = a.clone()
    b[0] += 0.2  # MSE 0.04 → 10·log10(4 / 0.04) = 20 dB
    b[1] += 0.02  # MSE 0.0004 → 40 dB
    assert float(psnr(a, b)) == pytest.approx(30.0, abs=1e-4)  # the mean of per-image PSNRs, not PSNR of the mean MSE
    with pytest.raises(ValueError, match="equal shape"):
        psnr(a, b[:1])


def test_missing_classifier_file_teaches(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="train_classifier"):
        load_classifier(tmp_path / "nope.safetensors")


def test_stats_from_another_classifier_are_refused(tmp_path: Path):
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file
    save_file(FashionMNISTClassifier().state_dict(), str(other))
    with pytest.raises(ValueError, match="different classifier"):
        domain_fid(classifier_path=other)
    with pytest.raises(ValueError, match="unknown reference"):
        domain_fid("imagenet")


def test_inception_fid_without_extra_raises_clear_import_error(monkeypatch):
    monkeypatch.setattr(metrics, "_TORCH_FIDELITY_AVAILABLE", False)
    with pytest.raises(ImportError, match=r"ditquant\[inception\]"):
        inception_fid()


def test_domain_fid_metric_fresh_and_feature_size():
    fid = domain_fid_metric()
    assert int(fid.real_features_num_samples) == 0
    assert fid.real_features_sum.shape == (DomainFeatureExtractor().num_features,)


# --- with the dataset (skip cleanly on CI) ----------------------------------------------------------------------

@needs_dataset
def test_classifier_accuracy_on_test_set(test_split):
    images, labels = test_split
    model = load_classifier()
    with torch.no_grad():
        pred = torch.cat([model(x).argmax(-1) for x in images.split(1000)])
    assert (pred == labels).float().mean().item() >= 0.90


@needs_dataset
def test_reference_stats_match_a_fresh_pass_over_the_test_set(test_split):
    images, _ = test_split
    fid = domain_fid_metric()
    for x in images.split(1000):
        fid.update((x + 1) / 2, real=True)
    shipped = domain_fid()
    assert int(fid.real_features_num_samples) == int(shipped.real_features_num_samples)
    assert torch.allclose(fid.real_features_sum, shipped.real_features_sum, rtol=1e-5)
    assert torch.allclose(fid.real_features_cov_sum, shipped.real_features_cov_sum, rtol=1e-5, atol=1e-3)


@needs_dataset
def test_fid_is_small_for_real_images_and_grows_with_degradation(test_split):
    images, _ = test_split
    subset = (images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:1000]] + 1) / 2
    blurred = F.avg_pool2d(subset, 5, stride=1, padding=2, count_include_pad=False)
    values = {}
    for name, x in (("test subset", subset), ("blurred", blurred), ("noise", torch.rand_like(subset))):
        fid = domain_fid()
        fid.update(x, real=False)
        values[name] = float(fid.compute())
    # Measured: test subset ≈ 0.4, 5x5 box blur ≈ 42, uniform noise ≈ 130.
    assert values["test subset"] < 2.0
    assert values["test subset"] * 20 < values["blurred"] < values["noise"]


@needs_dataset
def test_train_subset_close_to_test_reference():
    images, _ = load_fashion_mnist("train")
    x = (images[:1000] + 1) / 2
    fid = domain_fid()
    fid.update(x, real=False)
    assert float(fid.compute()) < 2.0  # measured ≈ 0.56: train and test images share one distribution
