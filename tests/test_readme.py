"""README's commands, run as written: a user copies them, so a test does too.

The command blocks are read out of README.md at test time (not copied here), so an edit to README that
breaks a command fails this test. The only liberties are the ones a user takes too: the images README calls
`images/good` and `images/test` are generated parts, and the config copied from `configs/` gets its camera
and bundle lines edited (README says to) before the service runs on an image folder instead of a USB camera.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def readme_block(heading: str) -> list[str]:
    """The command lines (comments stripped) of the first ```bash block after `heading`."""
    text = (REPO / "README.md").read_text()
    start = text.index(heading)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block, f"README: no bash block after {heading!r}"
    lines = []
    for line in block.group(1).splitlines():
        command = line.split("  #")[0].split(" # ")[0].strip()
        if command and not command.startswith("#"):
            lines.append(command)
    return lines


def _argv(command: str) -> list[str]:
    """Run console scripts from this interpreter's environment (the venv README's install made)."""
    argv = shlex.split(command)
    scripts = {"edge-inspector": "edge_inspector.cli", "edge-export": "export.cli"}
    if argv[0] in scripts:
        installed = Path(sys.executable).parent / argv[0]
        module = [sys.executable, "-m", scripts[argv[0]]]
        argv = [str(installed)] + argv[1:] if installed.exists() else module + argv[1:]
    return argv


def _run(command: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(_argv(command), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"README command failed: {command}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_readme_fit_replay_and_service_commands_run_as_written(synthetic_dataset, tmp_path):
    shutil.copytree(synthetic_dataset / "train" / "good", tmp_path / "images" / "good")
    shutil.copytree(synthetic_dataset / "test", tmp_path / "images" / "test")
    (tmp_path / "configs").symlink_to(REPO / "configs")

    fit_block = readme_block("## Fit a model on your parts")
    assert [c.split()[:2] for c in fit_block] == [["edge-export", "fit"], ["edge-inspector", "replay"]]
    for command in fit_block:
        output = _run(command, tmp_path).stdout
    assert "image AUROC" in output and (tmp_path / "metrics.json").is_file()
    assert any((tmp_path / "overlays").rglob("*.jpg"))

    service_block = readme_block("### From a bundle to a running service")
    run_line = next(c for c in service_block if c.startswith("edge-inspector run"))
    subscribe_line = next(c for c in service_block if c.startswith("edge-inspector subscribe"))
    for command in service_block[: service_block.index(run_line)]:
        if command.startswith("cp "):
            subprocess.run(shlex.split(command), cwd=tmp_path, check=True)
            config_file = tmp_path / shlex.split(command)[-1]
            _edit_config_as_readme_says(config_file)
        else:
            _run(command, tmp_path)

    service = subprocess.Popen(_argv(run_line), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        received = subprocess.run(_argv(subscribe_line + " --count 3 --no-health"), cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120)
    finally:
        service.send_signal(signal.SIGTERM)
        log, _ = service.communicate(timeout=30)
    assert received.returncode == 0, received.stdout + received.stderr
    verdicts = [line for line in received.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert len(verdicts) == 3, received.stdout
    assert service.returncode == 0, log


def _edit_config_as_readme_says(config_file: Path) -> None:
    """"edit camera.source and model.bundle": the generated test images stand in for the camera."""
    config = yaml.safe_load(config_file.read_text())
    camera = config_file.parent / "images" / "camera"  # a folder source reads its own files, not subfolders
    camera.mkdir(exist_ok=True)
    for path in sorted((config_file.parent / "images" / "test").rglob("*.png")):
        shutil.copy(path, camera / f"{path.parent.name}_{path.name}")
    config["camera"].update({"source": "images/camera/", "kind": "folder", "fps": 5, "loop": True})
    config["camera"].pop("width", None)
    config["camera"].pop("height", None)
    config["model"]["bundle"] = "bundles/line1"
    config["tiling"] = {"rows": 1, "cols": 1}
    config["decision"]["min_defect_area"] = 0
    config["publish"]["endpoint"] = "tcp://127.0.0.1:5556"
    config["publish"]["wait_for_subscriber_s"] = 60.0  # results start when `subscribe` is connected
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))


# A tool name in command position followed by its subcommand (not the `edge-inspector` user in
# `sudo -u edge-inspector ...` or `chown edge-inspector:...`).
COMMAND = re.compile(r"(?<![\w/:-])(edge-inspector|edge-export)(?: -v)? (?!edge-)([a-z][a-z-]+)")


def test_readme_names_only_commands_that_exist():
    """Every `edge-inspector X` / `edge-export X` in README and docs/ is a real subcommand."""
    from click.testing import CliRunner

    from edge_inspector.cli import main as inspector
    from export.cli import main as exporter

    groups = {"edge-inspector": inspector, "edge-export": exporter}
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    seen = set()
    for doc in docs:
        text = doc.read_text()
        code = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
        for snippet in code:
            for tool, sub in re.findall(COMMAND, snippet):
                seen.add((doc.name, tool, sub))
    assert seen
    for doc, tool, sub in sorted(seen):
        assert sub in groups[tool].commands, f"{doc}: `{tool} {sub}` is not a command"
        result = CliRunner().invoke(groups[tool], [sub, "--help"])
        assert result.exit_code == 0, f"{doc}: `{tool} {sub} --help` failed: {result.output}"
