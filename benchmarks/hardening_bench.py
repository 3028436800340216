"""What hostile input costs the service now: an oversized control message and a decompression-bomb PNG.

    python benchmarks/hardening_bench.py [--megabytes 100] [--side 20000]

Prints the service-side RSS before/after a control message of --megabytes (refused by ZMQ_MAXMSGSIZE), and
the time and RSS to get a frame result for a --side x --side 1-bit PNG from the folder source (refused from
its header). Run on demand; figures, not assertions. The view section (`view_section`) runs attacks 10-13
of issue 29 at full size against an `edge-inspector view` process.

`trust_attacks` (issue 29, attacks 1, 3, 4, 6) prints one `held`/`failed` line per attack: a reload during a
model.onnx rename race, a symlinked bundle.yaml, billion laughs, a --yaml-megabytes bundle.yaml and the worst
documents under the 1 MiB cap (check-config and reload times, status answered meanwhile), re-issued, unsigned
and foreign-signed bundles under require_signed_bundles, and SIGTERM during a reload.

`runtime_attacks` (issue 29, attacks 2, 5, 7, 8, 9, 14, 15, 16) prints one `held`/`failed` line per attack, each
against a live `edge-inspector run`: NaN and misshapen graphs, idle connections past the fd limit, a FIFO, a
forged log line, bombs given to replay, topic prefixes, SIGKILL during an archive write.
"""

from __future__ import annotations

import argparse
import json
import os
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

import numpy as np
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

# -- issue 29, attacks 1, 3, 4, 6: the model that runs is the one verified; parsing is bounded ----------------
#
# Each attack runs against a real service (in this process: its real control socket) or the real CLI, on a
# small real PaDiM bundle fitted here (tests/service_helpers.fitted_bundle, ~20 s on 2 cores), and prints one
# `held` or `failed` line with what it measured.


def verdict(held: bool, name: str, detail: str) -> None:
    print(f"{'held' if held else 'failed'}: {name}: {detail}")


class TrustLine:
    """A service config in its own folder: bundles/v1 signed by keys/ours.key, reload root bundles/."""

    def __init__(self, base: Path, bundle_path: Path, require_signed: bool = True):
        import shutil

        import yaml

        from edge_inspector.core.signing import generate_keypair
        from export.commands.sign import sign_bundle
        from service_helpers import config_data, conveyor_frames, write_video

        self.base = base
        self.key = base / "keys" / "ours.key"
        generate_keypair(self.key, Path(str(self.key) + ".pub"))
        self.bundles = base / "bundles"
        self.v1 = Path(shutil.copytree(bundle_path, self.bundles / "v1"))
        sign_bundle(self.v1, self.key)
        self.frames, _ = conveyor_frames(np.random.default_rng(5), 4, [True, False, True, False])
        video = write_video(base / "line.avi", self.frames)
        self.data = config_data(str(video), Path("bundles/v1"), camera={"fps": 10.0, "loop": True},
                                security={"trusted_keys": ["keys/ours.key.pub"],
                                          "require_signed_bundles": require_signed, "bundle_root": "bundles"})
        self.config = base / "line.yaml"
        self.config.write_text(yaml.safe_dump(self.data))
        self.control = self.data["publish"]["control_endpoint"]

    def copy(self, name: str, root: Path | None = None) -> Path:
        import shutil

        return Path(shutil.copytree(self.v1, (root or self.bundles) / name))

    def start(self):
        from edge_inspector.service.app import Service
        from edge_inspector.service.config import load_config

        service = Service(load_config(self.config))
        runner = threading.Thread(target=service.run, kwargs={"install_signals": False}, daemon=True)
        runner.start()
        if not service.ready.wait(60):
            raise RuntimeError("service did not start")
        return service, runner


def stop(service, runner) -> None:
    service.stop()
    runner.join(30)


