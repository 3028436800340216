"""Autoencoder figures: bundle latency (ONNX Runtime, 2 threads), training time per epoch, accuracy on MVTec.

    python benchmarks/ae_bench.py speed [--bundle AE_BUNDLE] [--padim PADIM_BUNDLE] [--size 256] [--ssim-weight 0]
    python benchmarks/ae_bench.py accuracy [--category ../shared/data/mvtec/bottle] [--kind ae --kind vae]
                                          [--size 256] [--epochs 20] [--ssim-weight 0] [--depth 5]
                                          [--threshold-folds 5]

`speed` times an AE bundle at batch 1 and 8 (a freshly trained one-epoch bundle on generated textures when
--bundle is not given: latency does not depend on the weights) beside a PaDiM bundle when one is given, and
times training epochs on CPU. `accuracy` trains on <category>/train/good and reports image and pixel AUROC
on <category>/test through the exported bundle and the ONNX Runtime backend with replay's own code, so the
figures are what `edge-inspector replay` prints (plus AUPRO and the rates at the bundle's threshold).
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_inspector.backends import create_backend  # noqa: E402
from edge_inspector.core.bundle import Bundle  # noqa: E402

DEFAULT_CATEGORY = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec" / "bottle"


def time_bundle(bundle: Bundle, batch: int, threads: int, runs: int) -> tuple[float, float]:
    """(median, minimum) milliseconds per call of a uint8 batch through the ONNX Runtime backend.

    The minimum is the figure least disturbed by other work on a shared machine; the median is what a
    loaded machine delivers. Both are printed.
    """
    backend = create_backend(bundle, "onnxruntime", threads=threads)
    h, w = bundle.input_size
    images = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    for _ in range(3):
        backend.infer(images)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.infer(images)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times), min(times)


def quick_ae_bundle(work: Path, size: int, ssim_weight: float, epochs: int = 1) -> Bundle:
    from export.autoencoder.config import config_from_dict
    from export.autoencoder.training import train_autoencoder
    from export.textures import write_texture_dataset

    category = write_texture_dataset(work, "fabric", train=20, test_good=0, test_per_defect=0, size=size)
    config = config_from_dict(dict(train_folder=str(category / "train" / "good"), input_size=size, epochs=epochs,
                                   ssim_weight=ssim_weight, device="cpu", threshold_folds=0), "bench")
    return train_autoencoder(config, "ae", work / "ae_bundle")  # latency only: one model, hold-out threshold


def epoch_seconds(size: int, images: int, batch_size: int, kind: str, ssim_weight: float, epochs: int = 2) -> float:
    """Seconds per training epoch on CPU for `images` patches of size x size (median over epochs)."""
    import torch

    from export.autoencoder.config import config_from_dict
    from export.autoencoder.model import ConvAutoencoder
    from export.autoencoder.training import Trainer, architecture
    from export.textures import make_texture

    rng = np.random.default_rng(0)
    patches = torch.from_numpy(np.stack([make_texture(rng, size, "grain")[0] for _ in range(images)]))
    config = config_from_dict(dict(train_folder="unused", input_size=size, batch_size=batch_size,
                                   ssim_weight=ssim_weight, device="cpu"), "bench")
    torch.manual_seed(0)
    trainer = Trainer(ConvAutoencoder(architecture(config, kind)), config, torch.device("cpu"))
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        trainer.train_epoch(patches, epoch)
        trainer.validation_error(patches[: max(2, images // 5)])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> None:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        bundle = Bundle.load(args.bundle) if args.bundle else quick_ae_bundle(Path(tmp), args.size, args.ssim_weight)
        rows = [("ae", bundle)]
        if args.padim:
            rows.append(("padim", Bundle.load(args.padim)))
        print(f"ONNX Runtime CPU, {args.threads} threads; median / min of {args.runs} runs (batch 8: "
              f"{max(5, args.runs // 4)} runs)")
        print(f"{'bundle':<8} {'input':>9} {'batch 1 ms':>15} {'batch 8 ms':>17} {'ms/image @8':>12}")
        results = {}
        for name, item in rows:
            one = time_bundle(item, 1, args.threads, args.runs)
            eight = time_bundle(item, 8, args.threads, max(5, args.runs // 4))
            results[name] = (one, eight)
            h, w = item.input_size
            print(f"{name:<8} {f'{h}x{w}':>9} {one[0]:>7.2f} / {one[1]:<6.2f} {eight[0]:>8.2f} / {eight[1]:<7.2f}"
                  f" {eight[0] / 8:>12.2f}")
        if "padim" in results:
            (p1, p8), (a1, a8) = results["padim"], results["ae"]
            print(f"padim / ae latency (median, min): batch 1 {p1[0] / a1[0]:.1f}x, {p1[1] / a1[1]:.1f}x; "
                  f"batch 8 {p8[0] / a8[0]:.1f}x, {p8[1] / a8[1]:.1f}x")
    torch.set_num_threads(args.threads)
    for kind in ("ae", "vae"):
        seconds = epoch_seconds(args.size, args.epoch_images, 16, kind, args.ssim_weight)
        print(f"training {kind} (ssim_weight {args.ssim_weight:g}) on CPU ({torch.get_num_threads()} threads): "
              f"{seconds:.2f} s/epoch for "
              f"{args.epoch_images} patches {args.size}x{args.size}, batch 16 "
              f"({seconds / args.epoch_images * 1000:.1f} ms/patch)")


def accuracy(args: argparse.Namespace) -> None:
    """Train on train/good, then replay the test folder exactly as `edge-inspector replay` would."""
    from edge_inspector.tools.replay import replay_folder
    from export.autoencoder.config import config_from_dict
    from export.autoencoder.training import train_autoencoder

    category = Path(args.category)
    if not (category / "train" / "good").is_dir():
        sys.exit(f"error: {category}: not an MVTec AD category (no train/good)")
    print(f"{category.name}: MVTec AD test set, replayed through the bundle with ONNX Runtime (2 threads)")
    print(f"{'model':<5} {'input':>5} {'ssim':>5} {'epochs':>9} {'train s':>8} {'s/epoch':>8} {'img AUROC':>10} "
          f"{'px AUROC':>9} {'AUPRO':>7} {'false rej':>10} {'escape':>7} {'folds':>5} {'certified':>9}")
    for kind in args.kind or ["ae"]:
        config = config_from_dict(dict(train_folder=str(category / "train" / "good"), input_size=args.size,
                                       epochs=args.epochs, patience=args.patience, seed=args.seed, device="cpu",
                                       ssim_weight=args.ssim_weight, error_normalisation=args.normalisation,
                                       depth=args.depth, threshold_folds=args.threshold_folds), "bench")
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            bundle = train_autoencoder(config, kind, Path(tmp) / kind)
            seconds = time.perf_counter() - start
            report = replay_folder(category, bundle, create_backend(bundle, "onnxruntime", threads=2)).report
        params = bundle.meta.model_params
        epochs = f"{params['epochs_run']} (b{params['best_epoch']})"
        print(f"{kind:<5} {args.size:>5} {args.ssim_weight:>5g} {epochs:>9} {seconds:>8.0f} "
              f"{params['epoch_seconds']:>8.1f} {report.image_auroc:>10.3f} {report.pixel_auroc:>9.3f} "
              f"{report.aupro:>7.3f} {report.confusion.false_reject_rate:>10.1%} {report.confusion.escape_rate:>7.1%}"
              f" {bundle.meta.training.folds:>5} {str(bundle.meta.threshold.certified):>9}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p_speed = sub.add_parser("speed")
    p_speed.add_argument("--bundle", type=Path, help="AE bundle to time (default: a quick one at --size)")
    p_speed.add_argument("--padim", type=Path, help="PaDiM bundle to compare with")
    p_speed.add_argument("--size", type=int, default=256)
    p_speed.add_argument("--ssim-weight", type=float, default=0.0, help="SSIM term in the quick AE's graph")
    p_speed.add_argument("--threads", type=int, default=2)
    p_speed.add_argument("--runs", type=int, default=40)
    p_speed.add_argument("--epoch-images", type=int, default=64)
    p_acc = sub.add_parser("accuracy")
    p_acc.add_argument("--category", type=Path, default=DEFAULT_CATEGORY)
    p_acc.add_argument("--kind", action="append", choices=["ae", "vae"])
    p_acc.add_argument("--size", type=int, default=256)
    p_acc.add_argument("--epochs", type=int, default=20)
    p_acc.add_argument("--patience", type=int, default=10)
    p_acc.add_argument("--seed", type=int, default=0)
    p_acc.add_argument("--ssim-weight", type=float, default=0.0)
    p_acc.add_argument("--normalisation", default="zscore", choices=["zscore", "none"])
    p_acc.add_argument("--depth", type=int, default=5)
    p_acc.add_argument("--threshold-folds", type=int, default=5, help="0: hold-out threshold (train s: K+1 models)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    speed(args) if args.mode == "speed" else accuracy(args)


if __name__ == "__main__":
    main()
