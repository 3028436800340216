"""`edge-inspector info BUNDLE`: what a bundle is, before it goes on the line.

A line engineer holding two bundle folders needs to tell them apart and to know what the threshold rests on
without reading YAML: kind and backbone, input size and tiling, the threshold and whether the false-reject
rate it claims is certified (only the conformal rule certifies one; a threshold chosen on labelled images shows its
in-sample rates and says so), what it was trained on, which engines are built, and how big it is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from edge_inspector.core.bundle import Bundle, ThresholdInfo


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
        "threshold": threshold_facts(t),
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


CONFORMAL_RULE = "conformal_false_reject_rate"


def threshold_facts(t: ThresholdInfo) -> dict[str, Any]:
    """The threshold as `info` reports it. `certified` is true only for a certified conformal threshold: a
    bundle written before that rule was enforced may say `certified: true` beside an escape-rate threshold
    (fryum, 2026-12: it rejected 3 of 26 good parts), and `info` must not repeat that claim."""
    return {"value": t.value, "rule": t.rule, "target_false_reject_rate": t.target_false_reject_rate,
            "certified": t.guarantees_false_reject_rate, "images_needed": t.images_needed,
            "conformal_value": t.conformal_value, "f1_optimal_value": t.f1_optimal_value,
            "target_escape_rate": t.target_escape_rate,
            "validation": None if t.validation_false_reject_rate is None else {
                "false_reject_rate": t.validation_false_reject_rate, "false_rejects": t.validation_false_rejects,
                "good": t.validation_good_count, "escape_rate": t.validation_escape_rate,
                "escapes": t.validation_escapes, "defects": t.validation_defect_count,
                "in_sample": bool(t.in_sample or t.rule != CONFORMAL_RULE)},
            "review": None if t.review is None else dataclasses.asdict(t.review),
            "note": t.note}


def _rate(rate: float | None, part: int | None, whole: int | None) -> str:
    shown = "?" if rate is None else f"{100 * rate:.1f}%"
    return f"{part} of {whole} ({shown})" if part is not None and whole is not None else shown


def _threshold_line(t: dict[str, Any]) -> str:
    """One line that never claims more than the rule gives: a false-reject guarantee only for the conformal
    rule, and the rates of a threshold chosen on labelled images called in-sample."""
    if t["rule"] == CONFORMAL_RULE:
        rate = t["target_false_reject_rate"]
        status = ("certified" if t["certified"]
                  else f"NOT certified (needs >= {t['images_needed']} good training images)")
        line = f"{t['value']:.6g}, target false-reject rate {rate:g}: {status}"
    else:
        target = f", target escape rate {t['target_escape_rate']:g}" if t["target_escape_rate"] is not None else ""
        line = f"{t['value']:.6g} ({t['rule']}{target}): no false-reject rate is guaranteed"
        if t["rule"] in ("f1_optimal", "escape_rate"):
            line += " (chosen on labelled images)"
        if t["conformal_value"] is not None:
            line += f"; the conformal threshold {t['conformal_value']:.6g} is not used"
    v = t["validation"]
    if v is not None:
        basis = ("in-sample, on the images it was chosen on" if v["in_sample"]
                 else "on labelled images not used to choose it")
        line += (f"\n            {basis}: rejects {_rate(v['false_reject_rate'], v['false_rejects'], v['good'])} "
                 f"good, passes {_rate(v['escape_rate'], v['escapes'], v['defects'])} defects")
        if v["in_sample"]:
            line += "; new parts will do worse"
    if t["f1_optimal_value"] is not None:
        line += f"; F1-optimal on the validation folder {t['f1_optimal_value']:.6g}"
    return line


def _review_line(r: dict[str, Any]) -> str:
    line = (f"pass at or under {r['value']:.6g}, review up to the threshold: at most {r['target_rate']:g} of good "
            f"parts to review ({'split-conformal bound' if r['guaranteed'] else 'NOT guaranteed'}, "
            f"{r['good_count']} out-of-sample good scores); cross-validated {r['cross_validated_in_band']} of "
            f"{r['good_count']} ({100 * r['cross_validated_rate']:.1f}%)")
    if r["labelled_defect_count"] is not None:
        line += (f"; labelled: {r['defects_auto_passed']} of {r['labelled_defect_count']} defects auto-passed, "
                 f"{r['defects_in_band']} to review")
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
    review = facts["threshold"]["review"]
    lines.append("review band " + ("none (verdicts pass / fail)" if review is None else _review_line(review)))
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
