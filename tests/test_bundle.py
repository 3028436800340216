"""bundle.yaml is protected like model.onnx: types, digest, model id, file paths, unreadable files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_inspector.core.bundle import BUNDLE_FILE, FORMAT_VERSION, Bundle, finalize_bundle, meta_digest, write_meta
from edge_inspector.core.errors import BundleError
from service_helpers import (
    copy_world_readable,
    shared_folder,
    unprivileged_run,
)


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    return Path(shutil.copytree(bundle.path, tmp_path / "bundle"))


def edit_yaml(folder: Path, change, keep_digest: bool = True) -> None:
    """Edit bundle.yaml as a text editor would (the recorded digest is left as it was unless told)."""
    path = folder / BUNDLE_FILE
    data = yaml.safe_load(path.read_text())
    change(data)
    if not keep_digest:
        data["meta_sha256"] = meta_digest(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_value_of_the_wrong_type_is_one_line_naming_file_and_key(copy):
    edit_yaml(copy, lambda d: d["threshold"].__setitem__("value", "4.2"))
    with pytest.raises(BundleError) as err:
        Bundle.load(copy)
    message = str(err.value)
    assert message == f"{copy / BUNDLE_FILE}: threshold.value: expected a number > 0, got '4.2'"
    edit_yaml(copy, lambda d: d.__setitem__("input_size", [128, "x"]))
    with pytest.raises(BundleError, match=r"input_size: expected a list of 2 integers >= 1, got \[128, 'x'\]"):
        Bundle.load(copy)


def test_a_one_byte_threshold_edit_is_refused_and_a_re_digested_one_changes_the_model_id(bundle, copy):
    text = (copy / BUNDLE_FILE).read_text()
    value = yaml.safe_load(text)["threshold"]["value"]
    (copy / BUNDLE_FILE).write_text(text.replace(f"value: {value}", f"value: {value * 1.3}", 1))
    with pytest.raises(BundleError, match="meta_sha256 mismatch"):
        Bundle.load(copy)
    # Someone who recomputes the digest gets the edit loaded, but never unseen: the model id changes.
    edit_yaml(copy, lambda d: None, keep_digest=False)
    edited = Bundle.load(copy)
    assert edited.threshold == pytest.approx(value * 1.3)
    assert edited.sha256 == bundle.sha256  # same graph ...
    assert edited.model_id != bundle.model_id  # ... but another model id on the wire
    assert edited.model_id.rsplit("-", 1)[0] == bundle.model_id.rsplit("-", 1)[0]


def test_a_format_2_bundle_loads_without_map_blur_sigma(copy):
    """Bundles from before map_blur_sigma (format 2) still load: their map counts as unblurred (auto then
    sends one heatmap pixel per model pixel, as it did); a newer format is refused with one line."""
    assert Bundle.load(copy).meta.map_blur_sigma == 4.0
    def downgrade(data):
        del data["map_blur_sigma"]
        data["format_version"] = 2
    edit_yaml(copy, downgrade, keep_digest=False)
    assert Bundle.load(copy).meta.map_blur_sigma == 0.0
    edit_yaml(copy, lambda d: d.__setitem__("map_blur_sigma", -1), keep_digest=False)
    with pytest.raises(BundleError, match=r"map_blur_sigma: expected a number in \[0, 1024\], got -1"):
        Bundle.load(copy)
    edit_yaml(copy, lambda d: d.__setitem__("map_blur_sigma", float("inf")), keep_digest=False)
    with pytest.raises(BundleError, match=r"map_blur_sigma: expected a number in \[0, 1024\], got inf"):
        Bundle.load(copy)
    edit_yaml(copy, lambda d: d.__setitem__("format_version", FORMAT_VERSION + 1), keep_digest=False)
    with pytest.raises(BundleError, match=f"format_version {FORMAT_VERSION + 1} is newer than this runtime supports"):
        Bundle.load(copy)


def test_a_missing_digest_is_refused(copy):
    edit_yaml(copy, lambda d: d.pop("meta_sha256"))
    with pytest.raises(BundleError, match="meta_sha256 missing"):
        Bundle.load(copy)


def test_an_engine_recorded_later_keeps_the_model_id(bundle, copy):
    (copy / "engines").mkdir()
    (copy / "engines" / "x_sm87_trt10.3.0_fp16.engine").write_bytes(b"engine")
    loaded = Bundle.load(copy)
    loaded.add_file("engines/x_sm87_trt10.3.0_fp16.engine")
    again = Bundle.load(copy)
    assert again.model_id == bundle.model_id and "engines/x_sm87_trt10.3.0_fp16.engine" in again.meta.files


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "engines/../../x", "a\\..\\b"])
def test_file_entries_outside_the_bundle_are_refused(copy, entry):
    meta = Bundle.load(copy).meta
    meta.files[entry] = "0" * 64
    write_meta(copy, meta)  # a correct digest: the path itself is what is refused
    with pytest.raises(BundleError, match="files: entry"):
        Bundle.load(copy)


def test_a_symlink_out_of_the_bundle_is_refused(copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a model file")
    os.symlink(secret, copy / "notes.txt")
    bundle = Bundle.load(copy, verify=False)
    bundle.meta.files["notes.txt"] = "0" * 64
    write_meta(copy, bundle.meta)
    with pytest.raises(BundleError, match="symbolic link or not a regular file"):
        Bundle.load(copy)


def test_an_unreadable_bundle_is_a_one_line_error_for_the_service_user(bundle):
    folder = shared_folder("unreadable-bundle")
    try:
        installed = copy_world_readable(bundle.path, folder / "bundle")
        script = "from edge_inspector.core.bundle import Bundle; Bundle.load(sys.argv[1])"
        assert unprivileged_run(script, str(installed)).returncode == 0
        (installed / "model.onnx").chmod(0o600)  # what `cp -r` of a private export gives
        done = unprivileged_run(script, str(installed))
        assert "BundleError" in done.stderr and "model.onnx: cannot read (Permission denied" in done.stderr
        (installed / BUNDLE_FILE).chmod(0o600)
        done = unprivileged_run(script, str(installed))
        assert "bundle.yaml: cannot read (Permission denied" in done.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- every bundle file is a plain file, read once, within bounds (issue 29, attacks 1, 3, 6) ---------------


SECRET = "root:$6$not-a-real-hash:20228:0:99999:7:::"


def test_a_bundle_yaml_linked_to_another_file_is_refused_without_echoing_it(copy, tmp_path):
    """Attack 3: bundle.yaml symlinked to /etc/shadow echoed the file in the error reply."""
    secret = tmp_path / "shadow"
    secret.write_text(SECRET + "\n")
    (copy / BUNDLE_FILE).unlink()
    os.symlink(secret, copy / BUNDLE_FILE)
    with pytest.raises(BundleError) as refused:
        Bundle.load(copy)
    assert "symbolic link" in str(refused.value) and "not-a-real-hash" not in str(refused.value)
    (copy / BUNDLE_FILE).unlink()
    os.link(secret, copy / BUNDLE_FILE)  # a hard link: the same content without a symlink
    with pytest.raises(BundleError, match="2 hard links") as refused:
        Bundle.load(copy)
    assert "not-a-real-hash" not in str(refused.value) and len(str(refused.value).splitlines()) == 1


def test_a_symlinked_model_or_folder_inside_the_bundle_is_refused(copy, tmp_path):
    genuine = tmp_path / "genuine.onnx"
    shutil.move(copy / "model.onnx", genuine)
    os.symlink(genuine, copy / "model.onnx")  # even a link to the right bytes: what is checked must be what runs
    with pytest.raises(BundleError, match="model.onnx: a symbolic link or not a regular file"):
        Bundle.load(copy)
    (copy / "model.onnx").unlink()
    shutil.move(genuine, copy / "model.onnx")
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "x.engine").write_bytes(b"engine")
    os.symlink(engines, copy / "engines")
    bundle = Bundle.load(copy, verify=False)
    bundle.meta.files["engines/x.engine"] = Bundle.load(copy, verify=False).meta.files["model.onnx"]
    write_meta(copy, bundle.meta)
    with pytest.raises(BundleError, match="engines/x.engine: a symbolic link or not a regular file"):
        Bundle.load(copy)


def test_a_fifo_in_place_of_the_model_is_refused_at_once(copy):
    (copy / "model.onnx").unlink()
    os.mkfifo(copy / "model.onnx")  # no writer: a plain open() would block forever
    with pytest.raises(BundleError, match="model.onnx: not a regular file"):
        Bundle.load(copy)


def test_the_model_bytes_verified_at_load_are_the_bytes_handed_to_the_backend(copy):
    bundle = Bundle.load(copy)
    genuine = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(b"\0" * len(genuine))  # swapped after the check
    assert bundle.read_verified("model.onnx") == genuine  # the bytes hashed at load, not re-read
    with pytest.raises(BundleError, match="sha256 mismatch"):
        bundle.read_verified("model.onnx")  # handed out once; a second read is hashed again


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [{','.join(['*' + chr(96 + i)] * 9)}]")
    return "\n".join(lines) + "\n"


def test_yaml_aliases_oversized_and_deep_documents_are_refused_in_one_line(copy):
    (copy / BUNDLE_FILE).write_text(billion_laughs())
    with pytest.raises(BundleError, match=r"bundle.yaml: YAML aliases and anchors are not accepted at line 1"):
        Bundle.load(copy)
    (copy / BUNDLE_FILE).write_bytes(b"k: " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(BundleError, match=r"bundle.yaml: larger than 1024 KiB \(1048580 bytes; refused unread\)"):
        Bundle.load(copy)
    (copy / BUNDLE_FILE).write_text("a: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(BundleError, match="nested deeper than 32 levels"):
        Bundle.load(copy)


@pytest.mark.parametrize("item", ["0", "{k: 0}", "'" + "x" * 4000 + "'"])
def test_a_cap_sized_bundle_yaml_is_refused_or_parsed_in_one_short_line(copy, item):
    """The largest documents the byte cap lets in (timing: benchmarks/hardening_bench.py). A value is shown
    cut to 60 characters, and only from a plain file of the bundle's own (links are refused above), so an
    error never shows what the sender could not already read."""
    from edge_inspector.core.schema import MAX_YAML_BYTES

    head, tail = "files: [", "]\n"
    count = (MAX_YAML_BYTES - len(head) - len(tail)) // (len(item) + 1)
    text = head + ",".join([item] * count) + tail
    assert len(text.encode()) <= MAX_YAML_BYTES
    (copy / BUNDLE_FILE).write_text(text)
    with pytest.raises(BundleError) as refused:
        Bundle.load(copy)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and len(message) < 300
    assert "more than 10000 YAML nodes" in message or "files: expected a mapping" in message


def test_service_configs_are_read_within_the_same_bounds(tmp_path):
    from edge_inspector.core.errors import ConfigError
    from edge_inspector.service.config import load_config

    config = tmp_path / "line.yaml"
    config.write_text(billion_laughs())
    with pytest.raises(ConfigError, match=r"line.yaml: YAML aliases and anchors are not accepted at line 1"):
        load_config(config)
    config.unlink()
    os.mkfifo(config)  # no writer: opening it must neither block nor read
    with pytest.raises(ConfigError, match=r"line.yaml: not a regular file \(refused\)"):
        load_config(config)
    config.unlink()
    config.write_bytes(b"model:\n  bundle: " + b"b" * (1 << 20) + b"\n")
    with pytest.raises(ConfigError, match=r"line.yaml: larger than 1024 KiB"):
        load_config(config)


def test_a_graph_with_external_data_runs_from_a_private_verified_copy(copy, bundle, tmp_path, monkeypatch):
    """ONNX Runtime cannot take external weights with the graph's bytes: the two files are copied, verified,
    into a 0700 folder of the service's own, loaded from there, and the folder is removed."""
    import onnx

    from edge_inspector.backends.onnxruntime import OnnxRuntimeBackend

    model = onnx.load(str(copy / "model.onnx"))
    onnx.save_model(model, str(copy / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    external = finalize_bundle(copy, Bundle.load(copy, verify=False).meta)
    assert "model.onnx.data" in external.meta.files
    private = tmp_path / "private"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))  # where mkdtemp puts the private copy
    images = np.random.default_rng(0).integers(0, 255, (1, *bundle.input_size, 3), dtype=np.uint8)
    scores = OnnxRuntimeBackend(external).infer(images).scores
    reference = OnnxRuntimeBackend(Bundle.load(bundle.path)).infer(images).scores
    assert np.allclose(scores, reference, rtol=1e-6) and list(private.iterdir()) == []
    (copy / "model.onnx.data").write_bytes(b"\0" * (copy / "model.onnx.data").stat().st_size)
    with pytest.raises(BundleError, match="model.onnx.data: sha256 mismatch"):
        OnnxRuntimeBackend(Bundle.load(copy, verify=False))
    assert list(private.iterdir()) == []
