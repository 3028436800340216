"""One config mechanism (core/schema.py) for the service config, bundle.yaml and the training config.

Each of the three files: an unknown key is refused with its key path, a value of the wrong type or out of
range is one line `FILE: key.path: expected X, got Y`; every example in configs/ loads; bundle.yaml's
numbers keep their YAML type so the model id of an existing bundle does not change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pytest
import yaml
from msgspec import Meta

from edge_inspector.core import schema
from edge_inspector.core.bundle import BUNDLE_FILE, Bundle, BundleMeta, TilingInfo, identity_digest, meta_digest
from edge_inspector.core.errors import BundleError, ConfigError, InspectorError
from edge_inspector.service.config import CameraConfig, ServiceConfig, load_config
from export.autoencoder.config import TrainConfig, load_train_config
from service_helpers import REPO

SERVICE_EXAMPLES = sorted((REPO / "configs").glob("service-*.yaml"))
TRAIN_EXAMPLES = sorted((REPO / "configs").glob("train_*.yaml"))


def bundle_data(**changes: Any) -> dict[str, Any]:
    """A bundle.yaml as an exporter writes it (digest included), with `changes` applied before digesting."""
    data: dict[str, Any] = {
        "model_kind": "padim", "input_size": [128, 96],
        "threshold": {"value": 3, "rule": "manual", "operating_curve": [{"threshold": 3, "escape_rate": 0.25}]},
        "score_stats": None,
        "training": {"folder": "good", "image_count": 10, "file_list_sha256": "0" * 64, "fit_seconds": 2},
        "tiling": {"rows": 1, "cols": 2, "mode": "shared", "roi": [0, 0, 64, 64]},
        "model_params": {"epsilon": 0.01, "nested": {"a": [1, 2]}},
        "files": {"model.onnx": "1" * 64},
    }
    data.update(changes)
    data["meta_sha256"] = meta_digest(data)
    return data


def bundle_error(tmp_path: Path, data: dict[str, Any]) -> str:
    """Bundle.load of a folder holding only this bundle.yaml: types are checked before any file is."""
    folder = tmp_path / "bundle"
    folder.mkdir(exist_ok=True)
    (folder / BUNDLE_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(BundleError) as info:
        Bundle.load(folder)
    return one_line(info.value, folder / BUNDLE_FILE)


def service_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "line.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return one_line(info.value, path)


def train_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    return one_line(info.value, path)


def one_line(error: InspectorError, path: Path) -> str:
    """The message after `FILE: `, checked to be one line that starts with the file's name."""
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


# -- every example loads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SERVICE_EXAMPLES, ids=lambda p: p.name)
def test_every_service_example_loads(path):
    config = load_config(path)
    assert isinstance(config, ServiceConfig) and config.model.bundle and config.path == str(path)


@pytest.mark.parametrize("path", TRAIN_EXAMPLES, ids=lambda p: p.name)
def test_every_training_example_loads(path):
    config = load_train_config(path)
    assert isinstance(config, TrainConfig) and config.train_folder.is_absolute()


