"""The README quick start: `edge-export demo` as a new user runs it (default relative --out, fresh folder)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_demo_runs_the_whole_loop_with_the_default_relative_out(tmp_path, monkeypatch):
    """Run from a fresh folder with no --out, as README says: the service must find the bundle through the
    config's relative paths and the live part must receive every frame."""
    from click.testing import CliRunner

    from export.commands.demo import demo_command

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(demo_command, ["--frames", "12", "--train-frames", "8", "--fps", "10"],
                                catch_exceptions=False)
    out = tmp_path / "demo-output"
    assert result.exit_code == 0, result.output
    assert "FAILED" not in result.output
    assert "[5/5] summary" in result.output and "service exit code 0" in result.output
    assert "image AUROC" in result.output  # the offline replay step printed its metrics
    assert "results received  12 " in result.output
    truth = json.loads((out / "ground_truth.json").read_text())
    expected = sum(f["defective"] for f in truth["frames"])
    assert f"(expected {expected} among those frames" in result.output
    assert result.output.count("\nFAIL ") + result.output.count("\nPASS ") == 12
    config = yaml.safe_load((out / "demo.yaml").read_text())
    assert config["model"]["bundle"] == "bundle"  # relative to the config file, where the service resolves it
    assert (out / config["model"]["bundle"] / "bundle.yaml").is_file()
    assert (out / config["camera"]["source"]).is_file()
    agreement = int(result.output.split("agreement")[1].split("/")[0])
    assert agreement >= 11  # the generated defects are obvious: at most one disagreement in 12 frames


def test_service_error_line_is_the_services_own_words(tmp_path):
    """A failed service is reported by its own error line: run the real CLI on a config whose bundle is missing."""
    from export.commands.demo import service_error_line

    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({"camera": {"id": "x", "source": "missing.avi", "kind": "file"},
                                      "model": {"bundle": "no-such-bundle"}}))
    log = tmp_path / "service.log"
    with open(log, "w") as handle:
        rc = subprocess.run([sys.executable, "-m", "edge_inspector.cli", "run", "--config", str(config)],
                            stdout=handle, stderr=subprocess.STDOUT, timeout=60).returncode
    assert rc == 2
    line = service_error_line(log)
    assert line.startswith("error:") and "no-such-bundle" in line
