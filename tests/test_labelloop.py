"""The line teaches the model (issue 32, items 1-3): the archive keeps what labelling needs, operators label
archived parts over the view's HTTP API, and `labels export` gives a data set replay and fit read.

Real pieces throughout: the real service on loopback judging a real MJPG video with the session's fitted
PaDiM bundle and writing a real archive, the real view server over real HTTP, the real labels reader and
the real `replay` CLI on the export.
"""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edge_inspector.cli import main
from edge_inspector.core.decision import DecisionParams, decide
from edge_inspector.core.labelstore import LABELS_FILE, LabelBook, append_record, read_records
from edge_inspector.service.app import Service
from edge_inspector.service.archive import Archive
from edge_inspector.service.config import ArchiveConfig, parse_config
from edge_inspector.service.pipeline import Result
from edge_inspector.service.sources import Frame
from edge_inspector.tools.labels import discover_labels, read_labels_csv
from edge_inspector.tools.view.server import ViewServer
from service_helpers import config_data, conveyor_frames, wait_for, write_video

TOKEN = "operator-key-0123"
BY = {"address": "test", "key": None}


def scored(sequence: int, score: float) -> tuple[Result, dict]:
    """A judged part scoring `score` against threshold 1.0 (pass below it, fail above it)."""
    heat = np.zeros((40, 60), np.float32)
    heat[5:15, 5:25] = score
    decision = decide(np.array([score]), heat, DecisionParams(threshold=1.0))
    frame = Frame(image=np.full((40, 60, 3), 90, np.uint8), index=sequence,
                  capture_time=1_700_000_000.0 + sequence, capture_mono=time.monotonic(), capture_ms=1.0)
    result = Result(sequence=sequence, frame=frame, verdict=decision.verdict, model_id="m", model_sha256="s",
                    decision=decision, heatmap=heat)
    return result, {"camera_id": "cam1", "sequence": sequence, "verdict": decision.verdict,
                    "threshold": 1.0, "score": score, "model": {"id": "m", "sha256": "s"}}


def stems_in(folder: Path) -> list[int]:
    return sorted(int(p.name.split("_")[2]) for p in folder.glob("*.json"))


def fill(archive: Archive, parts: list[tuple[int, float]]) -> None:
    for sequence, score in parts:
        archive.submit(*scored(sequence, score))
        time.sleep(0.01)  # about eviction, not skipping: let the writer keep up


# ------------------------------------------------------------------------------ item 1: the archive


def test_passes_are_kept_by_margin_and_by_sample_and_say_why(tmp_path):
    archive = Archive(tmp_path, ArchiveConfig(enabled=True, folder=str(tmp_path), pass_sample=3, pass_margin=0.8))
    # passes 1..6 score 0.1 except #2 (0.85, above 0.8 x threshold); #7 fails
    fill(archive, [(1, 0.1), (2, 0.85), (3, 0.1), (4, 0.1), (5, 0.1), (6, 0.1), (7, 3.0)])
    archive.close()
    kept = {n: json.loads(next(tmp_path.glob(f"*_{n:08d}_*.json")).read_text())["archived"] for n in stems_in(tmp_path)}
    # the margin keeps #2; the sample keeps every third pass seen (#3, #6: passes 3 and 6 of six)
    assert kept == {2: "margin", 3: "sample", 6: "sample", 7: "verdict"}
    assert archive.snapshot()["passes"] == 3 and archive.snapshot()["saved"] == 4
    assert cv2.imread(str(next(tmp_path.glob("*_00000003_pass.png")))).shape == (40, 60, 3)
    assert (next(tmp_path.glob("*_00000003_pass.heatmap.png"))).is_file()


def test_no_pass_is_kept_by_default(tmp_path):
    archive = Archive(tmp_path, ArchiveConfig(enabled=True, folder=str(tmp_path)))
    fill(archive, [(1, 0.95), (2, 0.1), (3, 3.0)])
    archive.close()
    assert stems_in(tmp_path) == [3]


def test_labelled_parts_are_not_evicted_until_exported(tmp_path, caplog):
    archive = Archive(tmp_path, ArchiveConfig(enabled=True, folder=str(tmp_path), max_files=3))
    fill(archive, [(1, 3.0), (2, 3.0), (3, 3.0)])
    time.sleep(0.2)
    first = next(p.name[:-5] for p in tmp_path.glob("*_00000001_fail.json"))
    book = LabelBook(tmp_path)
    record = book.label(first, "good", BY)  # a false reject, confirmed by the operator
    fill(archive, [(4, 3.0), (5, 3.0), (6, 3.0)])
    time.sleep(0.2)
    assert stems_in(tmp_path) == [1, 5, 6]  # #1 held, the others evicted oldest first
    assert archive.snapshot()["protected"] == 1
    book.exported([record["id"]], "somewhere", BY)
    fill(archive, [(7, 3.0)])
    archive.close()
    assert stems_in(tmp_path) == [5, 6, 7]  # exported: it may go now


