"""Signed bundles, the reload folder rule and the verified model (issue 29, attacks 1 and 4), on real bundles,
real keys, a real running service and its real control socket."""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

from edge_inspector.core.bundle import Bundle, finalize_bundle
from edge_inspector.core.errors import BundleError, ConfigError
from edge_inspector.core.signing import SIGNATURE_FILE, TrustPolicy, generate_keypair, load_public_key
from edge_inspector.core.wire import send_control
from edge_inspector.service.app import Service
from edge_inspector.service.config import load_config
from edge_inspector.service.control import ControlServer
from export.commands.sign import sign_bundle
from service_helpers import PART, REPO, config_data, conveyor_frames, endpoint, subprocess_env, write_video


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=120)


def reissue(folder: Path, threshold: float) -> None:
    """Re-issue a bundle with another threshold and every digest recomputed (what an attacker with write
    access to a bundle copy can do; attack 4 used 1e6)."""
    meta = Bundle.load(folder, verify=False).meta
    meta.threshold.value = threshold
    finalize_bundle(folder, meta)


def test_keygen_and_sign_commands_make_a_bundle_a_device_accepts(bundle, tmp_path):
    key = tmp_path / "keys" / "workstation.key"
    done = run_cli("export.cli", "keygen", str(key))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and "PRIVATE KEY" in key.read_text()
    public = Path(str(key) + ".pub")
    assert "PUBLIC KEY" in public.read_text() and "PRIVATE" not in public.read_text()
    again = run_cli("export.cli", "keygen", str(key))
    assert again.returncode == 2 and "refusing to overwrite a key" in again.stderr
    copy = Path(shutil.copytree(bundle.path, tmp_path / "b"))
    done = run_cli("export.cli", "sign", str(copy), "--key", str(key))
    assert done.returncode == 0, done.stderr
    trusted = load_public_key(public)
    assert done.stdout.strip().endswith(f"{bundle.model_id} signed by key {trusted.key_id}")
    signed = Bundle.load(copy, trust=TrustPolicy([trusted], required=True))
    assert signed.signature is not None and signed.signature.key_id == trusted.key_id
    assert signed.model_id == bundle.model_id  # signing adds bundle.sig and changes nothing else
    key.chmod(0o644)
    done = run_cli("export.cli", "sign", str(copy), "--key", str(key))
    assert done.returncode == 2 and "readable by others" in done.stderr


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    """Two workstation keys: `ours` (trusted by the device) and `theirs` (not)."""
    ours, theirs = tmp_path / "keys" / "ours.key", tmp_path / "keys" / "theirs.key"
    generate_keypair(ours, Path(str(ours) + ".pub"))
    generate_keypair(theirs, Path(str(theirs) + ".pub"))
    return ours, theirs


def test_unsigned_foreign_tampered_or_forged_bundles_are_refused_naming_the_key(bundle, tmp_path, keys):
    ours, theirs = keys
    trusted = load_public_key(Path(str(ours) + ".pub"))
    required = TrustPolicy([trusted], required=True)
    copy = Path(shutil.copytree(bundle.path, tmp_path / "b"))
    with pytest.raises(BundleError, match=rf"{SIGNATURE_FILE}: missing: the bundle is unsigned and "
                                          r"security.require_signed_bundles is on"):
        Bundle.load(copy, trust=required)
    assert Bundle.load(copy, trust=TrustPolicy([trusted], required=False)).signature is None  # allowed: unsigned
    sign_bundle(copy, theirs)
    foreign = load_public_key(Path(str(theirs) + ".pub")).key_id
    for policy in (required, TrustPolicy([trusted], required=False)):  # a signature present is always checked
        with pytest.raises(BundleError, match=rf"signed by key '{foreign}', which is not one of "
                                              rf"security.trusted_keys \({trusted.key_id}; refused\)"):
            Bundle.load(copy, trust=policy)
    sign_bundle(copy, ours)
    assert Bundle.load(copy, trust=required).signature.key_id == trusted.key_id
    reissue(copy, bundle.threshold * 1e6)  # attack 4: threshold 1e6, digests recomputed, old bundle.sig kept
    with pytest.raises(BundleError, match="signs another bundle identity .* metadata or model changed after signing"):
        Bundle.load(copy, trust=required)
    sign_bundle(copy, ours)
    document = json.loads((copy / SIGNATURE_FILE).read_text())
    raw = bytearray(base64.b64decode(document["signature"]))
    raw[0] ^= 1
    document["signature"] = base64.b64encode(bytes(raw)).decode()
    (copy / SIGNATURE_FILE).write_text(json.dumps(document))
    with pytest.raises(BundleError, match=rf"signature does not verify with trusted key {trusted.key_id} "):
        Bundle.load(copy, trust=required)
    (copy / SIGNATURE_FILE).unlink()
    (tmp_path / "elsewhere.sig").write_text("x")
    (copy / SIGNATURE_FILE).symlink_to(tmp_path / "elsewhere.sig")
    with pytest.raises(BundleError, match="bundle.sig: a symbolic link"):
        Bundle.load(copy, trust=required)


