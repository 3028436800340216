"""What hostile input costs the service now: an oversized control message and a decompression-bomb PNG.

    python benchmarks/hardening_bench.py [--megabytes 100] [--side 20000]

Prints the service-side RSS before/after a control message of --megabytes (refused by ZMQ_MAXMSGSIZE), and
the time and RSS to get a frame result for a --side x --side 1-bit PNG from the folder source (refused from
its header). Then issue 29's runtime attacks (NaN and misshapen graphs, idle connections past the fd limit,
a FIFO, a forged log line, bombs given to replay, topic prefixes, SIGKILL during an archive write), each
against a live `edge-inspector run`, one `held`/`failed` line each (`--only-runtime` for just those). Run
on demand; figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_inspector.core.wire import send_control  # noqa: E402
from edge_inspector.service.config import CameraConfig  # noqa: E402
from edge_inspector.service.control import ControlServer  # noqa: E402
from edge_inspector.service.sources import Camera, create_source  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bomb_png(side: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def control_message(megabytes: int) -> None:
    server = ControlServer("tcp://127.0.0.1:*", {"status": lambda r: {"state": "ok"}})
    server.start()
    try:
        before = rss_mb()
        payload = b"{" + b" " * (megabytes << 20) + b"}"
        sender = zmq.Context.instance().socket(zmq.DEALER)
        sender.setsockopt(zmq.LINGER, 0)
        sender.connect(server.endpoint)
        sender.send_multipart([b"", payload])
        del payload
        time.sleep(2.0)
        sender.close(0)
        answered = send_control(server.endpoint, "status")["ok"]
        print(f"control: {megabytes} MB message -> RSS {before:.0f} -> {rss_mb():.0f} MB (sender included), "
              f"status still answers: {answered}, requests seen {server.requests}")
    finally:
        server.stop()


def bomb(side: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        data = bomb_png(side)
        (Path(folder) / "bomb.png").write_bytes(data)
        config = CameraConfig(source=folder + "/", kind="folder")
        camera = Camera(create_source(config), config)
        before = rss_mb()
        started = time.monotonic()
        frame = next(camera.frames(threading.Event(), lambda: None))
        seconds = time.monotonic() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"bomb: {len(data) / 1e6:.2f} MB PNG of {side}x{side} -> error result in {seconds * 1000:.1f} ms, "
              f"RSS {before:.0f} -> {rss_mb():.0f} MB (peak {peak:.0f} MB): {frame.error}")


# -- issue 29, runtime attacks (2, 5, 7, 8, 9, 14, 15, 16): each prints `held` or `failed` lines -------------

def _verdict(ok: bool, attack: str, detail: str) -> bool:
    print(f"{'held' if ok else 'failed'}: {attack}: {detail}")
    sys.stdout.flush()
    return ok


def _runtime_world(work: Path):
    """A real fitted bundle (the service tests' conveyor PaDiM) and a folder of good frames for it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import cv2
    import numpy as np

    from service_helpers import conveyor_frames, fitted_bundle

    bundle = fitted_bundle(work)
    folder = work / "in"
    folder.mkdir(exist_ok=True)
    frames, _ = conveyor_frames(np.random.default_rng(5), 4, [False] * 4)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:02d}.png"), frame)
    return bundle, folder


class _LiveService:
    """`edge-inspector run` as a subprocess (optionally under an fd limit) with a subscriber on its results."""

    def __init__(self, work: Path, data: dict, fd_limit: int | None = None):
        import subprocess

        import yaml

        from edge_inspector.tools.subscriber import Subscriber
        from service_helpers import REPO, subprocess_env

        self.data = data
        config = work / f"service-{time.monotonic_ns()}.yaml"
        config.write_text(yaml.safe_dump(data))
        self.log = work / f"{config.stem}.log"
        self.subscriber = Subscriber(data["publish"]["endpoint"])

        def limit() -> None:
            if fd_limit:
                resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        self.process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", str(config)],
                                        env=subprocess_env(), cwd=REPO, preexec_fn=limit,
                                        stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def messages(self, seconds: float) -> list:
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end and self.process.poll() is None:
            message = self.subscriber.receive(0.2)
            if message is not None:
                got.append(message)
        return got

    def stop(self) -> tuple[int | None, str]:
        import subprocess

        self.subscriber.close()
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        return self.process.returncode, self.log.read_text(errors="replace")


def _service_data(folder: Path, bundle, **sections) -> dict:
    from service_helpers import config_data

    return config_data(str(folder), bundle.path, **sections)


