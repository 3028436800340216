"""Labelled defects (`edge-export fit --labelled`): the supervised part learns a defect type from 10 examples,
its cross-validated rates are out of sample, a defect type it never saw is still caught by the anomaly part,
and the combined graph gives the same answer in ONNX Runtime as in torch."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from export.synthetic import make_part, write_mvtec_layout

SIZE = 128


def dull_part(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A washer of a duller alloy: the metal 10% darker, nothing else changed. The anomaly part ranks many of
    them inside the good parts' range (measured: 65% pass its threshold); 10 examples teach it."""
    image, _ = make_part(rng, SIZE)
    metal = image.mean(2) > 120
    out = image.astype(np.float32)
    out[metal] *= 0.9
    return np.clip(out, 0, 255).astype(np.uint8), metal


def write_set(root: Path, seed: int, good: int, per_kind: int, kinds: tuple[str, ...] = ("dull",)) -> Path:
    rng = np.random.default_rng(seed)

    def make(kind: str | None) -> tuple[np.ndarray, np.ndarray]:
        if kind == "dull":
            return dull_part(rng)
        return make_part(rng, SIZE, defect=kind)

    return write_mvtec_layout(root, make, kinds, 0, good, per_kind)


def scores_of(bundle, folder: Path) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    images = np.stack([cv2.imread(str(p)) for p in sorted(folder.glob("*.png"))])
    return session.run(["score"], {"image": images})[0]


@pytest.fixture(scope="module")
def judged(tmp_path_factory) -> Path:
    """Held-out parts never labelled: 20 good, 20 dull, 6 each of the washer's missing chunk and scratch."""
    root = tmp_path_factory.mktemp("judged")
    write_set(root / "a", 7, 20, 20)
    write_set(root / "b", 11, 0, 6, ("missing", "scratch"))
    return root


@pytest.fixture(scope="module")
def labelled_bundle(synthetic_dataset, tmp_path_factory):
    """The conftest's small PaDiM fit (same options) with 10 good and 10 dull parts labelled, through the CLI."""
    from click.testing import CliRunner

    from edge_inspector.core.bundle import Bundle
    from export.cli import main

    labelled = write_set(tmp_path_factory.mktemp("labelled") / "set", 5, 10, 10)
    out = tmp_path_factory.mktemp("bundles") / "dull"
    result = CliRunner().invoke(main, [
        "fit", str(synthetic_dataset / "train" / "good"), "--out", str(out), "--model", "padim",
        "--input-size", str(SIZE), "--feature-dim", "40", "--folds", "3", "--target-frr", "0.05", "--seed", "1",
        "--labelled", str(labelled)])
    assert result.exit_code == 0, result.output
    return Bundle.load(out), result.output


def test_supervised_part_learns_a_defect_type_from_10_examples(labelled_bundle, small_padim_bundle, judged):
    bundle, output = labelled_bundle
    dull = judged / "a" / "test" / "dull"
    good = judged / "a" / "test" / "good"
    passed_before = float(np.mean(scores_of(small_padim_bundle, dull) <= small_padim_bundle.threshold))
    passed_after = float(np.mean(scores_of(bundle, dull) <= bundle.threshold))
    rejected_after = float(np.mean(scores_of(bundle, good) > bundle.threshold))
    assert passed_before >= 0.3  # the anomaly part alone lets many pass ...
    assert passed_after <= 0.1 and passed_after < passed_before  # ... the labelled ten teach the rest
    assert rejected_after <= 0.1
    info = bundle.meta.labelled
    assert info is not None and info.supervised and info.cv_defect_images == 10 and info.defect_types == {"dull": 10}
    assert info.cv_good_images == 24 + 10  # training good (k-fold) and labelled good
    low, high = info.cv_escape_ci
    assert low <= info.cv_escape_rate <= high and high > 0  # exact interval, never [0, 0]
    assert "cross-validated at threshold" in output and "95% CI" in output and "escapes" in output
    assert bundle.meta.threshold.rule == "cross_validated_false_reject_rate"
    on_disk = yaml.safe_load((bundle.path / "bundle.yaml").read_text())
    assert on_disk["labelled"]["cv_escapes"] == info.cv_escapes


def test_a_defect_type_left_out_of_the_labels_is_still_caught(labelled_bundle, small_padim_bundle, judged):
    """Labels hold only 'dull'; missing chunks and scratches are caught at least as often as without labels."""
    bundle, _ = labelled_bundle
    unseen = [judged / "b" / "test" / kind for kind in ("missing", "scratch")]
    caught_before = sum(int((scores_of(small_padim_bundle, f) > small_padim_bundle.threshold).sum()) for f in unseen)
    caught_after = sum(int((scores_of(bundle, f) > bundle.threshold).sum()) for f in unseen)
    assert caught_before >= 10 and caught_after >= caught_before


