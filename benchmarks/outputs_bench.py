"""What the MQTT and OPC UA outputs cost at 20 parts/s (issue 33, item 5; run on demand, asserts nothing).

    nice python benchmarks/outputs_bench.py                   # needs mosquitto, paho-mqtt and asyncua
    python benchmarks/outputs_bench.py --rate 20 --seconds 5

For each output, a real one (MQTT: a mosquitto started on a free loopback port; OPC UA: the asyncua server
on a free loopback port, with one asyncua client subscribed to LastVerdict and Sequence so the server does
its real work) is fed result headers of the ZeroMQ header's real shape at `--rate` per second through the
fan-out's queue (outputs/base.py). Printed: the cost on the publish thread per result (the submit; median
and p99, microseconds), the output thread's time per result (median, ms), and the process CPU per result
(ms, including paho's or asyncua's own threads and the test client's) and as a share of one core.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from edge_inspector.service.outputs.base import Message, QueuedOutput, Totals
from edge_inspector.service.outputs.config import MqttConfig, OpcuaConfig


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def header(sequence: int) -> dict[str, Any]:
    """A result header of the real shape and size (1x2 tiles, one defect box): ~1.3 kB of JSON."""
    return {"schema_version": 1, "type": "inspection", "sequence": sequence, "frame_index": sequence,
            "camera_id": "line1", "capture_time": time.time(), "capture_time_iso": "2026-12-08T00:00:00.000+00:00",
            "verdict": "fail" if sequence % 7 == 0 else "pass", "score": 12.345678, "normalised_score": 0.81234,
            "threshold": 15.2, "min_defect_area": 0, "tile_scores": [11.2, 12.345678],
            "tile_boxes": [[0, 0, 128, 128], [128, 0, 128, 128]],
            "defects": [{"x": 12, "y": 40, "width": 18, "height": 9, "area": 120, "peak": 1.4}],
            "largest_defect_area": 120, "frame": {"width": 256, "height": 128},
            "heatmap": {"format": "png", "width": 32, "height": 16, "full_scale": 2.0},
            "latency_ms": {k: 1.234 for k in ("capture", "queue", "tiling", "inference", "decision", "encode",
                                              "total")},
            "model": {"id": "padim-1x2-20261208", "sha256": "ab" * 32}, "error": None,
            "source_file": "/data/line1/000123.png"}


def measure(output: QueuedOutput, rate: float, seconds: float) -> None:
    count = int(rate * seconds)
    submit_us: list[float] = []
    send_ms: list[float] = []
    inner = output.output
    original = inner.send

    def timed(message: Message) -> None:
        start = time.perf_counter()
        original(message)
        send_ms.append((time.perf_counter() - start) * 1000)

    inner.send = timed  # type: ignore[method-assign]
    cpu0, wall0 = time.process_time(), time.monotonic()
    for sequence in range(1, count + 1):
        message = Message("result", header(sequence), Totals(sequence, sequence // 7))
        start = time.perf_counter()
        output.submit(message)
        submit_us.append((time.perf_counter() - start) * 1e6)
        time.sleep(max(0.0, wall0 + sequence / rate - time.monotonic()))
    deadline = time.monotonic() + 10
    while output.sent + output.dropped + output.errors < count and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    quantiles = statistics.quantiles(submit_us, n=100)
    print(f"{output.name:6s} {count} results at {rate:g}/s: submit median {statistics.median(submit_us):.1f} us, "
          f"p99 {quantiles[98]:.1f} us; output thread {statistics.median(send_ms):.2f} ms/result (median); "
          f"process CPU {cpu / count * 1000:.2f} ms/result = {cpu / wall * 100:.1f}% of a core; sent {output.sent}, "
          f"dropped {output.dropped}, errors {output.errors}")


def bench_mqtt(rate: float, seconds: float) -> None:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(mosquitto).exists():
        print("mqtt: mosquitto not installed, skipped")
        return
    from edge_inspector.service.outputs.mqtt import MqttOutput

    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="mqttbench"))
    (folder / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen([mosquitto, "-c", str(folder / "m.conf")], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        output = QueuedOutput(MqttOutput(MqttConfig(port=port), "line1", Path), 1000)
        output.start()
        deadline = time.monotonic() + 10
        while not output.output.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        measure(output, rate, seconds)
        output.close()
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def bench_opcua(rate: float, seconds: float) -> None:
    import asyncua

    from edge_inspector.service.outputs.opcua import OpcuaOutput

    url = f"opc.tcp://127.0.0.1:{free_port()}/edge-inspector/"
    output = QueuedOutput(OpcuaOutput(OpcuaConfig(endpoint=url), "line1", Path), 100)
    output.start()
    stop = threading.Event()
    changes = [0]

    class Handler:
        def datachange_notification(self, _node: Any, _value: Any, _data: Any) -> None:
            changes[0] += 1

    async def subscribe() -> None:
        async with asyncua.Client(url) as client:
            index = await client.get_namespace_index("urn:edge-inspector")
            subscription = await client.create_subscription(50, Handler())
            await subscription.subscribe_data_change([client.get_node(f"ns={index};s=line1.{name}")
                                                      for name in ("LastVerdict", "Sequence")])
            while not stop.is_set():
                await asyncio.sleep(0.05)

    client_thread = threading.Thread(target=lambda: asyncio.run(subscribe()), daemon=True)
    client_thread.start()
    time.sleep(1.0)
    measure(output, rate, seconds)
    stop.set()
    client_thread.join(5)
    print(f"opcua  client saw {changes[0]} data changes (50 ms publishing interval)")
    output.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    bench_mqtt(args.rate, args.seconds)
    bench_opcua(args.rate, args.seconds)


if __name__ == "__main__":
    main()