def test_the_examples_are_all_covered():
    names = {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert names == {p.name for p in SERVICE_EXAMPLES + TRAIN_EXAMPLES} and len(SERVICE_EXAMPLES) >= 3


# -- unknown keys ----------------------------------------------------------------------------------------


def test_unknown_keys_are_refused_with_their_path_in_all_three_files(tmp_path):
    message = service_error(tmp_path, "model: {bundle: b}\ncamera: {id: a, fsp: 5}\n")
    assert message.startswith("camera.fsp: unknown key (expected one of id, source, kind, fps,")
    message = bundle_error(tmp_path, bundle_data(threshold={"value": 3, "rule": "manual", "vaule": 2}))
    assert message.startswith("threshold.vaule: unknown key (expected one of value, rule,")
    message = train_error(tmp_path, "train_folder: good\nephocs: 3\n")
    assert message.startswith("ephocs: unknown key (expected one of train_folder,")


def test_internal_fields_are_not_keys(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\npath: /elsewhere.yaml\n").startswith("path: unknown key")


def test_a_typo_in_a_required_key_is_reported_as_the_typo(tmp_path):
    assert train_error(tmp_path, "train_foldr: good\n").startswith("train_foldr: unknown key")
    data = bundle_data()
    data["training"] = {"folder": "good", "image_count": 10, "file_list_sha25": "0" * 64}
    assert bundle_error(tmp_path, data).startswith("training.file_list_sha25: unknown key")


# -- wrong types -----------------------------------------------------------------------------------------


def test_a_wrong_type_is_one_line_naming_file_and_key_path_in_all_three_files(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\ncamera: {open_timeout_s: soon}\n") == (
        "camera.open_timeout_s: expected a number in [0.1, 600], got 'soon'")
    assert bundle_error(tmp_path, bundle_data(training={"folder": "good", "image_count": "ten",
                                                       "file_list_sha256": "0" * 64})) == (
        "training.image_count: expected an integer >= 0, got 'ten'")
    assert train_error(tmp_path, "train_folder: good\nflip_augment: maybe\n") == (
        "flip_augment: expected true or false, got 'maybe'")


def test_an_error_inside_a_list_names_the_key_and_shows_the_whole_value(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\ntiling: {roi: [0, 0, 10, x]}\n") == (
        "tiling.roi: expected [x, y, width, height] (x, y >= 0; width, height >= 1), got [0, 0, 10, 'x']")
    assert bundle_error(tmp_path, bundle_data(layers=["a", 2])) == "layers: expected a list of strings, got ['a', 2]"
    assert bundle_error(tmp_path, bundle_data(files={"model.onnx": 5})) == (
        "files: expected a mapping, got {'model.onnx': 5}")


def test_a_section_that_is_not_a_mapping(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\ntiling: 2\n") == "tiling: expected a mapping, got 2"
    assert bundle_error(tmp_path, bundle_data(training=[1])) == "training: expected a mapping, got [1]"
    assert train_error(tmp_path, "- a\n") == "top level: expected a mapping, got ['a']"


def test_a_missing_required_key(tmp_path):
    data = bundle_data()
    del data["threshold"]["rule"]
    data["meta_sha256"] = meta_digest(data)
    assert bundle_error(tmp_path, data) == "threshold.rule: required key missing (expected a string)"
    assert train_error(tmp_path, "epochs: 3\n") == "train_folder: required key missing (expected a path)"


def test_booleans_are_not_numbers_and_numbers_are_not_strings(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\ntiling: {rows: true}\n").startswith("tiling.rows: expected")
    assert service_error(tmp_path, "model: {bundle: 5}\n") == "model.bundle: expected a non-empty string, got 5"
    assert bundle_error(tmp_path, bundle_data(feature_dim=True)) == "feature_dim: expected an integer >= 0, got True"


# -- ranges and choices ----------------------------------------------------------------------------------


def test_range_violations_in_all_three_files(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\npipeline: {queue_size: 0}\n") == (
        "pipeline.queue_size: expected an integer in [1, 64], got 0")
    assert service_error(tmp_path, "model: {bundle: b}\npublish: {heatmap_full_scale: 0}\n") == (
        "publish.heatmap_full_scale: expected a number in (0, 1000], got 0")
    assert bundle_error(tmp_path, bundle_data(input_size=[128, 0])) == (
        "input_size: expected a list of 2 integers >= 1, got [128, 0]")
    assert bundle_error(tmp_path, bundle_data(threshold={"value": -1, "rule": "manual"})) == (
        "threshold.value: expected a number > 0, got -1")
    assert train_error(tmp_path, "train_folder: good\ndepth: 7\n") == "depth: expected an integer in [1, 6], got 7"
    assert train_error(tmp_path, "train_folder: good\nval_fraction: 1\n") == (
        "val_fraction: expected a number in (0, 1), got 1")


def test_choices(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\npipeline: {when_behind: sometimes}\n") == (
        "pipeline.when_behind: expected one of auto, drop, wait, got 'sometimes'")
    assert bundle_error(tmp_path, bundle_data(model_kind="resnet")) == (
        "model_kind: expected one of padim, ae, vae, patchcore, got 'resnet'")
    assert train_error(tmp_path, "train_folder: good\nerror_normalisation: minmax\n") == (
        "error_normalisation: expected one of none, zscore, got 'minmax'")


def test_non_finite_numbers_are_refused_in_the_service_and_training_configs(tmp_path):
    assert service_error(tmp_path, "model: {bundle: b}\ndecision: {threshold: .inf}\n") == (
        "decision.threshold: expected a number > 0, got inf")
    assert train_error(tmp_path, "train_folder: good\nlr: .nan\n") == "lr: expected a number > 0, got nan"


# -- bundle.yaml: the digest and the model id do not depend on the loader --------------------------------


def test_bundle_numbers_keep_their_yaml_type_so_the_model_id_is_stable():
    data = bundle_data()
    meta = BundleMeta.from_dict(data, "bundle.yaml")
    assert type(meta.threshold.value) is int and type(meta.training.fit_seconds) is int
    assert type(meta.threshold.operating_curve[0]["threshold"]) is int
    assert meta.input_size == (128, 96) and meta.tiling.roi == [0, 0, 64, 64]
    written = meta.to_dict()  # what write_meta digests and writes
    assert all(written[key] == value for key, value in data.items() if not isinstance(value, dict))
    again = BundleMeta.from_dict(yaml.safe_load(yaml.safe_dump(written, sort_keys=False)), "bundle.yaml")
    assert again.to_dict() == written and identity_digest(again) == identity_digest(meta)


def test_objects_built_in_code_stay_plain_dataclasses():
    tiling = TilingInfo(rows=2, cols=3)
    assert tiling.tiles == 6 and dataclasses.replace(tiling, rows=1).tiles == 3
    camera = CameraConfig(id="a", source="video.avi")
    camera.source = "other.avi"  # mutable as before: load_config resolves the source in place
    assert dataclasses.asdict(camera)["source"] == "other.avi"


# -- the mechanism itself --------------------------------------------------------------------------------


@dataclass
class Inner:
    size: tuple[Annotated[int, Meta(ge=1)], Annotated[int, Meta(ge=1)]] = (1, 1)
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    count: Annotated[int, Meta(ge=0, lt=10)]
    mode: Literal["a", "b"] = "a"
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)
    ratio: Annotated[float, Meta(gt=0.5)] | None = None


@pytest.mark.parametrize("data, message", [
    ({"count": 10}, "f.yaml: count: expected an integer in [0, 10), got 10"),
    ({"count": 1, "inner": {"size": [1, 0]}}, "f.yaml: inner.size: expected a list of 2 integers >= 1, got [1, 0]"),
    ({"count": 1, "items": [{"size": [2, 2]}, {"sise": 1}]}, "f.yaml: items.sise: unknown key (expected one of "
                                                             "size, names)"),
    ({"count": 1, "items": [{}, {"names": "x"}]}, "f.yaml: items: expected a list of mappings, got [{}, "
                                                  "{'names': 'x'}]"),
    ({"count": 1, "ratio": 0.5}, "f.yaml: ratio: expected a number > 0.5, got 0.5"),
    ({"count": 1, "mode": None}, "f.yaml: mode: expected one of a, b, got None"),
    ({1: 2}, "f.yaml: 1: unknown key (expected one of count, mode, inner, items, ratio)"),
])
def test_load_explains_msgspec_errors_in_the_project_format(data, message):
    with pytest.raises(ConfigError) as info:
        schema.load(Outer, data, "f.yaml")
    assert str(info.value) == message


def test_msgspec_still_ends_its_errors_with_the_key_path():
    """The one piece of msgspec's text the mechanism reads; if a release changes it, this says so first."""
    with pytest.raises(msgspec.ValidationError, match=r" - at `\$\.items\[0\]\.size\[1\]`$"):
        msgspec.convert({"count": 1, "items": [{"size": [1, 0]}]}, Outer)


def test_the_error_class_is_the_callers():
    with pytest.raises(BundleError, match="^x: count: expected"):
        schema.load(Outer, {"count": "1"}, "x", error=BundleError)
