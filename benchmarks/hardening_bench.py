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
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--side", type=int, default=20000)
    parser.add_argument("--yaml-megabytes", type=int, default=60, help="size of the oversized bundle.yaml")
    args = parser.parse_args()
    bomb(args.side)
    control_message(args.megabytes)
    view_section()
    trust_attacks(args.yaml_megabytes)


if __name__ == "__main__":
    main()