def test_when_labelled_parts_fill_the_caps_new_parts_go_and_it_is_said_once(tmp_path, caplog):
    archive = Archive(tmp_path, ArchiveConfig(enabled=True, folder=str(tmp_path), max_files=1))
    fill(archive, [(1, 3.0)])
    time.sleep(0.2)
    LabelBook(tmp_path).label(next(p.name[:-5] for p in tmp_path.glob("*.json")), "defect", BY)
    fill(archive, [(2, 3.0), (3, 3.0)])
    archive.close()
    assert stems_in(tmp_path) == [1]  # the cap holds: the disk matters more than the newest fail
    assert len([r for r in caplog.records if "wait for `edge-inspector labels export" in r.message]) == 1


# ------------------------------------------------------------------------------ the journal


def test_a_torn_last_line_is_ignored_and_the_next_label_starts_a_fresh_line(tmp_path):
    book = LabelBook(tmp_path)
    stem = "20231114T221321.000Z_cam1_00000001_fail"
    book.label(stem, "good", BY)
    book.label(stem, "defect", BY, "scratch", [1, 2, 3, 4])
    with open(tmp_path / LABELS_FILE, "ab") as handle:  # the power went mid-write
        handle.write(b'{"op":"label","stem":"2023')
    records, skipped = read_records(tmp_path / LABELS_FILE)
    assert len(records) == 2 and skipped == 1
    assert book.state().current(stem)["label"] == "defect"
    book.undo(stem, BY)  # back to the previous label, by a new record
    assert book.state().current(stem)["label"] == "good"
    records, skipped = read_records(tmp_path / LABELS_FILE)
    assert [r["op"] for r in records] == ["label", "label", "undo"] and skipped == 1
    assert (tmp_path / LABELS_FILE).read_bytes().endswith(b"}\n")


def test_a_record_too_large_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="label record"):
        append_record(tmp_path / LABELS_FILE, {"op": "label", "junk": "x" * 70000})
    assert not (tmp_path / LABELS_FILE).exists()


# ------------------------------------------------------------------------------ items 1-3, end to end


