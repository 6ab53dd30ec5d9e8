"""Sample-quality metrics: domain FID on Fashion-MNIST (bundled classifier features), paired FID, PSNR, Inception FID."""

from ditquant.models.bundled.features import DomainFeatureExtractor, FashionMNISTClassifier, load_classifier
from ditquant.evaluation.metrics import domain_fid, domain_fid_metric, inception_fid, paired_fid, psnr

__all__ = ["DomainFeatureExtractor", "FashionMNISTClassifier", "load_classifier", "domain_fid", "domain_fid_metric",
           "inception_fid", "paired_fid", "psnr"]
