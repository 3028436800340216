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


# A command line as the docs show it: the tool, its subcommand, then the rest of that line (backslash
# continuations joined) up to the end of the code span, a pipe, `;` or `&&`.
COMMAND_LINE = re.compile(r"(?<![\w/:\[-])(edge-inspector|edge-export)(?: -v)? (?!edge-)([a-z][a-z-]+)([^\n`|;&]*)")


def _doc_texts() -> list[tuple[str, str]]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [(doc.name, re.sub(r"\\\n\s*", " ", doc.read_text())) for doc in docs]


def test_docs_name_only_options_their_command_has():
    """Every `--option` shown after `edge-inspector X` / `edge-export X` is spelled as X defines it.

    A renamed option leaves a doc command that fails with "No such option" for whoever copies it."""
    import click

    from edge_inspector.cli import main as inspector
    from export.cli import main as exporter

    groups = {"edge-inspector": inspector, "edge-export": exporter}
    checked = 0
    for doc, text in _doc_texts():
        for tool, sub, rest in COMMAND_LINE.findall(text):
            command = groups[tool].commands.get(sub)
            if command is None:
                continue  # test_readme_names_only_commands_that_exist names it
            words = rest.split()
            if isinstance(command, click.Group) and words and words[0] in command.commands:
                command, sub = command.commands[words[0]], f"{sub} {words[0]}"
            spelled = {"--help"}.union(*(set(p.opts) | set(p.secondary_opts) for p in command.params))
            for option in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", rest.split(" # ")[0]):
                checked += 1
                assert option in spelled, f"{doc}: `{tool} {sub}` has no option {option}: {rest.strip()}"
    assert checked > 40  # the docs show dozens; far fewer means the pattern stopped matching


def _config_defaults() -> dict[str, object]:
    """Every key path of the service config (`camera.fps`, `outputs.mqtt.port`, ...) with its default."""
    import dataclasses
    import typing

    import msgspec

    from edge_inspector.service.config import ServiceConfig

    def nested(annotation: object) -> type | None:
        if isinstance(annotation, type) and (hasattr(annotation, "__struct_fields__")
                                             or dataclasses.is_dataclass(annotation)):
            return annotation
        return next((t for t in map(nested, typing.get_args(annotation)) if t), None)

    paths: dict[str, object] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else msgspec.structs.fields(cls)
        for field in fields:
            paths[prefix + field.name] = field.default
            inner = nested(hints[field.name])
            if inner is not None:
                walk(inner, prefix + field.name + ".")

    walk(ServiceConfig, "")
    return paths


def test_docs_name_only_config_keys_that_exist():
    """Every `section.key` the docs name is a key of the typed config (an unknown key is a config error)."""
    paths = _config_defaults()
    sections = "|".join(p for p in paths if "." not in p)
    dotted = re.compile(rf"(?<![\w./-])((?:{sections})(?:\.[a-z_]+)+)(?![\w/(-])")
    named = set()
    for doc, text in _doc_texts():
        for key in dotted.findall(text):
            if not key.startswith("model.onnx") and not key.endswith(".py"):  # file names, not keys
                named.add((doc, key))
    assert len(named) > 30
    for doc, key in sorted(named):
        assert key in paths, f"{doc}: `{key}` is not a service config key"


def test_service_doc_config_tables_state_the_code_defaults():
    """docs/service.md's `| key | default | meaning |` tables agree with edge_inspector/service/config.py."""
    paths = _config_defaults()
    section = None
    checked = 0
    for line in (REPO / "docs" / "service.md").read_text().splitlines():
        heading = re.match(r"#+ .*?`?(camera|tiling|model|decision|pipeline|publish|archive|security|logging"
                           r"|outputs\.mqtt|outputs\.opcua)`?\)?\s*$", line)
        if heading or line.startswith("#"):
            section = heading.group(1) if heading else None
            continue
        row = re.match(r"\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| ([^|]+) \|", line)
        if not (row and section):
            continue
        keys = re.findall(r"`([a-z_]+)`", row.group(1))
        stated = [d.strip().strip("`") for d in row.group(2).split(",")] if len(keys) > 1 else [row.group(2).strip()]
        for key, text in zip(keys, stated if len(stated) == len(keys) else stated * len(keys)):
            default = paths[f"{section}.{key}"]
            if text == "(required)":
                continue
            value = yaml.safe_load(text.strip("`"))
            default = list(default) if isinstance(default, tuple) else default
            assert value == default, f"docs/service.md: {section}.{key}: default {text} there, {default!r} in code"
            checked += 1
    assert checked > 60


