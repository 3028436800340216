"""The operating point: escape rate at the threshold, the trade-off table, threshold by target escape rate."""

from __future__ import annotations

import shutil

import click
import numpy as np
import pytest
from click.testing import CliRunner

from edge_inspector.core.bundle import Bundle
from export.threshold import (
    best_for_escape,
    format_tradeoff,
    highest_threshold_for_escape,
    operating_point,
    threshold_for_escape,
    threshold_for_false_reject,
    tradeoff_table,
)

GOOD = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
DEFECTS = np.array([5.5, 8.5, 9.5, 11.0, 12.0, 13.0, 14.0, 15.0])


def test_operating_point_counts_fails_above_the_threshold():
    point = operating_point(GOOD, DEFECTS, 9.0)
    assert point.false_reject_rate == pytest.approx(0.1)  # only 10 > 9
    assert point.escape_rate == pytest.approx(2 / 8)  # 5.5 and 8.5 pass


def test_threshold_for_false_reject_rate():
    assert threshold_for_false_reject(GOOD, 0.0) == 10.0
    assert threshold_for_false_reject(GOOD, 0.1) == 9.0  # one good part of ten may be rejected
    assert threshold_for_false_reject(GOOD, 0.05) == 10.0  # half a part rounds down to none


def test_highest_threshold_for_target_escape_keeps_to_it_and_is_the_highest_that_does():
    for rate in (0.0, 0.125, 0.3, 0.5):
        t = highest_threshold_for_escape(DEFECTS, rate)
        assert threshold_for_escape(DEFECTS, rate) == t  # without good scores: the highest one
        assert operating_point(GOOD, DEFECTS, t).escape_rate <= rate + 1e-12
        above = np.nextafter(t, np.inf)
        assert operating_point(GOOD, DEFECTS, above).escape_rate > rate  # one step higher breaks it


def test_escape_rule_takes_fewer_escapes_at_the_same_false_rejects():
    """The fryum case in miniature: the highest threshold meeting 20% escapes passes a defect that a lower one
    at the same false-reject count fails."""
    good = np.array([1.0, 2.0, 3.0, 4.0, 8.2, 9.0])
    defects = np.array([8.3, 8.4, 9.5, 10.0, 11.0])  # 20% of 5: one may pass; the highest limit is just under 8.4
    highest = operating_point(good, defects, highest_threshold_for_escape(defects, 0.2))
    best = best_for_escape(good, defects, 0.2)
    assert (highest.false_rejects, highest.escapes) == (1, 1)  # 9.0 rejected, 8.3 passes
    assert (best.false_rejects, best.escapes) == (1, 0)  # the same false reject, no escape
    assert 8.2 < best.threshold < 8.3  # midway in the gap above the good score 8.2
    assert threshold_for_escape(defects, 0.2, good) == best.threshold
    assert (best.good_count, best.defect_count) == (6, 5)


def test_escape_rule_is_the_best_trade_among_every_threshold_meeting_the_target():
    """Brute force: over every threshold that keeps to the target, none has fewer false rejects, and none
    with as few has fewer escapes."""
    rng = np.random.default_rng(11)
    for trial in range(40):
        good = np.round(rng.normal(5.0, 1.0, 30), 1)  # ties on purpose
        defects = np.round(rng.normal(6.0, 1.5, 25), 1)
        rate = float(rng.choice([0.0, 0.05, 0.1, 0.2, 0.4]))
        best = best_for_escape(good, defects, rate)
        assert best.escape_rate <= rate + 1e-12 and best.threshold > 0
        values = np.unique(np.concatenate([good, defects]))
        candidates = np.concatenate([values, (values[:-1] + values[1:]) / 2, values - 1e-6])
        feasible = [operating_point(good, defects, t) for t in candidates if t > 0]
        feasible = [p for p in feasible if p.escape_rate <= rate + 1e-12]
        fewest = min(p.false_rejects for p in feasible)
        assert best.false_rejects == fewest, trial
        assert best.escapes == min(p.escapes for p in feasible if p.false_rejects == fewest), trial


def test_escape_rule_with_every_good_part_above_the_limit_passes_the_fewest_defects():
    best = best_for_escape(np.array([20.0, 21.0]), np.array([5.0, 6.0, 7.0, 8.0]), 0.25)
    assert (best.false_rejects, best.escapes) == (2, 0) and best.threshold < 5.0


def test_tradeoff_table_runs_from_no_false_rejects_to_more_and_escapes_fall():
    table = tradeoff_table(GOOD, DEFECTS, (0.0, 0.1, 0.2, 0.5))
    assert [p.false_reject_rate for p in table] == pytest.approx([0.0, 0.1, 0.2, 0.5])
    escapes = [p.escape_rate for p in table]
    assert escapes == sorted(escapes, reverse=True) and escapes[0] == pytest.approx(3 / 8)