def test_unlabelled_bundles_have_no_labelled_section(small_padim_bundle):
    text = (small_padim_bundle.path / "bundle.yaml").read_text()
    assert "labelled" not in yaml.safe_load(text) and small_padim_bundle.meta.labelled is None


def _separable(n_good: int = 60, n_bad: int = 20, features: int = 12, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n_good + [1] * n_bad)
    inputs = rng.normal(size=(labels.size, features))
    inputs[labels == 1, 0] += 2.5
    anomaly = rng.normal(5.0, 1.0, labels.size)
    return inputs, labels, anomaly


def test_cross_validated_score_does_not_depend_on_the_image_s_own_label():
    """An out-of-sample score comes from a classifier that never saw the image: flipping that image's label must
    not move it (it would if the image helped train the part that scores it)."""
    from export.supervised.classifier import cross_validated_scores, fit_classifier, stratified_folds

    inputs, labels, anomaly = _separable()
    folds = stratified_folds(labels, np.arange(labels.size), 4, seed=0)
    before = cross_validated_scores(inputs, labels, anomaly, folds, 5.0, 1.0)
    for index in (3, 70):  # a good and a defective image
        flipped = labels.copy()
        flipped[index] = 1 - flipped[index]
        after = cross_validated_scores(inputs, flipped, anomaly, folds, 5.0, 1.0)
        assert after[index] == before[index]
    # ... whereas an in-sample score does move: the check can fail.
    flipped = labels.copy()
    flipped[70] = 0
    own = fit_classifier(inputs, labels).on_scale(inputs[70:71], 5.0, 1.0)
    leaked = fit_classifier(inputs, flipped).on_scale(inputs[70:71], 5.0, 1.0)
    assert abs(float(own[0] - leaked[0])) > 1e-3


def test_identical_images_share_a_fold_and_folds_are_stratified():
    from export.supervised.classifier import content_groups, pixel_digest, stratified_folds

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(30)]
    images += [images[i].copy() for i in range(0, 30, 3)]  # ten files copied twice
    labels = np.array([i % 3 == 0 for i in range(30)] + [True] * 10, dtype=np.int64)
    groups = content_groups([pixel_digest(im) for im in images])
    folds = stratified_folds(labels, groups, 5, seed=2)
    for copy, original in zip(range(30, 40), range(0, 30, 3)):
        assert folds[copy] == folds[original]
    counts = [int(np.count_nonzero((folds == f) & (labels == 1))) for f in range(5)]
    assert max(counts) - min(counts) <= 2 and sum(counts) == 20


def test_clopper_pearson_known_values():
    from export.supervised.intervals import clopper_pearson, format_rate

    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.30850), abs=1e-4)
    assert clopper_pearson(10, 100) == pytest.approx((0.04900, 0.17622), abs=1e-4)
    assert clopper_pearson(5, 5)[1] == 1.0 and clopper_pearson(0, 0) == (0.0, 1.0)
    assert format_rate(2, 49).startswith("4.1% (2 of 49; 95% CI 0.5-14.0%)")