def test_config_mistakes_about_signing_are_one_line(tmp_path, bundle):
    data = config_data("v.avi", bundle.path, security={"require_signed_bundles": True})
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="security.trusted_keys: required with require_signed_bundles"):
        load_config(path)
    data["security"]["trusted_keys"] = ["keys/missing.pub"]
    path.write_text(yaml.safe_dump(data))
    done = run_cli("edge_inspector.cli", "check-config", str(path))
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: {tmp_path / 'keys/missing.pub'}: public key not found"


# -- a running service that requires signed bundles ---------------------------------------------------------


@pytest.fixture
def line(bundle, tmp_path, keys):
    """A config in its own folder: bundles/ (the reload root) with a signed v1, keys/, relative paths only."""
    ours, _ = keys
    bundles = tmp_path / "bundles"
    v1 = Path(shutil.copytree(bundle.path, bundles / "v1"))
    sign_bundle(v1, ours)
    frames, _ = conveyor_frames(np.random.default_rng(5), 4, [True, False, True, False])
    video = write_video(tmp_path / "line.avi", frames)
    data = config_data(str(video), Path("bundles/v1"), camera={"fps": 10.0, "loop": True},
                       security={"trusted_keys": ["keys/ours.key.pub"], "require_signed_bundles": True,
                                 "bundle_root": "bundles"})
    path = tmp_path / "line.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, data, frames


def test_check_config_and_start_refuse_an_unsigned_bundle_in_one_line(line):
    path, data, _ = line
    done = run_cli("edge_inspector.cli", "check-config", str(path))
    assert done.returncode == 0 and "signed by key" in done.stdout, done.stderr
    (path.parent / "bundles" / "v1" / SIGNATURE_FILE).unlink()
    for command in ("check-config", "run"):
        done = run_cli("edge_inspector.cli", command, str(path))
        assert done.returncode == 2, done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]  # (run also logs)
        assert errors == [
            f"error: {path.parent / 'bundles/v1' / SIGNATURE_FILE}: missing: the bundle is unsigned and "
            "security.require_signed_bundles is on (sign it on the workstation: edge-export sign BUNDLE --key KEY)"]


