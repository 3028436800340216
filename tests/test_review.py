"""The review band: a third verdict for the uncertain parts, chosen out of sample, on the wire and in replay.

Real parts throughout: a real fitted bundle, real ONNX Runtime, a real service on loopback ZeroMQ with a real
archive folder, the real `fit`, `info` and `replay` CLIs.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading

import numpy as np
import pytest
from click.testing import CliRunner

from edge_inspector.core.bundle import Bundle
from edge_inspector.core.decision import DecisionParams, decide, resolve_review
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.operating_point import band_outcome, band_pass_threshold, cross_validated_band
from edge_inspector.core.wire import SCHEMA_VERSION, send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import parse_config
from edge_inspector.tools.subscriber import Subscriber
from export.threshold import fold_ids, review_band
from service_helpers import config_data, conveyor_frames, wait_for, write_video

# ------------------------------------------------------------------------------------------ the verdict


def test_decide_gives_pass_review_fail_around_the_two_thresholds():
    heat = np.zeros((4, 4), np.float32)
    params = DecisionParams(threshold=10.0, review_threshold=6.0)
    verdicts = [decide(np.array([s]), heat + s, params).verdict for s in (5.0, 6.0, 6.5, 10.0, 10.5)]
    assert verdicts == ["pass", "pass", "review", "review", "fail"]  # at a threshold is not over it
    assert decide(np.array([6.5]), heat, DecisionParams(threshold=10.0)).verdict == "pass"  # no band: as before
    assert decide(np.array([6.5]), heat, params).review_threshold == 6.0


def test_a_band_at_or_over_the_threshold_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="review_threshold: 10 must be below the threshold 10"):
        DecisionParams(threshold=10.0, review_threshold=10.0)
    with pytest.raises(ConfigError, match="expected a finite number > 0"):
        DecisionParams(threshold=10.0, review_threshold=float("nan"))


def test_the_config_band_overrides_the_bundle_band_and_a_moved_threshold_never_drops_it_silently():
    assert resolve_review(None, 6.0, 10.0) == 6.0
    assert resolve_review(7.0, 6.0, 10.0) == 7.0
    assert resolve_review("off", 6.0, 10.0) is None
    assert resolve_review(None, None, 10.0) is None
    with pytest.raises(ConfigError, match="at or under the bundle's review band .* also set decision.review_threshold"):
        resolve_review(None, 6.0, 5.0)


# ------------------------------------------------------------------------------------------ choosing the band


def test_band_keeps_the_split_conformal_count_and_needs_enough_good_scores():
    good = np.arange(1.0, 100.0)  # 99 scores
    choice = band_pass_threshold(good, fail_threshold=95.5, rate=0.1)  # 95 at or under the fail threshold
    assert choice.guaranteed and choice.pass_threshold == 86.0  # k = 95 + 1 - floor(0.1 * 100)
    assert choice.in_band == 9 and (95 + 1 - 86) / 100 <= 0.1
    few = band_pass_threshold(np.arange(1.0, 9.0), fail_threshold=9.0, rate=0.1)  # 8 scores: 1/(n+1) > 0.1
    assert few.pass_threshold is None and few.images_needed == 9


def test_band_rate_holds_on_new_good_parts():
    """The bound is about parts the band never saw: draw the band from 200 scores, count fresh ones."""
    rng = np.random.default_rng(5)
    landed, total = 0, 0
    for _ in range(300):
        scores = rng.gamma(4.0, 1.0, 200)
        fail = float(np.sort(scores)[-2])
        band = band_pass_threshold(scores, fail, 0.05)
        fresh = rng.gamma(4.0, 1.0, 200)
        landed += int(np.count_nonzero((fresh > band.pass_threshold) & (fresh <= fail)))
        total += fresh.size
    assert 0.035 < landed / total <= 0.05 + 0.004  # the target, not far under it (the band is not wasted)


def test_cross_validated_band_never_lets_a_part_choose_its_own_band():
    """Each part is judged by a band chosen without its fold: moving its own score does not move its band,
    while an in-sample band (chosen with it) would. This fails if an image scores itself."""
    rng = np.random.default_rng(9)
    good = rng.normal(5.0, 1.0, 60)
    fail = float(np.quantile(good, 0.97))
    folds = fold_ids(good.size, 5, 0)
    count, used = cross_validated_band(good, fail, 0.2, folds)
    in_band = np.flatnonzero((good > used) & (good <= fail))
    assert count == in_band.size >= 5
    for i in in_band[:5]:
        moved = good.copy()
        moved[i] = float(np.min(good)) - 1.0  # from inside the band to the very bottom
        _, again = cross_validated_band(moved, fail, 0.2, folds)
        assert again[i] == used[i]  # its band did not move with it
        # while a band chosen with it would have (the mutation this test guards against)
        in_sample = band_pass_threshold(moved, fail, 0.2).pass_threshold
        assert in_sample != band_pass_threshold(good, fail, 0.2).pass_threshold
    brute = 0
    for fold in range(5):
        held = folds == fold
        band = band_pass_threshold(good[~held], fail, 0.2).pass_threshold
        brute += int(np.count_nonzero((good[held] > band) & (good[held] <= fail)))
    assert count == brute


def test_review_band_records_counts_and_the_labelled_three_way_outcome():
    rng = np.random.default_rng(2)
    good = rng.normal(5.0, 1.0, 120)
    labelled_good, defects = rng.normal(5.0, 1.0, 20), rng.normal(7.5, 1.5, 30)
    fail = float(np.sort(good)[-2])
    band = review_band(good, fail, 0.1, folds=4, labelled_good=labelled_good, labelled_defects=defects)
    assert band is not None and band.good_count == 140 and 0 < band.value < fail
    outcome = band_outcome(labelled_good, defects, band.value, fail)
    assert (band.defects_auto_passed, band.defects_in_band) == (outcome.defects_passed, outcome.defects_review)
    assert band.defects_auto_passed == int(np.count_nonzero(defects <= band.value))
    assert band.cross_validated_rate == pytest.approx(band.cross_validated_in_band / 140)
    assert "auto-passed" in band.note and "cross-validated" in band.note
    assert review_band(good[:5], fail, 0.1) is None  # 5 scores cannot support 10%


# ------------------------------------------------------------------------------------------ fit, info, replay


@pytest.fixture(scope="module")
def band_bundle(synthetic_dataset, tmp_path_factory):
    from export.cli import main

    out = tmp_path_factory.mktemp("review") / "band"
    result = CliRunner().invoke(main, ["fit", str(synthetic_dataset / "train" / "good"), "--out", str(out),
                                       "--model", "padim", "--input-size", "64", "--feature-dim", "20",
                                       "--folds", "2", "--target-frr", "0.1", "--validation",
                                       str(synthetic_dataset), "--review-rate", "0.3"])
    assert result.exit_code == 0, result.output
    assert "review band: pass at or under" in result.output
    return Bundle.load(out)


def test_good_scores_live_in_their_own_verified_file_not_in_bundle_yaml(band_bundle):
    """One score per training image would pass bundle.yaml's node cap on a large training set: they are a
    listed, hashed file of their own, and an altered file is refused like any bundle file."""
    from edge_inspector.core.bundle import BUNDLE_FILE, GOOD_SCORES_FILE
    from edge_inspector.core.errors import BundleError

    assert "good_scores:" not in (band_bundle.path / BUNDLE_FILE).read_text()
    assert GOOD_SCORES_FILE in band_bundle.meta.files
    scores = band_bundle.good_scores()
    assert scores is not None and len(scores) == 24 and scores == sorted(scores)
    copy = band_bundle.path.parent / "altered"
    shutil.copytree(band_bundle.path, copy)
    (copy / GOOD_SCORES_FILE).write_text("[0.0]")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Bundle.load(copy)


def test_fit_records_the_band_and_info_shows_it(band_bundle):
    from edge_inspector.cli import main as inspector

    review = band_bundle.meta.threshold.review
    assert review is not None and band_bundle.review_threshold == review.value < band_bundle.threshold
    assert review.good_count == 24 + 6  # training k-fold scores plus the labelled good ones
    assert review.labelled_defect_count == 12 and review.defects_auto_passed is not None
    text = CliRunner().invoke(inspector, ["info", "--no-verify", str(band_bundle.path)]).output
    assert f"review band pass at or under {review.value:.6g}" in text and "cross-validated" in text


def test_replay_writes_review_verdicts_and_band_metrics(band_bundle, synthetic_dataset, tmp_path):
    from edge_inspector.cli import main as inspector

    out, metrics = tmp_path / "r.csv", tmp_path / "m.json"
    result = CliRunner().invoke(inspector, ["replay", str(synthetic_dataset / "test"), "--bundle",
                                            str(band_bundle.path), "--out", str(out), "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    verdicts = [row["verdict"] for row in rows]
    band = json.loads(metrics.read_text())["review"]
    assert band["review_threshold"] == pytest.approx(band_bundle.review_threshold)
    assert verdicts.count("review") == band["review"] > 0
    assert verdicts.count("pass") == band["auto_passed"] and verdicts.count("fail") == band["auto_failed"]
    defective = ["/good/" not in row["path"] for row in rows]
    escapes = sum(1 for v, bad in zip(verdicts, defective) if v == "pass" and bad)
    false_rejects = sum(1 for v, bad in zip(verdicts, defective) if v == "fail" and not bad)
    assert band["escapes_among_auto_passed"] == escapes
    assert band["false_rejects_among_auto_failed"] == false_rejects
    assert band["review_rate"] == pytest.approx(verdicts.count("review") / len(rows))
    assert "review band (pass at or under" in result.output and "review," in result.output
    off = CliRunner().invoke(inspector, ["replay", str(synthetic_dataset / "test"), "--bundle", str(band_bundle.path),
                                         "--out", str(tmp_path / "off.csv"), "--review-threshold", "off"])
    assert off.exit_code == 0 and "review" not in (tmp_path / "off.csv").read_text()


# ------------------------------------------------------------------------------------------ on the wire


def test_review_verdict_goes_over_zeromq_into_health_the_archive_and_set_threshold(bundle, tmp_path):
    """A real service on loopback with a band from the config: review results on the wire, counted in
    health, kept in the archive; set_threshold keeps the band, refuses to cross it, and turns it off on request."""
    frames, _ = conveyor_frames(np.random.default_rng(44), 4, [False] * 4)
    video = write_video(tmp_path / "line.avi", frames)
    review_at = float(bundle.meta.score_stats.min) / 4  # every good part scores over it: review, or fail
    data = config_data(str(video), bundle.path, decision={"review_threshold": review_at},
                       archive={"enabled": True, "folder": str(tmp_path / "archive"), "verdicts": ["review"]})
    data["camera"].update({"fps": 10.0, "loop": True})
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    subscriber = None
    results: list[dict] = []
    health: list[dict] = []

    def take() -> None:
        message = subscriber.receive(0.2)
        if message is not None:
            (results if message.is_result else health).append(message.header)

    def until(predicate) -> bool:
        take()
        return predicate()

    try:
        assert service.ready.wait(60)
        subscriber = Subscriber(data["publish"]["endpoint"], ("inspection.", "health."))
        wait_for(lambda: until(lambda: any(h.get("reviews", 0) > 0 for h in health) and len(results) >= 3), 30,
                 "review results and a health message counting them")
        reviewed = [h for h in results if h["verdict"] == "review"]
        assert reviewed and all(h["schema_version"] == SCHEMA_VERSION == 2 for h in results)
        h = reviewed[0]
        assert h["review_threshold"] == pytest.approx(review_at) and review_at < h["score"] <= h["threshold"]
        assert health[-1]["review_threshold"] == pytest.approx(review_at)
        wait_for(lambda: any((tmp_path / "archive").glob("*_review.json")), 10, "an archived review entry")
        assert service.archive.snapshot()["reviews"] >= 1

        control = data["publish"]["control_endpoint"]
        status = send_control(control, "status")
        assert status["review_threshold"] == pytest.approx(review_at) and status["bundle_review_threshold"] is None
        threshold, (low, _) = status["threshold"], status["threshold_range"]
        band = (low + threshold) / 2
        assert status["threshold_certified"] is bundle.meta.threshold.guarantees_false_reject_rate
        moved = send_control(control, {"command": "set_threshold", "value": threshold, "review_threshold": band})
        assert moved["ok"] and moved["review_threshold"] == pytest.approx(band)
        assert send_control(control, "status")["threshold_certified"] is False  # moved by hand: no guarantee
        refused = send_control(control, {"command": "set_threshold", "value": band})  # at the band: crosses it
        assert not refused["ok"] and "send review_threshold too" in refused["error"]
        kept = send_control(control, {"command": "set_threshold", "value": threshold * 1.01})
        assert kept["ok"] and kept["review_threshold"] == pytest.approx(band)
        off = send_control(control, {"command": "set_threshold", "value": threshold, "review_threshold": None})
        assert off["ok"] and off["review_threshold"] is None
        after = len(results)
        wait_for(lambda: until(lambda: len(results) > after + 4), 30, "results after the band was turned off")
        assert all(h["verdict"] != "review" and h["review_threshold"] is None for h in results[-2:])
    finally:
        if subscriber is not None:
            subscriber.close()
        service.stop()
        runner.join(30)
    assert not runner.is_alive()


def test_live_view_counts_review_parts_from_health_and_the_results_after_it():
    """The view's counters: health's `reviews` plus the review results that arrived after that message."""
    from edge_inspector.tools.view.hub import CameraState, Item

    state = CameraState("c", keep_fails=4, keep_scores=10)
    state.add_health({"last_sequence": 2, "processed": 2, "fails": 0, "reviews": 1, "errors": 0, "uptime_s": 1.0})
    for sequence, verdict in enumerate(["pass", "review", "review", "fail"], start=3):
        state.add_result(Item(sequence, {"sequence": sequence, "verdict": verdict, "score": 1.0}, b"", 0.0))
    counters = state.counters()
    assert counters["reviews"] == 3 and counters["fails"] == 1 and counters["parts"] == 6
    assert not state.fails or all(item.header["verdict"] == "fail" for item in state.fails)
