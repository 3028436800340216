"""`edge-export train`: train an AE or VAE from a YAML config and write a model bundle."""

from __future__ import annotations

from pathlib import Path

import click

from edge_inspector.core.errors import ConfigError
from export.autoencoder.config import MODEL_KINDS
from export.staging import check_output_folder


@click.command("train")
@click.option("--model", "kind", type=click.Choice(MODEL_KINDS), required=True,
              help="ae: convolutional autoencoder; vae: its variational variant.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Training config YAML (see configs/train_ae.yaml).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Bundle folder to write (default: the config's `out`).")
@click.option("--threshold-folds", "threshold_folds", type=int, default=None,
              help="Score every good image out of sample with K fold models for the threshold, so a few hundred "
                   "images certify 0.5% (trains K+1 models); 0 or 1: score only the val_fraction hold-out. "
                   "Default: the config's threshold_folds (5).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--force", is_flag=True, help="Replace the bundle already in the output folder.")
def train_command(kind: str, config_path: Path, out_dir: Path | None, threshold_folds: int | None, resume: bool,
                  force: bool) -> None:
    """Train a reconstruction model on patches of good images and export it as a bundle."""
    from export.autoencoder.config import load_train_config
    from export.autoencoder.folds import resolve_folds
    from export.autoencoder.training import train_autoencoder  # torch import only when the command runs

    config = load_train_config(config_path)
    if threshold_folds is not None:
        resolve_folds(threshold_folds, None, "--threshold-folds")  # before the output folder is touched
    out_dir = out_dir or config.out
    if out_dir is None:
        raise ConfigError(f"{config_path}: out: no bundle folder given (set `out` in the config or pass --out)")
    check_output_folder(out_dir, force)
    bundle = train_autoencoder(config, kind, out_dir, resume=resume, threshold_folds=threshold_folds)
    params, info = bundle.meta.model_params, bundle.meta.threshold
    folds = bundle.meta.training.folds
    scores = f"{folds}-fold" if folds else "hold-out"
    rate = "" if info.target_false_reject_rate is None else f" for {info.target_false_reject_rate:g}"
    certified = ("certified" if info.certified else "NOT certified") + rate
    count = bundle.meta.score_stats.count if bundle.meta.score_stats else 0
    click.echo(f"wrote {bundle.path} ({bundle.model_id}): {bundle.meta.training.image_count} good images, "
               f"{params['epochs_run']} epochs (best {params['best_epoch']}), threshold "
               f"{bundle.threshold:.6g} [{info.rule}], {certified} from {count} "
               f"out-of-sample good scores ({scores})")