def test_reload_takes_only_signed_bundles_under_the_bundle_root(line, keys, bundle, tmp_path, monkeypatch):
    path, data, _ = line
    ours, theirs = keys
    bundles = path.parent / "bundles"
    unsigned = Path(shutil.copytree(bundle.path, bundles / "unsigned"))
    foreign = Path(shutil.copytree(bundle.path, bundles / "foreign"))
    sign_bundle(foreign, theirs)
    v2 = Path(shutil.copytree(bundle.path, bundles / "v2"))
    reissue(v2, bundle.threshold * 2)
    sign_bundle(v2, ours)
    outside = Path(shutil.copytree(bundles / "v1", tmp_path / "tmp-copy"))  # signed, but not under the root
    monkeypatch.chdir(bundles / "v2")  # the working directory must never matter
    service = Service(load_config(path))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    runner.start()
    control = data["publish"]["control_endpoint"]
    try:
        assert service.ready.wait(60)
        first = send_control(control, "status")["model"]["id"]
        refused = {name: send_control(control, {"command": "reload", "bundle": str(folder)}, timeout_s=60)
                   for name, folder in (("unsigned", unsigned), ("foreign", foreign), ("outside", outside))}
        relative = send_control(control, {"command": "reload", "bundle": "bundles/v2"}, timeout_s=60)
        dotdot = send_control(control, {"command": "reload", "bundle": "bundles/../bundles/../keys"}, timeout_s=60)
        status = send_control(control, "status")
    finally:
        service.stop()
        runner.join(30)
    assert "missing: the bundle is unsigned" in refused["unsigned"]["error"]
    assert "which is not one of security.trusted_keys" in refused["foreign"]["error"]
    assert refused["outside"]["error"] == (f"{outside}: not a bundle folder under {bundles.resolve()} "
                                           "(security.bundle_root; refused)")
    assert relative["ok"], relative  # resolved against the config's folder, not the working directory
    assert relative["previous"] == first and relative["threshold"] == pytest.approx(bundle.threshold * 2)
    assert relative["signed_by"] == load_public_key(Path(str(ours) + ".pub")).key_id
    assert "not a bundle folder under" in dotdot["error"]
    assert status["model"]["id"] == relative["model_id"] and status["model"]["path"] == str(bundles / "v2")