def test_docs_python_names_resolve():
    """Every `edge_inspector.x.y` / `export.x.y` module or attribute and every `from M import N` in README and
    docs/ exists: a moved function leaves a snippet that fails with ImportError (send_control once did)."""
    import importlib

    def resolves(dotted: str) -> bool:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                target: object = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for name in parts[cut:]:
                    target = getattr(target, name)
            except AttributeError:
                return False
            return True
        return False

    named = set()
    for doc, text in _doc_texts():
        for dotted in re.findall(r"(?<![\w./-])((?:edge_inspector|export)(?:\.[A-Za-z_]\w*)+)", text):
            named.add((doc, dotted))
        for module, names in re.findall(r"from ((?:edge_inspector|export)[\w.]*) import ([\w, ]+)", text):
            named.update((doc, f"{module}.{name.split()[0]}") for name in names.split(",") if name.strip())
    named = {(doc, dotted) for doc, dotted in named if not dotted.endswith((".py", ".md", ".yaml"))}
    assert len(named) > 5
    for doc, dotted in sorted(named):
        assert resolves(dotted), f"{doc}: `{dotted}` does not exist"


def test_docs_name_only_options_the_benchmark_scripts_take():
    """Every `--option` shown after `benchmarks/NAME.py` in README and docs/ is in that script's --help."""
    shown: dict[str, set[tuple[str, str]]] = {}
    for doc, text in _doc_texts():
        for script, rest in re.findall(r"benchmarks/(\w+)\.py([^\n`|;&]*)", text):
            for option in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", rest.split(" # ")[0]):
                shown.setdefault(script, set()).add((doc, option))
    assert len(shown) >= 4
    for script, options in sorted(shown.items()):
        usage = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--help"],
                               capture_output=True, text=True, timeout=60, cwd=REPO)
        assert usage.returncode == 0, usage.stderr
        known = set(re.findall(r"--[a-z][\w-]*", usage.stdout))
        for doc, option in sorted(options):
            assert option in known, f"{doc}: benchmarks/{script}.py has no option {option}"


def test_docs_yaml_examples_are_valid_service_configs():
    """Every ```yaml block in README and docs/ is a valid (partial) service config: right keys, types, ranges.

    The blocks are fragments, so the one required key, model.bundle, is filled in when missing."""
    from edge_inspector.service.config import parse_config

    checked = 0
    for doc, text in _doc_texts():
        for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
            data = yaml.safe_load(block)
            data.setdefault("model", {}).setdefault("bundle", "bundles/line1")
            parse_config(data, f"{doc} yaml block")
            checked += 1
    assert checked >= 3


def test_docs_links_point_at_files_and_headings_that_exist():
    """Every relative link `[x](path)` / `[x](path#heading)` in README and docs/ names a file that exists and,
    with a fragment, one of its headings (GitHub's anchor: lower case, punctuation dropped, spaces -> '-')."""

    def anchors(path: Path) -> set[str]:
        prose = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)  # a '#' in code is no heading
        headings = re.findall(r"^#+ (.*)$", prose, re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}

    checked = 0
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, fragment in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path = (doc.parent / target) if target else doc
            assert path.exists(), f"{doc.name}: link to {target}, which does not exist"
            if fragment:
                assert fragment in anchors(path), f"{doc.name}: {target}#{fragment}: no such heading"
            checked += 1
    assert checked > 10
