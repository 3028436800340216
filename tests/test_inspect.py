"""One path from a frame to a verdict: replay and the live service judge the same images the same way.

The same PNG files go through `edge-inspector replay` (the CLI, real ONNX Runtime) and through a running
service reading them as a folder source over real ZeroMQ; with `min_defect_area` > 0 chosen so that some
images are over the threshold yet pass, every verdict must agree. Control changes (reload, set_threshold)
made between two frames must all reach the next frame's decision and header.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edge_inspector.backends import create_backend
from edge_inspector.cli import main as inspector_cli
from edge_inspector.core.decision import DecisionParams
from edge_inspector.core.errors import ConfigError
from edge_inspector.core.inspect import Inspector, Model
from edge_inspector.core.tiling import Tiler
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service, load_model
from edge_inspector.service.config import parse_config
from edge_inspector.service.pipeline import InferenceEngine
from edge_inspector.service.publisher import result_header
from edge_inspector.service.sources import Frame
from edge_inspector.tools.subscriber import Subscriber
from service_helpers import LANES, config_data, conveyor_frames, endpoint, wait_for


def _inspector(bundle, min_defect_area: int = 0) -> Inspector:
    model = Model(bundle, create_backend(bundle, "onnxruntime", threads=2), Tiler(1, LANES, bundle.input_size))
    return Inspector(model, DecisionParams(threshold=bundle.threshold, min_defect_area=min_defect_area))


def _images(folder: Path, seed: int = 77, count: int = 12) -> list[Path]:
    frames, _ = conveyor_frames(np.random.default_rng(seed), count, [i % 3 != 0 for i in range(count)])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        paths.append(folder / f"{i:03d}.png")
        cv2.imwrite(str(paths[-1]), frame)
    return paths


def _area_that_splits(bundle, paths: list[Path]) -> int:
    """A min_defect_area that turns some over-threshold images into passes and leaves others failing."""
    inspector = _inspector(bundle)
    areas = sorted(inspector.inspect(cv2.imread(str(p))).decision.largest_area for p in paths)
    over = [a for a in areas if a > 0]
    assert len(set(over)) >= 2, f"need defects of different sizes to test min_defect_area, got {areas}"
    return int(np.median(over)) if len(set(over)) > 2 else min(over)


def _service_verdicts(bundle, folder: Path, min_defect_area: int) -> dict[str, str]:
    data = config_data(str(folder), bundle.path, decision={"min_defect_area": min_defect_area},
                       publish={"wait_for_subscriber_s": 20.0})
    service = Service(parse_config(data))
    verdicts: dict[str, str] = {}
    with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
        runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
        runner.start()
        runner.join(120)
        while (message := subscriber.receive(1.0)) is not None:
            header = message.header
            assert header["min_defect_area"] == min_defect_area
            verdicts[Path(header["source_file"]).name] = header["verdict"]
    assert not runner.is_alive()
    return verdicts


def test_replay_and_the_service_give_identical_verdicts_with_min_defect_area(bundle, tmp_path):
    paths = _images(tmp_path / "frames")
    area = _area_that_splits(bundle, paths)
    runner = CliRunner()
    out = tmp_path / "results.csv"
    result = runner.invoke(inspector_cli, ["replay", str(tmp_path / "frames"), "--bundle", str(bundle.path),
                                           "--out", str(out), "--min-defect-area", str(area)])
    assert result.exit_code == 0, result.output
    assert f"min defect area {area} px" in result.output
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    replayed = {Path(row["path"]).name: row["verdict"] for row in rows}
    over_but_pass = [row for row in rows if float(row["normalised_score"]) > 1.0 and row["verdict"] == "pass"]
    assert over_but_pass, "min_defect_area changed no verdict: the test would not catch a path that ignores it"
    assert "fail" in replayed.values()
    live = _service_verdicts(bundle, tmp_path / "frames", area)
    assert live == replayed


def test_replay_tiles_like_the_bundle_and_matches_the_inspector(bundle, tmp_path):
    """Replay's scores are the Inspector's scores on the bundle's own grid (one code path, not two)."""
    paths = _images(tmp_path / "frames", seed=5, count=4)
    inspector = _inspector(bundle)
    runner = CliRunner()
    out = tmp_path / "r.csv"
    assert runner.invoke(inspector_cli, ["replay", str(tmp_path / "frames"), "--bundle", str(bundle.path),
                                         "--out", str(out)]).exit_code == 0
    with open(out) as handle:
        rows = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(handle)}
    for path in paths:
        assert rows[path.name] == float(f"{inspector.inspect(cv2.imread(str(path))).score:.6g}")