def constant_zero_model(path: Path) -> None:
    """An ONNX graph with the bundle contract's inputs and outputs that scores every part 0.0 (attack 1)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", ["f"], ["m"], axes=[3], keepdims=0),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
             helper.make_node("Mul", ["m", "zero"], ["anomaly_map"]),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2], keepdims=0)]
    graph = helper.make_graph(
        nodes, "zero", [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", PART, PART, 3])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", PART, PART]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_a_model_renamed_back_and_forth_during_reloads_never_runs_unverified(line, tmp_path):
    """Attack 1: reload while model.onnx flips between the real file and a constant-zero model. Before, 3 of
    13 reloads ran the zero model under the genuine id. Each reload must fail cleanly or run the real model."""
    path, data, frames = line
    folder = path.parent / "bundles" / "v1"
    zero, stash = tmp_path / "zero.onnx", tmp_path / "genuine.onnx"
    constant_zero_model(zero)
    tiles = np.stack([frames[0][:, :PART], frames[0][:, PART:]])  # a real frame's two lanes, one a defect
    service = Service(load_config(path))
    runner = threading.Thread(target=service.run, kwargs={"install_signals": False})
    runner.start()
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        while not stop.is_set():
            (folder / "model.onnx").rename(stash)
            zero.rename(folder / "model.onnx")
            time.sleep(0.002)
            (folder / "model.onnx").rename(zero)
            stash.rename(folder / "model.onnx")
            time.sleep(0.002)
            flips[0] += 1

    control = data["publish"]["control_endpoint"]
    outcomes: list[tuple[bool, str, list[float]]] = []
    flipper = threading.Thread(target=flip)
    try:
        assert service.ready.wait(60)
        genuine = service.inspector.settings()[0].backend.infer(tiles).scores.tolist()
        assert max(genuine) > 0
        flipper.start()
        for _ in range(60):
            reply = send_control(control, {"command": "reload", "bundle": str(folder)}, timeout_s=60)
            model = service.inspector.settings()[0]
            outcomes.append((reply["ok"], reply.get("error", ""), model.backend.infer(tiles).scores.tolist()))
            if sum(ok for ok, _, _ in outcomes) >= 5 and sum(not ok for ok, _, _ in outcomes) >= 5:
                break
    finally:
        stop.set()
        if flipper.ident is not None:
            flipper.join(10)
        service.stop()
        runner.join(30)
    assert flips[0] > 0
    assert any(ok for ok, _, _ in outcomes) and any(not ok for ok, _, _ in outcomes), outcomes
    for ok, error, scores in outcomes:
        assert scores == pytest.approx(genuine, rel=1e-5), (ok, error)  # the genuine model, every time
        assert ok or "sha256 mismatch" in error or "missing" in error, error


# -- reload off the control thread ---------------------------------------------------------------------------


def test_status_is_answered_while_a_reload_runs_and_stop_never_waits_for_it():
    """The control socket stays live during a slow command, answers it when done, and closes under it."""
    release, entered = threading.Event(), threading.Event()

    def slow_reload(_request):
        entered.set()
        release.wait(30)
        return {"model_id": "m2"}

    context = zmq.Context()  # its own: term() below must not end the clients' shared context
    server = ControlServer(endpoint(), {"status": lambda r: {"state": "ok"}, "reload": slow_reload}, context=context,
                           slow=("reload",))
    server.start()
    replies: dict[str, dict] = {}
    waiter = threading.Thread(target=lambda: replies.update(reload=send_control(server.endpoint, "reload",
                                                                                 timeout_s=30)))
    try:
        waiter.start()
        assert entered.wait(10)
        assert send_control(server.endpoint, "status", timeout_s=2) == {"ok": True, "state": "ok"}
        second = send_control(server.endpoint, "reload", timeout_s=2)
        assert second["ok"] is False and "a reload is already running" in second["error"]
        release.set()
        waiter.join(10)
        assert replies["reload"] == {"ok": True, "model_id": "m2"}
        release.clear()
        entered.clear()
        def unanswered() -> None:
            with pytest.raises(TimeoutError):
                send_control(server.endpoint, "reload", timeout_s=2)

        late = threading.Thread(target=unanswered, daemon=True)
        late.start()
        assert entered.wait(10)
    finally:
        started = time.monotonic()
        server.stop()  # a reload is still running: the socket closes anyway
        context.term()  # returns only once every socket is closed (it hung before)
        stopped = time.monotonic() - started
        release.set()
    assert stopped < 5


def test_an_engine_recorded_after_signing_is_never_used_when_signatures_are_required(bundle, tmp_path, keys):
    """Engines stay out of the identity (a device builds its own), so the signature lists the engines/ files
    it covers; one added later, or replaced with its sha256 re-recorded, is left out under require_signed."""
    ours, _ = keys
    trusted = load_public_key(Path(str(ours) + ".pub"))
    copy = Path(shutil.copytree(bundle.path, tmp_path / "b"))
    (copy / "engines").mkdir()
    (copy / "engines" / "gpu_sm87_trt10_fp16.engine").write_bytes(b"an engine built on the reference device")
    Bundle.load(copy, verify=False).add_file("engines/gpu_sm87_trt10_fp16.engine")
    sign_bundle(copy, ours)
    required, checked = TrustPolicy([trusted], required=True), TrustPolicy([trusted], required=False)
    assert "engines/gpu_sm87_trt10_fp16.engine" in Bundle.load(copy, trust=required).meta.files
    (copy / "engines" / "gpu_sm87_trt10_fp16.engine").write_bytes(b"a planted engine scoring every part 0.0")
    Bundle.load(copy, verify=False).add_file("engines/gpu_sm87_trt10_fp16.engine")  # sha256 re-recorded
    (copy / "engines" / "other_sm72_trt10_fp32.engine").write_bytes(b"recorded by a device after signing")
    Bundle.load(copy, verify=False).add_file("engines/other_sm72_trt10_fp32.engine")
    loaded = Bundle.load(copy, trust=required)
    assert loaded.signature is not None and loaded.model_id == bundle.model_id
    assert not [rel for rel in loaded.meta.files if rel.startswith("engines/")] and loaded.signed_only
    assert len([rel for rel in Bundle.load(copy, trust=checked).meta.files if rel.startswith("engines/")]) == 2
