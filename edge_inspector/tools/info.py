"""`edge-inspector info BUNDLE`: what a bundle is, before it goes on the line.

A line engineer holding two bundle folders needs to tell them apart and to know what the threshold rests on
without reading YAML: kind and backbone, input size and tiling, the threshold and whether the false-reject
rate it claims is certified, what it was trained on, which engines are built, and how big it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from edge_inspector.core.bundle import Bundle


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def describe(bundle: Bundle) -> dict[str, Any]:
    """The facts `info` prints, as plain data (also what `--json` writes)."""
    meta = bundle.meta
    t, tiling, training = meta.threshold, meta.tiling, meta.training
    files = {rel: _size(bundle.path / rel) for rel in sorted(meta.files)}
    return {
        "path": str(bundle.path.resolve()),
        "model_id": bundle.model_id,
        "model_kind": meta.model_kind,
        "backbone": meta.backbone,
        "layers": list(meta.layers),
        "feature_dim": meta.feature_dim,
        "input_size": list(bundle.input_size),
        "color_order": meta.color_order,
        "map_blur_sigma": meta.map_blur_sigma,
        "tiling": {"rows": tiling.rows, "cols": tiling.cols, "mode": tiling.mode, "tile_size": tiling.tile_size,
                   "stride": tiling.stride, "roi": tiling.roi},
        "threshold": {"value": t.value, "rule": t.rule, "target_false_reject_rate": t.target_false_reject_rate,
                      "certified": t.certified, "images_needed": t.images_needed,
                      "f1_optimal_value": t.f1_optimal_value, "note": t.note},
        "score_stats": None if meta.score_stats is None else vars(meta.score_stats),
        "training": vars(training),
        "engines": [rel for rel in files if rel.startswith("engines/")],
        "files": files,
        "total_bytes": sum(files.values()),
        "created": meta.created,
        "package_version": meta.package_version,
        "format_version": meta.format_version,
        "model_params": dict(meta.model_params),
        "report": str(report) if (report := bundle.path / "report" / "contact_sheet.png").is_file() else None,
    }


def _tiling_line(tiling: dict[str, Any]) -> str:
    if tiling["rows"] * tiling["cols"] == 1 and not tiling["roi"] and not tiling["tile_size"]:
        return "whole frame, resized to the input size"
    parts = [f"{tiling['rows']}x{tiling['cols']} tiles, {tiling['mode']} statistics"]
    for key in ("tile_size", "stride", "roi"):
        if tiling[key]:
            parts.append(f"{key} {','.join(str(v) for v in tiling[key])}")
    return "; ".join(parts)


def _threshold_line(t: dict[str, Any]) -> str:
    if t["rule"] == "conformal_false_reject_rate":
        rate = t["target_false_reject_rate"]
        status = ("certified" if t["certified"]
                  else f"NOT certified (needs >= {t['images_needed']} good training images)")
        line = f"{t['value']:.6g}, target false-reject rate {rate:g}: {status}"
    else:
        line = f"{t['value']:.6g} ({t['rule']})"
    if t["f1_optimal_value"] is not None:
        line += f"; F1-optimal on the validation folder {t['f1_optimal_value']:.6g}"
    return line


def format_info(facts: dict[str, Any]) -> str:
    """The human-readable summary, one fact per line."""
    training = facts["training"]
    stats = facts["score_stats"]
    lines = [
        f"bundle      {facts['path']}",
        f"model id    {facts['model_id']}",
        f"kind        {facts['model_kind']}" + (f", backbone {facts['backbone']}" if facts["backbone"] else "")
        + (f" ({', '.join(facts['layers'])}), d={facts['feature_dim']}" if facts["layers"] else ""),
        f"input       {facts['input_size'][0]}x{facts['input_size'][1]} {facts['color_order']} uint8"
        + (f"; map blurred with sigma {facts['map_blur_sigma']:g} px" if facts["map_blur_sigma"] else ""),
        f"tiling      {_tiling_line(facts['tiling'])}",
        f"threshold   {_threshold_line(facts['threshold'])}",
    ]
    if stats:
        lines.append(f"good scores out-of-sample: n={stats['count']}, median {stats['p50']:.4g}, "
                     f"p99 {stats['p99']:.4g}, max {stats['max']:.4g}")
    lines += [
        f"trained on  {training['image_count']} images from {training['folder']} "
        f"(file list sha256 {training['file_list_sha256'][:12]}..., {training['skipped_files']} unreadable skipped, "
        f"seed {training['seed']}, {training['folds']} folds, {training['fit_seconds']:.1f} s)",
        f"created     {facts['created']} by edge-inspector {facts['package_version']} "
        f"(bundle format {facts['format_version']})",
        "engines     " + (", ".join(facts["engines"]) if facts["engines"] else "none (ONNX Runtime, or built on "
                          "first start with backend tensorrt)"),
        f"size        {facts['total_bytes'] / 1e6:.1f} MB in {len(facts['files'])} files: "
        + ", ".join(f"{rel} {size / 1e6:.1f} MB" for rel, size in facts["files"].items()),
    ]
    if facts.get("report"):  # written by `edge-export fit` (export/report.py); not part of the checked files
        lines.append(f"report      {facts['report']} (training outliers and worst labelled cases with heatmaps)")
    return "\n".join(lines)


@click.command("info")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the files (faster for big bundles).")
def info_command(bundle_dir: Path, as_json: bool, no_verify: bool) -> None:
    """Print what the bundle in BUNDLE_DIR is: kind, input, tiling, threshold, provenance, engines, sizes."""
    facts = describe(Bundle.load(bundle_dir, verify=not no_verify))
    click.echo(json.dumps(facts, indent=2) if as_json else format_info(facts))