def test_tradeoff_printout_shows_each_threshold_once():
    """Targets that land on one threshold (few good images) print one row, not a run of identical ones."""
    good = np.array([1.0, 2.0, 3.0])  # 0, 0.5, 1 and 2% of three images all allow no rejection
    table = tradeoff_table(good, DEFECTS, (0.0, 0.005, 0.01, 0.02, 0.5))
    chosen = operating_point(good, DEFECTS, 3.0)
    rows = format_tradeoff(table, chosen).splitlines()[1:]
    assert len(rows) == 2 and rows[0].endswith("<- bundle threshold")
    assert float(rows[1].split()[0]) == pytest.approx(2.0)


def test_fit_validation_records_escape_rate_and_curve_and_target_escape_rule(small_padim_bundle, synthetic_dataset,
                                                                           tmp_path):
    """Through the real CLI: the loud line when most defects pass, then the escape rule keeps to its target."""
    from export.validation import calibrate_with_defects

    bundle_dir = tmp_path / "b"
    shutil.copytree(small_padim_bundle.path, bundle_dir)
    bundle = Bundle.load(bundle_dir)
    bundle.meta.threshold.value = 1e9  # a threshold nothing reaches: every defect passes
    from edge_inspector.core.bundle import write_meta

    write_meta(bundle_dir, bundle.meta)
    result = CliRunner().invoke(_calibrate_cli, [str(bundle_dir), str(synthetic_dataset)])
    assert result.exit_code == 0, result.output
    assert "100% of the validation defects PASS" in result.output  # stderr is part of output by default
    t = Bundle.load(bundle_dir).meta.threshold
    assert t.validation_escape_rate == 1.0 and t.validation_false_reject_rate == 0.0
    assert len(t.operating_curve) >= 3 and t.operating_curve[0]["false_reject_rate"] == 0.0

    calibrated = calibrate_with_defects(Bundle.load(bundle_dir), synthetic_dataset, target_escape=0.25)
    t = calibrated.meta.threshold
    assert t.rule == "escape_rate" and t.target_escape_rate == 0.25
    assert t.validation_escape_rate <= 0.25
    assert not t.certified and t.in_sample and "P(false reject)" not in t.note and "in-sample" in t.note
    assert t.validation_escapes == round(t.validation_escape_rate * t.validation_defect_count)
    assert t.validation_false_rejects == round(t.validation_false_reject_rate * t.validation_good_count)


@click.command()
@click.argument("bundle_dir")
@click.argument("folder")
def _calibrate_cli(bundle_dir: str, folder: str) -> None:
    from pathlib import Path

    from export.validation import calibrate_with_defects

    calibrate_with_defects(Bundle.load(bundle_dir), Path(folder))


def test_fit_cli_threshold_by_target_escape(synthetic_dataset, tmp_path):
    from export.cli import main

    out = tmp_path / "escape"
    args = ["fit", str(synthetic_dataset / "train" / "good"), "--out", str(out), "--model", "padim",
            "--input-size", "64", "--feature-dim", "20", "--folds", "2", "--target-frr", "0.1",
            "--validation", str(synthetic_dataset)]
    result = CliRunner().invoke(main, [*args, "--threshold-rule", "escape"])
    assert result.exit_code == 2 and "--target-escape" in result.output
    result = CliRunner().invoke(main, [*args, "--threshold-rule", "escape", "--target-escape", "0.1"])
    assert result.exit_code == 0, result.output
    assert "false reject" in result.output and "<- bundle threshold" in result.output
    t = Bundle.load(out).meta.threshold
    assert t.rule == "escape_rate" and t.validation_escape_rate <= 0.1


def test_patchcore_options_are_refused_for_padim(synthetic_dataset, tmp_path):
    from export.cli import main

    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset / "train" / "good"), "--out",
                                       str(tmp_path / "x"), "--model", "padim", "--bank-size", "10"])
    assert result.exit_code == 2 and "--bank-size is a patchcore option" in result.output


def test_padim_options_are_refused_for_patchcore(synthetic_dataset, tmp_path):
    """The default kind is patchcore: a PaDiM flag must not be silently ignored."""
    from export.cli import main

    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset / "train" / "good"), "--out",
                                       str(tmp_path / "x"), "--feature-dim", "20"])
    assert result.exit_code == 2 and "--feature-dim is a PaDiM option" in result.output