def test_a_header_carries_the_parameters_its_verdict_was_decided_with(bundle):
    """A set_threshold (or reload) between inference and publishing must not mix two moments in one header."""
    config = parse_config({"tiling": {"rows": 1, "cols": LANES},
                           "model": {"bundle": str(bundle.path), "backend": "onnxruntime", "threads": 2}})
    inspector = Inspector(load_model(config), DecisionParams(threshold=bundle.threshold, min_defect_area=7))
    engine = InferenceEngine(inspector)
    frames, _ = conveyor_frames(np.random.default_rng(3), 1, [True])
    frame = Frame(image=frames[0], index=0, capture_time=time.time(), capture_mono=time.monotonic(), capture_ms=1.0)
    result = engine.process(frame)
    inspector.set_threshold(bundle.threshold * 1.5)
    inspector.swap(inspector.model, DecisionParams(threshold=bundle.threshold * 2, min_defect_area=99))
    header = result_header(result, "cam", "none", 2.0)
    assert header["threshold"] == round(bundle.threshold, 6) and header["min_defect_area"] == 7
    later = result_header(engine.process(frame), "cam", "none", 2.0)
    assert later["threshold"] == round(bundle.threshold * 2, 6) and later["min_defect_area"] == 99


def test_set_threshold_right_after_reload_is_kept(bundle):
    """Before: reload queued (model, params) for the next frame and overwrote a threshold set meanwhile."""
    inspector = _inspector(bundle)
    other = _inspector(bundle).model
    inspector.swap(other, DecisionParams(threshold=bundle.threshold))
    inspector.set_threshold(bundle.threshold * 1.25)
    frames, _ = conveyor_frames(np.random.default_rng(4), 1, [False])
    inspection = inspector.inspect(frames[0])
    assert inspection.decision.threshold == bundle.threshold * 1.25
    assert inspector.model is other


def test_reload_then_set_threshold_over_the_control_socket_reaches_the_next_result(bundle, tmp_path):
    frames, _ = conveyor_frames(np.random.default_rng(9), 4, [False, True] * 2)
    from service_helpers import write_video

    video = write_video(tmp_path / "line.avi", frames)
    data = config_data(str(video), bundle.path, camera={"fps": 5.0, "loop": True},
                       publish={"control_endpoint": endpoint()})
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()
    try:
        wait_for(service.ready.is_set, 60, "the service to start")
        control = data["publish"]["control_endpoint"]
        wanted = bundle.threshold * 1.2
        with Subscriber(data["publish"]["endpoint"], ("inspection.",)) as subscriber:
            assert send_control(control, "reload", timeout_s=30)["ok"]
            reply = send_control(control, f"set_threshold {wanted}", timeout_s=10)
            assert reply["ok"], reply
            asked = time.monotonic()
            seen = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = subscriber.receive(1.0)
                if message is None:
                    continue
                seen.append(message.header["threshold"])
                if message.header["threshold"] == round(wanted, 6) and time.monotonic() - asked > 1.0:
                    break
            assert seen and seen[-1] == round(wanted, 6), seen
        assert send_control(control, "status")["threshold"] == wanted
    finally:
        service.stop()
        runner.join(30)


