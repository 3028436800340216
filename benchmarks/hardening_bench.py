"""What hostile input costs the service now: an oversized control message and a decompression-bomb PNG.

    python benchmarks/hardening_bench.py [--megabytes 100] [--side 20000]

Prints the service-side RSS before/after a control message of --megabytes (refused by ZMQ_MAXMSGSIZE), and
the time and RSS to get a frame result for a --side x --side 1-bit PNG from the folder source (refused from
its header). Run on demand; figures, not assertions. The view section (`view_section`) runs attacks 11-13
of issue 29 at full size against an `edge-inspector view` process.
"""

from __future__ import annotations

import argparse
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

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


# --- view (issue 29, attacks 11-13 at full size) ---------------------------------------------------------
# The view runs as its own process (`edge-inspector view`, as under systemd), with nothing behind --connect;
# its threads, file descriptors and RSS are read from /proc. Each attack prints one line: held / failed.


def view_process(port: int, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "edge_inspector.cli", "view", "--connect", "tcp://127.0.0.1:9",
               "--control", "tcp://127.0.0.1:9", "--listen", f"127.0.0.1:{port}", *options]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the view did not start within 60 s")


def proc_figures(pid: int) -> tuple[int, int, float]:
    """(threads, open file descriptors, RSS MB) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(fields["Threads"]), len(list(Path(f"/proc/{pid}/fd").iterdir())),
            int(fields["VmRSS"].split()[0]) / 1024)


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def verdict(held: bool) -> str:
    return "held" if held else "FAILED"


def view_rebinding(port: int) -> None:
    """Attack 10: a rebinding page posts a threshold and reads the config under its own Host and Origin."""
    replies = []
    for request in (f"POST /api/control/line9/threshold HTTP/1.1\r\nHost: evil.example:{port}\r\n"
                    f"Origin: http://evil.example:{port}\r\nContent-Type: application/json\r\n"
                    "Content-Length: 15\r\n\r\n{\"value\": 23.0}",
                    f"GET /api/control/line9/status HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n",
                    f"GET /api/state HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(request.encode())
            replies.append(sock.recv(100).split(b"\r\n")[0].decode())
    print(f"view 10 rebinding: threshold POST, status and state under Host evil.example -> {replies}: "
          f"{verdict(all(' 421 ' in r for r in replies))}")


def view_big_body(port: int, pid: int, megabytes: int = 250) -> None:
    """Attack 11: unauthenticated POST with a huge body, and with Content-Length: -1."""
    before = proc_figures(pid)[2]
    replies = []
    for length in (str(megabytes << 20), "-1"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(f"POST /api/control/line9/threshold HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n".encode())
            chunk, sent = b"{" * (1 << 20), 0
            try:
                while sent < megabytes:
                    sock.sendall(chunk)
                    sent += 1
            except OSError:
                pass
            try:
                replies.append(sock.recv(200).split(b"\r\n")[0].decode() or "closed")
            except OSError as err:
                replies.append(type(err).__name__)
    after = proc_figures(pid)[2]
    print(f"view 11 body: {megabytes} MB unauthenticated body and Content-Length -1 -> {replies}, "
          f"RSS {before:.0f} -> {after:.0f} MB: {verdict(after - before < 20)}")


def view_streams(port: int, count: int = 16) -> None:
    """Attack 12: `count` /events streams held from one address, then a browser from another."""
    def stream(source: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return sock, sock.recv(100).split(b"\r\n")[0]

    held = [stream("127.0.0.1")[0] for _ in range(count)]
    sock, status = stream("127.0.0.2")
    print(f"view 12 streams: {count} streams held from 127.0.0.1, then a browser from 127.0.0.2 -> "
          f"{status.decode()}: {verdict(b' 200 ' in status)}")
    for each in held + [sock]:
        each.close()


def view_slowloris(port: int, pid: int, count: int = 400, timeout_s: float = 5.0) -> None:
    """Attack 13: `count` half-sent requests; the view's threads and descriptors, then after the timeout."""
    base = proc_figures(pid)
    socks = []
    for i in range(count):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-{i}: ".encode())
            socks.append(sock)
        except OSError:
            break
    time.sleep(1.0)
    during = proc_figures(pid)
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as probe:
        probe.sendall(f"GET /api/view HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answered = probe.recv(100).split(b"\r\n")[0].decode()
    time.sleep(timeout_s + 2.0)
    after = proc_figures(pid)
    for sock in socks:
        sock.close()
    held = during[0] - base[0] < 40 and after[1] - base[1] < 10 and " 200 " in answered
    print(f"view 13 slowloris: {len(socks)} half-sent requests -> threads {base[0]} -> {during[0]} -> "
          f"{after[0]}, fds {base[1]} -> {during[1]} -> {after[1]} ({timeout_s:g} s later); another client "
          f"got {answered!r}: {verdict(held)}")


def view_section(sockets: int = 400) -> None:
    port = free_local_port()
    process = view_process(port, "--request-timeout", "5")
    try:
        view_rebinding(port)
        view_big_body(port, process.pid)
        view_streams(port)
        view_slowloris(port, process.pid, sockets)
    finally:
        process.terminate()
        process.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--side", type=int, default=20000)
    args = parser.parse_args()
    bomb(args.side)
    control_message(args.megabytes)
    view_section()


if __name__ == "__main__":
    main()
