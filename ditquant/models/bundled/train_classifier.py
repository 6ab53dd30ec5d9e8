"""Train the Fashion-MNIST feature classifier and write the FID reference statistics of the test set.

``python -m ditquant.models.bundled.train_classifier`` writes, atomically, next to this file:
``classifier_fmnist.safetensors`` (weights), ``classifier_fmnist.json`` (test accuracy, recipe, time) and
``fmnist_test_features.safetensors`` (the real-feature states of torchmetrics' FID over the 10,000 test images,
so ``ditquant.evaluation.domain_fid()`` works without the dataset). A few minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ditquant.models.bundled.features import FashionMNISTClassifier
from ditquant.evaluation.metrics import domain_fid_metric, file_sha256
from ditquant.io import atomic_write
from ditquant.models.bundled import CLASSIFIER_FILE, REFERENCE_STATS_FILE
from ditquant.models.bundled.fashion_mnist import load_fashion_mnist


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and shifts of up to ``max_shift`` pixels, per image; x (N, 1, 28, 28) in [-1, 1]."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # background is black (-1)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)  # (N, 1, H, W)


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(x).argmax(-1) == y).sum().item()
                  for x, y in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / len(labels)


def train(epochs: int, batch_size: int, lr: float, weight_decay: float, width: int, seed: int, max_shift: int,
          label_smoothing: float, dropout: float, watch: tuple[torch.Tensor, torch.Tensor] | None = None
          ) -> FashionMNISTClassifier:
    """AdamW with warm-up and cosine decay; ``watch`` is an (images, labels) pair whose accuracy is logged per epoch."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_fashion_mnist("train")
    model = FashionMNISTClassifier(width=width, dropout=dropout).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = len(images) // batch_size
    total, warmup = epochs * steps_per_epoch, steps_per_epoch // 4
    # Linear warm-up then cosine decay to zero: reaches its accuracy in few epochs.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(images), generator=generator)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(model(augment(images[idx], generator, max_shift)), labels[idx],
                                   label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
        watched = f", test accuracy {accuracy(model, *watch):.4f}" if watch is not None else ""
        print(f"epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.4f}{watched}", flush=True)
    return model.eval()


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_write(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # safetensors creates files owner-only; these ship in the wheel


def atomic_write_text(text: str, path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


@torch.no_grad()
def reference_stats(classifier_file: Path, images: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """Real-feature states of torchmetrics' FID over ``images`` in [-1, 1], computed by the metric itself."""
    fid = domain_fid_metric(classifier_file)
    for x in images.split(batch_size):
        fid.update((x + 1.0) / 2.0, real=True)  # the metric is fed [0, 1], as samples will be
    return {"features_sum": fid.real_features_sum, "features_cov_sum": fid.real_features_cov_sum,
            "features_num_samples": fid.real_features_num_samples.reshape(1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--width", type=int, default=16, help="channels of the first conv stage (doubled per stage)")
    p.add_argument("--max-shift", type=int, default=1, help="random translation of the augmentation, in pixels")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classifier-out", type=Path, default=CLASSIFIER_FILE)
    p.add_argument("--stats-out", type=Path, default=REFERENCE_STATS_FILE)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    test_images, test_labels = load_fashion_mnist("test")
    start = time.time()
    model = train(args.epochs, args.batch_size, args.lr, args.weight_decay, args.width, args.seed, args.max_shift,
                  args.label_smoothing, args.dropout, watch=(test_images, test_labels))
    train_seconds = time.time() - start  # includes the per-epoch evaluation (~2 s each)
    test_accuracy = accuracy(model, test_images, test_labels)
    print(f"test accuracy {test_accuracy:.4f} after {train_seconds:.0f}s", flush=True)

    atomic_save_file(model.state_dict(), args.classifier_out)
    stats = reference_stats(args.classifier_out, test_images)
    # The hash ties the statistics to these weights: domain_fid() refuses a mismatched pair.
    atomic_save_file(stats, args.stats_out, metadata={"dataset": "fashion-mnist", "split": "test",
                                                      "classifier_sha256": file_sha256(args.classifier_out)})
    info = {"test_accuracy": round(test_accuracy, 4), "epochs": args.epochs, "seed": args.seed,
            "feature_dim": model.feature_dim, "width": args.width, "batch_size": args.batch_size, "lr": args.lr,
            "weight_decay": args.weight_decay, "max_shift": args.max_shift,
            "label_smoothing": args.label_smoothing, "dropout": args.dropout, "train_seconds": round(train_seconds, 1),
            "torch": torch.__version__}
    atomic_write_text(json.dumps(info, indent=2) + "\n", args.classifier_out.with_suffix(".json"))
    print(f"wrote {args.classifier_out}, {args.stats_out}", flush=True)


if __name__ == "__main__":
    main()