def reload_timed(line: TrustLine, folder: Path) -> tuple[dict, float, list[float]]:
    """Reload `folder`; meanwhile ask status every 50 ms: (reply, seconds, status round trips in ms)."""
    replies: dict = {}
    started = time.monotonic()
    worker = threading.Thread(target=lambda: replies.update(send_control(
        line.control, {"command": "reload", "bundle": str(folder)}, timeout_s=120)))
    worker.start()
    rtts = []
    while worker.is_alive():
        t = time.monotonic()
        try:
            send_control(line.control, "status", timeout_s=5)
            rtts.append((time.monotonic() - t) * 1000)
        except TimeoutError:
            rtts.append(float("inf"))
        time.sleep(0.05)
    worker.join()
    return replies, time.monotonic() - started, rtts


def zero_model(path: Path, side: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["f"], ["m"], axes=[3], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Mul", ["m", "zero"], ["anomaly_map"]),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0)]
    graph = helper.make_graph(
        nodes, "zero", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", side, side, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", side, side]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def attack_reload_race(base: Path, bundle_path: Path, tries: int = 13) -> None:
    """Attack 1: reload while model.onnx is renamed back and forth with a constant-zero model."""
    line = TrustLine(base / "race", bundle_path)
    folder, zero, stash = line.v1, base / "race" / "zero.onnx", base / "race" / "genuine.onnx"
    side = 128
    zero_model(zero, side)
    tiles = np.stack([line.frames[0][:, :side], line.frames[0][:, side:2 * side]])
    service, runner = line.start()
    halt = threading.Event()

    def flip() -> None:
        while not halt.is_set():
            (folder / "model.onnx").rename(stash)
            zero.rename(folder / "model.onnx")
            time.sleep(0.002)
            (folder / "model.onnx").rename(zero)
            stash.rename(folder / "model.onnx")
            time.sleep(0.002)

    flipper = threading.Thread(target=flip)
    ok = wrong = refused = 0
    try:
        genuine = service.inspector.settings()[0].backend.infer(tiles).scores
        flipper.start()
        for _ in range(tries):
            reply = send_control(line.control, {"command": "reload", "bundle": str(folder)}, timeout_s=60)
            scores = service.inspector.settings()[0].backend.infer(tiles).scores
            if not reply["ok"]:
                refused += 1
            elif np.allclose(scores, genuine, rtol=1e-5):
                ok += 1
            else:
                wrong += 1
    finally:
        halt.set()
        if flipper.ident is not None:
            flipper.join(10)
        stop(service, runner)
    verdict(wrong == 0, "reload during a model.onnx rename race",
            f"{tries} reloads: {ok} ran the genuine model, {refused} refused cleanly, {wrong} ran another model")


def attack_symlinked_bundle_yaml(base: Path, bundle_path: Path) -> None:
    """Attack 3: reload a folder whose bundle.yaml links to a file the client cannot read (here: a token)."""
    line = TrustLine(base / "link", bundle_path, require_signed=False)
    token = base / "link" / "view.token"
    token.write_text("s3cret-operator-token-0123456789\n")
    target = line.copy("linked")
    (target / "bundle.yaml").unlink()
    (target / "bundle.yaml").symlink_to(token)
    service, runner = line.start()
    try:
        reply = send_control(line.control, {"command": "reload", "bundle": str(target)}, timeout_s=60)
    finally:
        stop(service, runner)
    leaked = "s3cret" in json.dumps(reply)
    verdict(not reply["ok"] and not leaked, "reload of a bundle.yaml symlinked to a secret",
            f"reply: {reply.get('error', reply)}")


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [{','.join(['*' + chr(96 + i)] * 9)}]")
    return "\n".join(lines) + "\n"


def check_config_seconds(config: Path) -> tuple[int, float, str]:
    import subprocess

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "check-config", str(config)],
                          capture_output=True, text=True, timeout=300)
    return done.returncode, time.monotonic() - started, (done.stderr or done.stdout).strip().splitlines()[-1]


def check_in_process_seconds(config: Path) -> float:
    """What check-config does past its start-up: the config, then the bundle it names (refused or loaded)."""
    from edge_inspector.core.bundle import Bundle
    from edge_inspector.core.errors import InspectorError
    from edge_inspector.service.config import load_config

    started = time.monotonic()
    try:
        Bundle.load(load_config(config).bundle_path)
    except InspectorError:
        pass
    return time.monotonic() - started