def attack_2_nan_graph(work: Path, bundle, folder: Path) -> None:
    """Reload a bundle whose graph answers NaN (digests recomputed); and one that answers NaN only on white
    pixels, so it passes the probe: its white frame must be an error result and health not ok."""
    import cv2
    import numpy as np
    from broken_graphs import broken_bundle

    from service_helpers import LANES, PART

    service = _LiveService(work, _service_data(folder, bundle, camera={"loop": True, "fps": 10.0}))
    try:
        service.messages(20)
        control = service.data["publish"]["control_endpoint"]
        reply = send_control(control, {"command": "reload", "bundle": str(broken_bundle(bundle, work, "nan"))}, 60)
        _verdict(not reply["ok"], "2 NaN graph reload", f"reply {reply.get('error', reply)}"[:200])
        white = work / "white"
        white.mkdir(exist_ok=True)
        cv2.imwrite(str(white / "white.png"), np.full((PART, PART * LANES, 3), 255, np.uint8))
        reply = send_control(control, {"command": "reload",
                                       "bundle": str(broken_bundle(bundle, work, "nan_on_white"))}, 60)
        service.messages(3)
        cv2.imwrite(str(folder / "99-white.png"), np.full((PART, PART * LANES, 3), 255, np.uint8))
        got = service.messages(8)
        results = [m.header for m in got if m.is_result and m.header.get("source_file", "").endswith("white.png")]
        health = [m.header for m in got if not m.is_result]
        passed = [r for r in results if r["verdict"] == "pass"]
        unhealthy = [h for h in health if not h["ok"] and any("model output refused" in p for p in h["problems"])]
        _verdict(reply["ok"] and bool(results) and not passed and bool(unhealthy), "2 NaN at run time",
                 f"{len(results)} white results, {len(passed)} pass, "
                 f"verdicts {sorted({r['verdict'] for r in results})}, "
                 f"{len(unhealthy)} not-ok health messages naming it")
    finally:
        (folder / "99-white.png").unlink(missing_ok=True)
        service.stop()


def attack_5_misshapen_map(work: Path, bundle, folder: Path) -> None:
    """A rank-4 anomaly_map and a 64x64 one: refused by check-config and by reload."""
    import subprocess

    import yaml
    from broken_graphs import broken_bundle

    from service_helpers import REPO, subprocess_env

    for kind in ("rank4", "small"):
        path = broken_bundle(bundle, work, kind)
        config = work / f"check-{kind}.yaml"
        config.write_text(yaml.safe_dump(_service_data(folder, bundle, model={"bundle": str(path)})))
        done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "check-config", str(config)],
                              capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=120)
        _verdict(done.returncode == 2 and "anomaly_map has shape" in done.stderr, f"5 {kind} map check-config",
                 f"exit {done.returncode}: {(done.stderr or done.stdout).strip()[-160:]}")
    service = _LiveService(work, _service_data(folder, bundle, camera={"loop": True, "fps": 5.0}))
    try:
        service.messages(15)
        for kind in ("rank4", "small"):
            reply = send_control(service.data["publish"]["control_endpoint"],
                                 {"command": "reload", "bundle": str(work / kind)}, 60)
            _verdict(not reply["ok"], f"5 {kind} map reload", str(reply.get("error", reply))[-160:])
    finally:
        service.stop()