def test_maps_stitched_at_the_published_scale_keep_full_resolution_decisions(bundle):
    """At heatmap_scale 0.5 the map is stitched at half size, yet verdicts, areas and boxes are unchanged."""
    inspector = _inspector(bundle, min_defect_area=3)
    frames, _ = conveyor_frames(np.random.default_rng(21), 6, [False, True, True, False, True, True])
    verdicts = []
    for frame in frames:
        full, half = inspector.inspect(frame), inspector.inspect(frame, 0.5)
        assert half.heatmap.shape == (round(frame.shape[0] / 2), round(frame.shape[1] / 2))
        assert full.heatmap.shape == frame.shape[:2]
        assert half.decision == full.decision
        verdicts.append(full.verdict)
        # the same picture, smaller: the half-size map matches the full one shrunk (bilinear vs area)
        shrunk = cv2.resize(full.heatmap, half.heatmap.shape[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(shrunk - half.heatmap).max() <= 0.05 * max(float(full.heatmap.max()), 1e-6)
    assert "fail" in verdicts and "pass" in verdicts  # both branches (full map stitched or not) were taken


def test_tiles_cut_ahead_give_the_same_inspection_and_a_reload_cuts_again(bundle):
    """The capture stage cuts tiles ahead (Inspector.prepare); the verdict must not depend on who cut them."""
    inspector = _inspector(bundle, min_defect_area=3)
    frames, _ = conveyor_frames(np.random.default_rng(31), 4, [False, True, False, True])
    for frame in frames:
        tiles = inspector.prepare(frame)
        assert tiles is not None and tiles.tiler is inspector.model.tiler
        np.testing.assert_array_equal(tiles.tiles, inspector.model.tiler.split(frame))
        ahead, alone = inspector.inspect(frame, 0.5, tiles), inspector.inspect(frame, 0.5)
        assert ahead.decision == alone.decision
        np.testing.assert_array_equal(ahead.heatmap, alone.heatmap)
        assert ahead.timings["tiling"] == tiles.ms
    # Tiles cut for the model before a reload are not fed to the new one (its tiler may cut differently).
    stale = inspector.prepare(frames[1])
    other = _inspector(bundle).model
    inspector.swap(other, inspector.params)
    poisoned = type(stale)(np.zeros_like(stale.tiles), stale.tiler, stale.ms)  # used, they would change the scores
    assert inspector.inspect(frames[1], 1.0, poisoned).decision == inspector.inspect(frames[1]).decision
    assert inspector.inspect(frames[1], 1.0, stale).verdict == "fail"  # the defective part, judged as such


def test_a_frame_that_cannot_be_cut_ahead_still_reports_its_error(bundle):
    inspector = _inspector(bundle)
    narrow = np.zeros((64, 1, 3), np.uint8)  # cannot hold a 1 x LANES grid
    assert inspector.prepare(narrow) is None
    with pytest.raises(ConfigError, match="do not fit"):
        inspector.inspect(narrow, 1.0, None)


def test_a_replaced_backend_is_closed_only_once_no_frame_uses_it(bundle):
    """Several inference workers: a frame that started before a reload keeps using the old backend, so the
    old one may be closed (TensorRT frees GPU buffers) only when no frame is being judged, not by the first
    worker that starts a frame with the new model."""
    inspector = _inspector(bundle)
    old = inspector.model.backend
    entered, release, closed = threading.Event(), threading.Event(), []
    real_infer = old.infer

    def slow_infer(images):
        entered.set()
        assert release.wait(10)
        assert not closed, "the backend was closed while a frame was inside it"
        return real_infer(images)

    old.infer, old.close = slow_infer, lambda: closed.append(True)
    frames, _ = conveyor_frames(np.random.default_rng(12), 2, [False, False])
    errors: list[BaseException] = []

    def judge_with_old():
        try:
            inspector.inspect(frames[0])
        except BaseException as err:  # noqa: BLE001 (reported by the assertion below)
            errors.append(err)

    worker = threading.Thread(target=judge_with_old)
    worker.start()
    assert entered.wait(10)
    inspector.swap(_inspector(bundle).model, DecisionParams(threshold=bundle.threshold))
    assert inspector.inspect(frames[1]).verdict == "pass"  # another worker, new model, old one still busy
    assert not closed
    release.set()
    worker.join(10)
    assert not errors and not closed
    inspector.inspect(frames[1])  # the next frame with no other in flight closes the old backend
    assert closed == [True]
