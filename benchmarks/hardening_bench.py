"""What hostile input costs the service now: an oversized control message and a decompression-bomb PNG.

    python benchmarks/hardening_bench.py [--megabytes 100] [--side 20000]

Prints the service-side RSS before/after a control message of --megabytes (refused by ZMQ_MAXMSGSIZE), and
the time and RSS to get a frame result for a --side x --side 1-bit PNG from the folder source (refused from
its header). Run on demand; figures, not assertions.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--side", type=int, default=20000)
    args = parser.parse_args()
    bomb(args.side)
    control_message(args.megabytes)


if __name__ == "__main__":
    main()