def attack_hostile_bundle_yaml(base: Path, bundle_path: Path, megabytes: int = 60) -> None:
    """Attack 6: billion laughs, a 60 MB bundle.yaml and the worst documents under the 1 MiB cap, each through
    check-config (a fresh CLI process: its start-up, ~1 s here, is included) and through reload while status
    is asked every 50 ms."""
    import yaml

    from edge_inspector.core.schema import MAX_YAML_BYTES

    line = TrustLine(base / "yaml", bundle_path, require_signed=False)
    cap = MAX_YAML_BYTES - 16
    documents = {
        "billion laughs": billion_laughs().encode(),
        f"{megabytes} MB bundle.yaml": b"k: [" + b"0," * (megabytes << 19) + b"0]\n",
        "1 MiB flow list of 0": b"files: [" + b"0," * (cap // 2) + b"0]\n",
        "1 MiB of {k: 0} mappings": b"files: [" + b"{k: 0}," * (cap // 7) + b"{}]\n",
        "1 MiB block mapping": b"".join(f"k{i:06d}: 0\n".encode() for i in range(cap // 11)),
        "1 MiB string": b"k: '" + b"x" * (cap - 8) + b"'\n",
    }
    service, runner = line.start()
    _, baseline_s, _ = check_config_seconds(line.config)  # the CLI's own start-up (imports), a valid bundle
    print(f"check-config CLI on the genuine bundle: {baseline_s:.2f} s (mostly its start-up), "
          f"{check_in_process_seconds(line.config) * 1000:.0f} ms of it checking")
    try:
        for name, text in documents.items():
            folder = line.copy(name.replace(" ", "-"))
            (folder / "bundle.yaml").write_bytes(text)
            data = dict(line.data, model={**line.data["model"], "bundle": str(folder)})
            config = folder.parent / f"{folder.name}.yaml"
            config.write_text(yaml.safe_dump(data))
            code, cli_s, last = check_config_seconds(config)
            check_s = check_in_process_seconds(config)
            reply, reload_s, rtts = reload_timed(line, folder)
            worst = max(rtts, default=0.0)
            held = code == 2 and not reply["ok"] and reload_s < 1.0 and worst < 1000 and check_s < 1.0
            verdict(held, name, f"{len(text) / 1e6:.2f} MB: check-config exit {code} in {cli_s:.2f} s "
                                f"({check_s * 1000:.0f} ms checking); reload "
                                f"refused in {reload_s * 1000:.0f} ms, status answered {len(rtts)}x during it "
                                f"(worst {worst:.0f} ms): {reply.get('error', '')[-90:]}")
    finally:
        stop(service, runner)


def attack_unsigned_under_require_signed(base: Path, bundle_path: Path) -> None:
    """Attack 4 (and the signature rule): a copy with threshold 1e6, digests recomputed, in /tmp and under the
    reload root; an unsigned bundle; one signed by a key the device does not trust."""
    from edge_inspector.core.bundle import Bundle, finalize_bundle
    from edge_inspector.core.signing import generate_keypair
    from export.commands.sign import sign_bundle

    line = TrustLine(base / "signed", bundle_path)
    outside = base / "signed-elsewhere"
    outside.mkdir()
    copies = {"a threshold 1e6 copy outside bundle_root": line.copy("high", outside),
              "a threshold 1e6 copy under bundle_root (old bundle.sig kept)": line.copy("high")}
    for folder in copies.values():
        meta = Bundle.load(folder, verify=False).meta
        meta.threshold.value = 1e6
        finalize_bundle(folder, meta)
    unsigned = line.copy("unsigned")
    (unsigned / "bundle.sig").unlink()
    copies["an unsigned bundle"] = unsigned
    theirs = base / "signed" / "keys" / "theirs.key"
    generate_keypair(theirs, Path(str(theirs) + ".pub"))
    foreign = line.copy("foreign")
    sign_bundle(foreign, theirs)
    copies["a bundle signed by an untrusted key"] = foreign
    service, runner = line.start()
    try:
        for name, folder in copies.items():
            reply = send_control(line.control, {"command": "reload", "bundle": str(folder)}, timeout_s=60)
            threshold = service.inspector.settings()[1].threshold
            verdict(not reply["ok"] and threshold < 1e6, f"reload of {name}",
                    f"threshold still {threshold:.4g}: {reply.get('error', reply)}")
    finally:
        stop(service, runner)


def attack_sigterm_during_reload(base: Path, bundle_path: Path, gigabytes: float = 3.0) -> None:
    """SIGTERM while a reload hashes a large bundle (a sparse file listed in bundle.yaml): the service exits."""
    import os
    import signal
    import subprocess

    from edge_inspector.core.bundle import Bundle, write_meta

    line = TrustLine(base / "term", bundle_path, require_signed=False)
    big = line.copy("big")
    with open(big / "weights.bin", "wb") as handle:
        handle.truncate(int(gigabytes * 1e9))
    meta = Bundle.load(big, verify=False).meta
    meta.files["weights.bin"] = "0" * 64  # wrong on purpose: the reload hashes all of it, then refuses
    write_meta(big, meta)
    process = subprocess.Popen([sys.executable, "-m", "edge_inspector.cli", "run", str(line.config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                send_control(line.control, "status", timeout_s=1)
                break
            except TimeoutError:
                time.sleep(0.2)
        reloader = threading.Thread(target=lambda: _ignore_timeout(line.control, big), daemon=True)
        reloader.start()
        time.sleep(0.5)
        answered = send_control(line.control, "status", timeout_s=5)["ok"]
        started = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        try:
            code = process.wait(20)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    verdict(code == 0 and answered, "SIGTERM during a reload",
            f"status answered during the reload: {answered}; exit {code} {seconds:.2f} s after SIGTERM")


def _ignore_timeout(control: str, folder: Path) -> None:
    try:
        send_control(control, {"command": "reload", "bundle": str(folder)}, timeout_s=60)
    except TimeoutError:
        pass


def trust_attacks(megabytes: int = 60) -> None:
    """Attacks 1, 3, 4, 6 of issue 29 on one small fitted bundle."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from service_helpers import fitted_bundle

    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        bundle = fitted_bundle(base / "fit")
        attack_reload_race(base, bundle.path)
        attack_symlinked_bundle_yaml(base, bundle.path)
        attack_hostile_bundle_yaml(base, bundle.path, megabytes)
        attack_unsigned_under_require_signed(base, bundle.path)
        attack_sigterm_during_reload(base, bundle.path)


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


def held_word(held: bool) -> str:
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
          f"{held_word(all(' 421 ' in r for r in replies))}")


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
          f"RSS {before:.0f} -> {after:.0f} MB: {held_word(after - before < 20)}")


def view_streams(port: int, count: int = 16) -> None:
    """Attack 12: `count` /events streams held from one address, then a browser from another."""
    def stream(source: str) -> tuple[socket.socket, bytes]:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        sock.sendall(f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        return sock, sock.recv(100).split(b"\r\n")[0]

    held = [stream("127.0.0.1")[0] for _ in range(count)]
    sock, status = stream("127.0.0.2")
    print(f"view 12 streams: {count} streams held from 127.0.0.1, then a browser from 127.0.0.2 -> "
          f"{status.decode()}: {held_word(b' 200 ' in status)}")
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
          f"got {answered!r}: {held_word(held)}")


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
    parser.add_argument("--yaml-megabytes", type=int, default=60, help="size of the oversized bundle.yaml")
    parser.add_argument("--connections", type=int, default=1100, help="attack 7: idle TCP connections")
    parser.add_argument("--fd-limit", type=int, default=1024, help="attack 7: the service's RLIMIT_NOFILE")
    parser.add_argument("--only-runtime", action="store_true", help="only issue 29's runtime attacks")
    args = parser.parse_args()
    if not args.only_runtime:
        bomb(args.side)
        control_message(args.megabytes)
        view_section()
        trust_attacks(args.yaml_megabytes)
    runtime_attacks(args.connections, args.fd_limit, args.side)


if __name__ == "__main__":
    main()