def attack_7_idle_connections(work: Path, bundle, folder: Path, connections: int = 1100,
                              fd_limit: int = 1024) -> None:
    """`connections` idle TCP connections to the control, then the results port, under an fd limit (as
    systemd's default LimitNOFILE=1024): the service must stay up, give error results/health reasons, and
    judge parts again while the connections are still held."""
    import socket

    for port in ("control_endpoint", "endpoint"):
        service = _LiveService(work, _service_data(folder, bundle, camera={"loop": True, "fps": 10.0},
                                                   publish={"wait_for_subscriber_s": 30.0}), fd_limit)
        held: list[socket.socket] = []
        try:
            service.messages(20)
            host, number = service.data["publish"][port].split("//")[1].rsplit(":", 1)
            started = time.monotonic()
            refused = 0
            for _ in range(connections):
                try:
                    held.append(socket.create_connection((host, int(number)), timeout=5))
                except OSError:
                    refused += 1
            got = service.messages(25)
            late = [m.header for m in got[len(got) // 2:]]
            judged = sum(1 for h in late if h.get("type") == "inspection" and h["verdict"] in ("pass", "fail"))
            shortage = any("Too many open files" in " ".join([*(m.header.get("problems") or []),
                                                              str(m.header.get("error"))]) for m in got)
            alive = service.process.poll() is None
            code, log = service.stop()
            _verdict(alive and judged > 0 and code == 0 and "crashed" not in log, f"7 {connections} idle to {port}",
                     f"alive {alive}, exit {code}, shortage reported {shortage}, {judged} parts judged in the last "
                     f"half of {time.monotonic() - started:.0f} s with the connections held, {refused} refused")
        finally:
            for connection in held:
                connection.close()
            if service.process.poll() is None:
                service.stop()


def attack_8_fifo(work: Path, bundle, folder: Path, files: int = 120) -> None:
    """A FIFO renamed over an already-listed image of a live looping folder: an error result, no stall.
    `files` images at 10 frames/s, so the folder is listed once per 12 s and the swap lands in the listing."""
    import shutil

    live = work / "fifo-in"
    live.mkdir(exist_ok=True)
    sources = sorted(folder.glob("*.png"))
    for i in range(files):
        shutil.copy(sources[i % len(sources)], live / f"{i:03d}.png")
    service = _LiveService(work, _service_data(live, bundle, camera={"loop": True, "fps": 10.0}))
    try:
        first = [m for m in service.messages(20) if m.is_result]
        target = live / f"{min(files - 1, len(first) + 40):03d}.png"  # listed, not read yet
        os.mkfifo(work / "fifo")
        os.replace(work / "fifo", target)
        got = service.messages(10)
        errors = [m.header["error"] for m in got if m.is_result and m.header["verdict"] == "error"]
        after = [m for m in got if m.is_result and m.header["verdict"] != "error"]
        stalled = [m for m in got if not m.is_result and any("unresponsive" in p for p in m.header["problems"])]
        _verdict(bool(errors) and "FIFO" in errors[0] and len(after) > 3 and not stalled, "8 FIFO over a listed image",
                 f"{len(errors)} error results ({errors[0] if errors else '-'}), {len(after)} judged, "
                 f"{len(stalled)} stall reports")
    finally:
        service.stop()


def attack_9_forged_log_line(work: Path, bundle, folder: Path) -> None:
    """An image whose name holds a newline and a fake log line: the service log must not show it as a line."""
    import shutil

    live = work / "forge-in"
    shutil.copytree(folder, live, dirs_exist_ok=True)
    fake = "2026-12-07 23:00:00,000 WARNING edge_inspector.service.app: threshold changed: 5.5 -> 1e+06 FORGED"
    (live / f"00a.png\n{fake}.png").write_bytes(b"not an image")
    service = _LiveService(work, _service_data(live, bundle, camera={"fps": 10.0}))
    service.messages(20)
    _code, log = service.stop()
    forged = [line for line in log.splitlines() if line.startswith("2026-12-07 23:00:00,000")]
    escaped = [line for line in log.splitlines() if "00a.png\\n2026-12-07" in line]
    _verdict(not forged and bool(escaped), "9 newline in a file name", f"{len(forged)} forged lines, "
             f"{len(escaped)} escaped mentions")


def attack_14_replay_bombs(work: Path, bundle, side: int = 20000) -> None:
    """replay on a 186-byte TIFF declaring 100000x100000 and a --side x --side PNG: one error row each, replay
    goes on; peak RSS and time of the replay process."""
    import csv
    import shutil
    import subprocess

    from test_safe_files import tiff_declaring

    from service_helpers import REPO, subprocess_env

    images = work / "bombs"
    shutil.copytree(work / "in", images, dirs_exist_ok=True)
    (images / "00b.tif").write_bytes(tiff_declaring(100000, 100000))
    (images / "00c.png").write_bytes(bomb_png(side))
    out = work / "bombs.csv"
    started = time.monotonic()
    # VmHWM, not ru_maxrss: the latter keeps the RSS of the forked copy of this (torch-sized) process
    measured = ("import atexit, runpy, sys; atexit.register(lambda: print('peak_kb', [l.split()[1] for l in "
                "open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr)); "
                "sys.argv[0] = 'edge-inspector'; runpy.run_module('edge_inspector.cli', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", measured, "replay", str(images), "--bundle", str(bundle.path),
                           "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                          timeout=600)
    seconds = time.monotonic() - started
    peaks = [line.split()[1] for line in done.stderr.splitlines() if line.startswith("peak_kb ")]
    peak = int(peaks[-1]) / 1024 if peaks else float("nan")
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())} if out.exists() else {}
    ok = done.returncode == 0 and rows.get("00b.tif", {}).get("verdict") == "error" and rows.get(
        "00c.png", {}).get("verdict") == "error" and len(rows) == 6
    _verdict(ok, "14 replay bombs", f"exit {done.returncode}, {len(rows)} rows in {seconds:.1f} s, replay's peak "
             f"RSS {peak:.0f} MB; TIFF ({(images / '00b.tif').stat().st_size} B): "
             f"{rows.get('00b.tif', {}).get('error', '-')[-70:]}; PNG ({(images / '00c.png').stat().st_size >> 10} "
             f"KB): {rows.get('00c.png', {}).get('error', '-')[-70:]}")


def attack_15_topic_prefix() -> None:
    """Subscribe to camera line1 while line10 publishes too: nothing of line10 may arrive."""
    from edge_inspector.service.config import PublishConfig
    from edge_inspector.service.publisher import Publisher
    from edge_inspector.tools.subscriber import Subscriber, camera_topics

    publishers = [Publisher(PublishConfig(endpoint="tcp://127.0.0.1:*", control_endpoint=None), camera,
                            health=lambda: {"state": "connected"}) for camera in ("line1", "line10")]
    subscriber = Subscriber(publishers[0].endpoint, camera_topics("line1"))
    subscriber.socket.connect(publishers[1].endpoint)
    deadline = time.monotonic() + 5
    while not all(p.subscribed.is_set() for p in publishers) and time.monotonic() < deadline:
        for publisher in publishers:
            publisher._poll_subscriptions()
        time.sleep(0.01)
    for _ in range(3):
        for publisher in publishers:
            publisher.send_health()
    cameras = []
    while (message := subscriber.receive(0.5)) is not None:
        cameras.append(message.header["camera_id"])
    subscriber.close()
    for publisher in publishers:
        publisher.close()
    _verdict(cameras.count("line1") == 3 and "line10" not in cameras, "15 topic prefix line1/line10",
             f"received {cameras}")


def attack_16_archive_tmp(work: Path, bundle, kills: int = 10) -> None:
    """SIGKILL a live service while it archives big frames (as fast as it can, every verdict kept); at the
    next start no temporary file may remain. If no kill happened to cut a write, one is planted under the
    name core/atomic.py gives (what a cut write leaves), and the line says so."""
    import random
    import signal

    import cv2
    import numpy as np

    big = work / "big-in"
    big.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(3):  # ~12 MB PNGs of noise: slow to write, as the 12 MB .tmp
        cv2.imwrite(str(big / f"{i}.png"), rng.integers(0, 255, (2048, 2048, 3), np.uint8))
    archive = work / "archive"
    sections = {"camera": {"loop": True},
                "archive": {"enabled": True, "folder": str(archive), "verdicts": ["pass", "fail", "error"]}}
    cut, planted = 0, False
    for _ in range(kills):
        service = _LiveService(work, _service_data(big, bundle, **sections))
        service.messages(1.0)  # the first results: archiving under way
        time.sleep(random.uniform(0.0, 1.0))
        service.process.send_signal(signal.SIGKILL)
        service.stop()
        if list(archive.glob(".*.tmp")):
            cut += 1
            break
    left = list(archive.glob(".*.tmp"))
    if not left:
        planted = True
        stale = archive / ".20250101T000000.000Z_line9_00000001_fail.png.999999.tmp"
        stale.write_bytes(b"\0" * (12 << 20))
        left = [stale]
    size = sum(p.stat().st_size for p in left) >> 20
    service = _LiveService(work, _service_data(big, bundle, **sections))
    service.messages(4)
    service.stop()
    remaining = [p for p in left if p.exists()]
    _verdict(not remaining, "16 SIGKILL during an archive write",
             f"{'no kill cut a write, one 12 MB .tmp planted' if planted else f'a kill left {len(left)} .tmp'} "
             f"({size} MB); {len(remaining)} of them after the next start, "
             f"{len(list(archive.glob('*.json')))} entries archived")


def runtime_attacks(connections: int, fd_limit: int, side: int) -> None:
    """Issue 29's runtime attacks against live services (about 5 minutes on the 2-core VM)."""
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        bundle, images = _runtime_world(work)
        attack_14_replay_bombs(work, bundle, side)
        attack_15_topic_prefix()
        attack_2_nan_graph(work, bundle, images)
        attack_5_misshapen_map(work, bundle, images)
        attack_8_fifo(work, bundle, images)
        attack_9_forged_log_line(work, bundle, images)
        attack_16_archive_tmp(work, bundle)
        attack_7_idle_connections(work, bundle, images, connections, fd_limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--connections", type=int, default=1100, help="attack 7: idle TCP connections")
    parser.add_argument("--fd-limit", type=int, default=1024, help="attack 7: the service's RLIMIT_NOFILE")
    parser.add_argument("--only-runtime", action="store_true", help="only issue 29's runtime attacks")
    args = parser.parse_args()
    if not args.only_runtime:
        bomb(args.side)
        control_message(args.megabytes)
    runtime_attacks(args.connections, args.fd_limit, args.side)


if __name__ == "__main__":
    main()