@pytest.mark.parametrize("kind", ["padim", "patchcore"])
def test_combined_graph_onnx_runtime_matches_torch(kind, tmp_path):
    """The combined graph in the bundle contract: ONNX Runtime within 1e-3 of torch, score >= the anomaly score
    (a part failing on the anomaly part alone still fails), and the map's maximum is the score."""
    from export.onnx_export import export_onnx, onnx_reference_check
    from export.supervised.model import CombinedModel, SupervisedHead

    size = (64, 64)
    if kind == "padim":
        from export.padim.fit import PadimOptions, build_features
        from export.padim.model import PadimModel

        features = build_features(PadimOptions(input_size=size, feature_dim=16, projection="orthogonal"))
        d, p = features.dim, (size[0] // 8) * (size[1] // 8)
        anomaly = PadimModel(features, torch.randn(1, p, d) * 0.1, torch.eye(d).repeat(1, p, 1, 1), size, 2.0)
    else:
        from export.patchcore.fit import PatchcoreOptions, create_features
        from export.patchcore.model import PatchcoreModel

        features = create_features(PatchcoreOptions(input_size=size, projection_dim=32))
        p = (size[0] // 8) * (size[1] // 8)
        anomaly = PatchcoreModel(features, torch.randn(50, 32), size, 8, 2.0)
    torch.manual_seed(0)
    head = SupervisedHead(torch.randn(4 + 2 * features.dim) * 0.5, 1.0)
    model = CombinedModel(anomaly.eval(), head, p).eval()
    rng = np.random.default_rng(0)
    images = np.stack([make_part(rng, 64)[0], make_part(rng, 64, defect="spot")[0],
                       rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)])
    path = export_onnx(model, tmp_path, size)
    assert onnx_reference_check(model, path, images) < 1e-3
    with torch.no_grad():
        maps, scores = model(torch.from_numpy(images))
        _, anomaly_scores = anomaly(torch.from_numpy(images))
    assert torch.all(scores >= anomaly_scores)
    assert torch.allclose(maps.amax(dim=(1, 2)), scores, rtol=1e-5)


def test_patchcore_fit_with_labelled_csv_and_its_cross_validated_report(synthetic_dataset, judged, tmp_path):
    """The default kind through the API, the labels given as a CSV: the graph carries the supervised part (the
    bundle's own ONNX check passed at export), the judged dull parts are caught, the report is recorded."""
    from export.patchcore import PatchcoreOptions, fit_patchcore
    from export.supervised.fit import LabelledSet

    labelled = write_set(tmp_path / "set", 5, 10, 10)
    rows = ["path,label"] + [f"{p.relative_to(labelled).as_posix()},{'good' if p.parent.name == 'good' else 'ng'}"
                             for p in sorted((labelled / "test").glob("*/*.png"))]
    (labelled / "labels.csv").write_text("\n".join(rows) + "\n")
    options = PatchcoreOptions(input_size=(SIZE, SIZE), folds=3, target_false_reject_rate=0.05, seed=1)
    bundle = fit_patchcore(synthetic_dataset / "train" / "good", tmp_path / "b", options,
                           labelled=LabelledSet(csv=labelled / "labels.csv", target_escape=0.1))
    info = bundle.meta.labelled
    assert info is not None and info.supervised and info.labelled_defect_images == 10
    assert bundle.meta.threshold.target_escape_rate == 0.1
    assert info.cv_escape_rate <= 0.1  # the escape target holds on the cross-validated defects
    passed = float(np.mean(scores_of(bundle, judged / "a" / "test" / "dull") <= bundle.threshold))
    assert passed <= 0.2


def test_labelled_options_are_checked_with_one_line(synthetic_dataset, tmp_path):
    from click.testing import CliRunner

    from export.cli import main

    base = ["fit", str(synthetic_dataset / "train" / "good"), "--out", str(tmp_path / "b"), "--model", "padim"]
    result = CliRunner().invoke(main, [*base, "--labelled", str(synthetic_dataset), "--rows", "2"])
    assert result.exit_code != 0 and "--labelled works on whole frames" in result.output
    result = CliRunner().invoke(main, [*base, "--labelled", str(synthetic_dataset), "--validation",
                                       str(synthetic_dataset)])
    assert result.exit_code != 0 and "give one" in result.output


def _tiny_padim():
    from export.padim.fit import PadimOptions, build_features
    from export.padim.model import PadimModel

    size = (64, 64)
    features = build_features(PadimOptions(input_size=size, feature_dim=16, projection="orthogonal"))
    d, p = features.dim, (size[0] // 8) * (size[1] // 8)
    return PadimModel(features, torch.zeros(1, p, d), torch.eye(d).repeat(1, p, 1, 1), size, 2.0).eval(), size


def test_without_labelled_defects_the_threshold_is_today_s_and_escapes_are_unknown(tmp_path, capsys):
    from export.supervised.fit import LabelledSet, TrainingInputs, attach_supervised
    from export.threshold import conformal_threshold

    model, size = _tiny_padim()
    rng = np.random.default_rng(0)
    folder = write_mvtec_layout(tmp_path / "goods", lambda kind: make_part(rng, 64), (), 0, 6, 0)
    scores = rng.normal(5.0, 0.5, 30)
    threshold = conformal_threshold(scores, 0.05)
    before = threshold.value
    attached = attach_supervised(model, TrainingInputs(scores, rng.normal(size=(30, 36))), LabelledSet(folder=folder),
                                 size, 0.05, 0, 4, threshold)
    assert attached.model is model and attached.threshold.value == before
    assert attached.info.cv_escape_rate is None and attached.info.labelled_good_images == 6
    assert "ESCAPE RATE IS UNKNOWN" in capsys.readouterr().out