def request(url: str, method: str, path: str, body: dict | None = None, **headers: str) -> tuple[int, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def archive_from_service(bundle, tmp_path: Path) -> Path:
    """The real service judges a looping video (good and defective parts alternating) and archives every
    part it judges (`pass_sample: 1`), until it holds at least two fails and two passes."""
    frames, _ = conveyor_frames(np.random.default_rng(32), 8, [False, True] * 4)
    video = write_video(tmp_path / "line.avi", frames)
    folder = tmp_path / "archive"
    data = config_data(str(video), bundle.path, camera={"fps": 10.0, "loop": True},
                       archive={"enabled": True, "folder": str(folder), "pass_sample": 1})
    service = Service(parse_config(data))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
    runner.start()

    def kept(verdict: str) -> int:
        return len(list(folder.glob(f"*_{verdict}.json")))

    try:
        wait_for(lambda: kept("pass") >= 2 and kept("fail") >= 2, 60, "two archived passes and two fails")
    finally:
        service.stop()
        runner.join(30)
    assert not runner.is_alive()
    return folder


def test_label_over_http_then_export_then_replay_reads_it(bundle, tmp_path, caplog):
    folder = archive_from_service(bundle, tmp_path)
    verdicts = {p.name[:-5]: json.loads(p.read_text())["verdict"] for p in folder.glob("*.json")}
    fails = sorted(s for s, v in verdicts.items() if v == "fail")
    passes = sorted(s for s, v in verdicts.items() if v == "pass")
    assert fails and passes, verdicts
    view = ViewServer(["tcp://127.0.0.1:1"], listen="127.0.0.1:0", token=TOKEN, archive=folder,
                      defect_types=("scratch", "spot"))
    view.start()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        url = view.url
        status, body = request(url, "GET", "/api/archive?state=waiting")
        listing = json.loads(body)
        assert status == 200 and listing["total"] == listing["waiting"] == len(verdicts)
        assert listing["defect_types"] == ["scratch", "spot"]
        assert {e["stem"] for e in listing["entries"]} == set(verdicts)

        status, body = request(url, "GET", f"/archive/{fails[0]}/frame")
        assert status == 200 and cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is not None
        assert request(url, "GET", f"/archive/{fails[0]}/heatmap")[0] == 200
        assert request(url, "GET", "/archive/..%2f..%2fetc%2fpasswd/frame")[0] == 404

        # refused: no key, wrong key, another origin; nothing is written
        false_reject = {"stem": fails[0], "label": "good"}
        assert request(url, "POST", "/api/labels", false_reject)[0] == 401
        assert request(url, "POST", "/api/labels", false_reject, Authorization="Bearer wrong-key-99")[0] == 401
        assert request(url, "POST", "/api/labels", false_reject, Origin="http://evil.example", **auth)[0] == 403
        assert not (folder / LABELS_FILE).exists()

        # bad bodies: one line naming the field
        status, body = request(url, "POST", "/api/labels", {"stem": fails[0], "label": "maybe"}, **auth)
        assert status == 400 and "label: expected good or defect" in json.loads(body)["error"]
        status, body = request(url, "POST", "/api/labels",
                               {"stem": passes[0], "label": "defect", "defect_type": "dent"}, **auth)
        assert status == 400 and "defect_type: expected one of scratch, spot" in json.loads(body)["error"]
        status, body = request(url, "POST", "/api/labels",
                               {"stem": passes[0], "label": "defect", "box": [250, 0, 10, 10]}, **auth)
        assert status == 400 and "box:" in json.loads(body)["error"]
        assert request(url, "POST", "/api/labels", {"stem": "nope", "label": "good"}, **auth)[0] == 404

        # the false reject and the escape found among the sampled passes
        status, body = request(url, "POST", "/api/labels", false_reject, **auth)
        reply = json.loads(body)
        assert status == 200 and reply["label"]["label"] == "good"
        assert reply["record"]["by"]["address"] == "127.0.0.1" and reply["record"]["by"]["key"].startswith("sha256:")
        assert TOKEN not in (folder / LABELS_FILE).read_text()
        escape = {"stem": passes[0], "label": "defect", "defect_type": "scratch", "box": [10, 20, 30, 40]}
        assert request(url, "POST", "/api/labels", escape, **auth)[0] == 200
        # a slip, undone: a new record, the part is waiting again
        assert request(url, "POST", "/api/labels", {"stem": passes[1], "label": "defect"}, **auth)[0] == 200
        status, body = request(url, "POST", "/api/labels", {"stem": passes[1], "undo": True}, **auth)
        assert status == 200 and json.loads(body)["label"] is None
        assert request(url, "POST", "/api/labels", {"stem": passes[1], "undo": True}, **auth)[0] == 400

        with open(folder / LABELS_FILE, "ab") as handle:  # a crash mid-write
            handle.write(b'{"op":"label","stem":"' + passes[1].encode())
        status, body = request(url, "GET", "/api/archive?state=labelled")
        listing = json.loads(body)
        assert status == 200 and listing["labelled"] == 2 and listing["waiting"] == len(verdicts) - 2
        assert {e["stem"]: e["label"]["label"] for e in listing["entries"]} == {fails[0]: "good",
                                                                                passes[0]: "defect"}
    finally:
        view.stop()

    records, skipped = read_records(folder / LABELS_FILE)
    assert [r["op"] for r in records] == ["label", "label", "label", "undo"] and skipped == 1

    out = tmp_path / "labelled"
    exported = CliRunner().invoke(main, ["labels", "export", str(folder), str(out)])
    assert exported.exit_code == 0, exported.output
    assert "exported 2 labelled parts" in exported.output
    manifest = json.loads((out / "manifest.json").read_text())
    by_stem = {p["stem"]: p for p in manifest["parts"]}
    assert by_stem[fails[0]]["verdict"] == "fail" and by_stem[fails[0]]["label"] == "good"
    assert by_stem[passes[0]]["model_id"] == bundle.model_id
    assert by_stem[passes[0]]["threshold"] == pytest.approx(json.loads((folder / f"{passes[0]}.json").read_text())[
        "threshold"])
    assert LabelBook(folder).state().protected() == set()  # exported: the archive may evict them again

    for items in (read_labels_csv(out / "labels.csv"), discover_labels(out)):  # CSV and MVTec layout agree
        truth = {item.path.name.removesuffix(".png"): (item.label, item.defect_type, item.mask_path) for item in items}
        assert truth[fails[0]] == (0, "good", None)
        label, kind, mask = truth[passes[0]]
        assert (label, kind) == (1, "scratch") and mask is not None
        assert cv2.imread(str(mask), cv2.IMREAD_GRAYSCALE)[30, 20] == 255

    metrics = tmp_path / "metrics.json"
    replayed = CliRunner().invoke(main, ["replay", str(out), "--bundle", str(bundle.path), "--labels",
                                         str(out / "labels.csv"), "--metrics", str(metrics),
                                         "--out", str(tmp_path / "replayed.csv")])
    assert replayed.exit_code == 0, replayed.output
    report = json.loads(metrics.read_text())
    assert (report["num_images"], report["num_good"], report["num_defective"]) == (2, 1, 1)
    # the bundle still judges both parts as it did on the line: the labels show them as its two mistakes
    assert (report["confusion"]["fp"], report["confusion"]["fn"]) == (1, 1)

    # fit --validation's calibration reads the export as it is, and says the line's scores came from a model
    from edge_inspector.core.bundle import Bundle
    from export.validation import calibrate_with_defects

    other = Bundle.load(shutil.copytree(bundle.path, tmp_path / "next-bundle"))
    manifest["models"] = {"line-model-v1": 2}  # as if the line ran the previous bundle
    (out / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.WARNING, logger="export.validation")
    calibrated = calibrate_with_defects(other, out)
    assert calibrated.meta.threshold.operating_curve
    assert any("judged on the line by another model (line-model-v1 x2)" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------ the view's refusals


def test_labelling_needs_an_archive_a_key_off_loopback_and_sane_types(tmp_path):
    from edge_inspector.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--archive on a non-loopback address needs --token-file"):
        ViewServer(["tcp://127.0.0.1:1"], listen="0.0.0.0:0", archive=tmp_path)
    with pytest.raises(ConfigError, match="--defect-type 'good'"):
        ViewServer(["tcp://127.0.0.1:1"], listen="127.0.0.1:0", archive=tmp_path, defect_types=("good",))
    view = ViewServer(["tcp://127.0.0.1:1"], listen="127.0.0.1:0")  # no --archive: nothing to label
    view.start()
    try:
        status, body = request(view.url, "GET", "/api/archive")
        assert status == 404 and "--archive" in json.loads(body)["error"]
        assert request(view.url, "POST", "/api/labels", {"stem": "x", "label": "good"})[0] == 404
    finally:
        view.stop()


def test_an_oversized_label_body_is_refused_unread(tmp_path):
    archive = Archive(tmp_path, ArchiveConfig(enabled=True, folder=str(tmp_path)))
    fill(archive, [(1, 3.0)])
    archive.close()
    stem = next(p.name[:-5] for p in tmp_path.glob("*.json"))
    view = ViewServer(["tcp://127.0.0.1:1"], listen="127.0.0.1:0", archive=tmp_path)  # loopback, no key: allowed
    view.start()
    try:
        status, _ = request(view.url, "POST", "/api/labels", {"stem": stem, "label": "good", "pad": "x" * 9000})
        assert status == 413 and not (tmp_path / LABELS_FILE).exists()
        status, body = request(view.url, "POST", "/api/labels", {"stem": stem, "label": "good"})
        assert status == 200 and json.loads(body)["record"]["by"]["key"] is None
    finally:
        view.stop()


KILLED_WRITER = """
import sys
from pathlib import Path
from edge_inspector.core.labelstore import LabelBook
book = LabelBook(Path(sys.argv[1]))
for i in range(100000):
    record = book.label(f"20231114T221321.000Z_cam1_{i % 1000:08d}_fail", "defect", {"address": "writer"})
    print(record["id"], flush=True)  # acknowledged: only once the record is on disk
"""


def test_labels_acknowledged_before_a_sigkill_are_all_there(tmp_path):
    """A writer killed at random moments, five times over the same journal: every label it acknowledged is
    read back, and the file stays readable (at most a torn last line, ignored)."""
    import random
    import signal
    import subprocess
    import sys

    from service_helpers import subprocess_env

    acknowledged: list[str] = []
    rng = random.Random(5)
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE,
                                 text=True, env=subprocess_env())
        assert child.stdout is not None
        acknowledged.append(child.stdout.readline().strip())  # started writing
        time.sleep(rng.uniform(0.05, 0.3))
        child.send_signal(signal.SIGKILL)
        acknowledged += [line.strip() for line in child.stdout.read().splitlines() if line.strip()]
        child.wait(10)
        records, skipped = read_records(tmp_path / LABELS_FILE)
        assert skipped <= 1
        assert set(acknowledged) <= {r["id"] for r in records}
    assert len(acknowledged) > 50  # hundreds per run here: the kills land mid-stream, not before it