def test_replay_report_prints_the_tradeoff_and_calls_out_a_threshold_that_lets_most_defects_pass():
    """The device's replay shows the same trade-off as `fit --validation`, from the one shared definition."""
    from edge_inspector.tools.metrics import evaluate

    good = np.linspace(1.0, 2.0, 100)
    defects = np.linspace(1.5, 3.0, 40)
    scores = np.concatenate([good, defects])
    labels = np.concatenate([np.zeros(100, bool), np.ones(40, bool)])
    report = evaluate(scores, labels, threshold=2.5)
    assert [round(p.false_reject_rate, 3) for p in report.tradeoff] == [0.0, 0.0, 0.01, 0.02, 0.05, 0.1, 0.2]
    assert report.tradeoff[0].escape_rate == pytest.approx(np.mean(defects <= 2.0))
    text = report.format_table()
    assert "trade-off on these images" in text and "<- bundle threshold" in text
    escaped = 100 * np.mean(defects <= 2.5)
    assert f"WARNING: the bundle threshold lets {escaped:.1f}% of these defective parts pass" in text
    assert report.to_dict()["tradeoff"][2]["false_reject_rate"] == pytest.approx(0.01)
    calm = evaluate(scores, labels, threshold=1.9).format_table()
    assert "WARNING" not in calm


GUARANTEE_WORDS = ("certified", "P(false reject)", "guarantee")


def _info_text(bundle_dir) -> tuple[str, dict]:
    import json

    from edge_inspector.cli import main as inspector

    text = CliRunner().invoke(inspector, ["info", "--no-verify", str(bundle_dir)])
    facts = CliRunner().invoke(inspector, ["info", "--json", "--no-verify", str(bundle_dir)])
    assert text.exit_code == 0 and facts.exit_code == 0, text.output + facts.output
    return text.output, json.loads(facts.output)


@pytest.mark.parametrize("rule", ["frr", "f1", "escape"])
def test_each_rule_fits_a_bundle_whose_info_claims_only_what_the_rule_gives(rule, synthetic_dataset, tmp_path):
    """Through the real `fit` and `info` CLIs: only the conformal rule's bundle says `certified` and states a
    false-reject bound; f1/escape bundles say no rate is guaranteed and call their rates in-sample, with counts."""
    from export.cli import main

    out = tmp_path / rule
    extra = {"frr": [], "f1": ["--threshold-rule", "f1"], "escape": ["--threshold-rule", "escape",
                                                                     "--target-escape", "0.2"]}[rule]
    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset / "train" / "good"), "--out", str(out),
                                       "--model", "padim", "--input-size", "64", "--feature-dim", "20",
                                       "--folds", "2", "--target-frr", "0.1", "--validation",
                                       str(synthetic_dataset), *extra])
    assert result.exit_code == 0, result.output
    t = Bundle.load(out).meta.threshold
    text, facts = _info_text(out)
    threshold_text = text[text.index("threshold   "):text.index("good scores")]
    summary = next(line for line in result.output.splitlines() if line.startswith("threshold "))
    v = facts["threshold"]["validation"]
    assert v["good"] == 6 and v["defects"] == 12  # the synthetic test half: 6 good, 3 defect types x 4
    if rule == "frr":
        assert t.certified and not t.in_sample and facts["threshold"]["certified"]
        assert "certified" in threshold_text and "P(false reject) <= 0.1" in t.note and "P(false reject)" in summary
        assert "not used to choose it" in threshold_text and not v["in_sample"]
    else:
        assert not t.certified and t.in_sample and not facts["threshold"]["certified"] and v["in_sample"]
        for words in (threshold_text, t.note, summary):
            assert "P(false reject)" not in words and " certified" not in words.replace("not certified", "")
        assert "no false-reject rate is guaranteed" in threshold_text and "in-sample" in threshold_text
        assert "NO false-reject rate is guaranteed" in summary and "in-sample" in summary
        assert f"{t.validation_false_rejects} of 6" in threshold_text and f"{t.validation_escapes} of 12" in text
        assert "in-sample: the threshold was chosen on these images" in result.output
    if rule == "escape":
        assert t.validation_escape_rate <= 0.2


def test_info_never_repeats_the_certified_flag_of_an_old_escape_rule_bundle(small_padim_bundle, tmp_path):
    """A bundle written before this fix says `certified: true` beside an escape-rate threshold: `info` judges by
    the rule, not the flag."""
    from edge_inspector.core.bundle import write_meta

    bundle_dir = tmp_path / "old"
    shutil.copytree(small_padim_bundle.path, bundle_dir)
    bundle = Bundle.load(bundle_dir)
    t = bundle.meta.threshold
    t.rule, t.certified, t.target_escape_rate = "escape_rate", True, 0.1
    t.validation_escape_rate, t.validation_false_reject_rate = 0.08, 0.115
    write_meta(bundle_dir, bundle.meta)
    text, facts = _info_text(bundle_dir)
    line = text[text.index("threshold   "):text.index("good scores")]
    assert facts["threshold"]["certified"] is False and facts["threshold"]["validation"]["in_sample"]
    assert "no false-reject rate is guaranteed" in line and "in-sample" in line and "11.5%" in line
