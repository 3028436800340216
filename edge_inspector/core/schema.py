"""One config mechanism: YAML/dicts into typed dataclasses, for the service config, bundle.yaml and training.

The three files a user writes or ships (the service config, a bundle's bundle.yaml, the training config) are
plain dataclasses whose fields carry their rules in the annotation, declared next to the default:

    rows: Annotated[int, Meta(ge=1, le=64, description="tile rows")] = 1
    backend: Literal["auto", "onnxruntime", "tensorrt"] = "auto"

`load(cls, data, where)` checks a parsed document against such a class and builds it. The type and range
checks are msgspec's (`msgspec.convert` into the dataclass); this module adds only what msgspec leaves out:

- unknown keys are refused (msgspec ignores them for dataclasses), with the list of known ones;
- non-finite numbers (`.nan`, `.inf`) are refused when asked (the service config);
- msgspec's error ("Expected `int` >= 1 - at `$.tiling.rows`") becomes the project's one line,
  `FILE: key.path: expected an integer in [1, 64], got 0`, raised as the caller's error class
  (ConfigError, BundleError). Only the key path is taken from msgspec's text; "expected ..." is written
  from the field's declared type and constraints, and "got ..." is the value as the file has it.

Objects stay plain dataclasses: constructing one in code (`TilingInfo(rows=2)`) checks nothing and costs
what a dataclass costs; `dataclasses.replace/asdict` keep working.

Why msgspec and not pydantic v2. Measured 2026-11-23 on the 2-core x86-64 dev VM (CPython 3.11), which
other jobs shared (load average 3-9), so figures are ranges of medians/minimums over 15 fresh processes;
install size is `pip install --target DIR LIB` then `du -sh DIR`:

    library                     installed  python -S -c "import LIB"   + one model/struct and one validation
    msgspec 0.22.0              0.7 MB     40-80 ms                     40-65 ms  (one C extension, no deps)
    pydantic 2.14.3 + core 2.50 11 MB      75-140 ms                    190-375 ms (pydantic-core, typing-*, ...)
    (python -S -c pass: 10-25 ms, included above)

    added to `import edge_inspector.service.app` (numpy, cv2, zmq, onnxruntime; 380-670 ms on its own):
    msgspec + msgspec.inspect   +5 to +15 ms (minimums)
    pydantic                    +50 to +80 ms; +180 to +300 ms once one model is built and used

Both have CPython 3.10 manylinux2014_aarch64 wheels on PyPI for JetPack 6 (`pip download --no-deps
--platform manylinux2014_aarch64 --python-version 3.10 --only-binary=:all:` fetched msgspec-0.22.0-cp310,
223 kB, and msgspec-0.16.0-cp310, the lowest version the tests were run with; pydantic_core-2.50.4-cp310,
2.1 MB). msgspec converts into the project's existing dataclasses with their declared constraints at a
sixteenth of the size and a fraction of the start-up cost, on a device where every CLI call pays it; what
pydantic would add here (structured error locations, unknown keys refused for dataclasses) is the code
below. Checking a config once costs the first msgspec.convert of its class (~15 ms for ServiceConfig on
this VM, under load) plus a walk over the built objects; msgspec.inspect is used only to explain a failure.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import msgspec.inspect as mi
import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.resolver import Resolver

from edge_inspector.core.errors import ConfigError, InspectorError

T = TypeVar("T")
DecHook = Callable[[type, Any], Any]

# A number that keeps the YAML's type: `int | float`, so `3` stays 3 and not 3.0. bundle.yaml uses it:
# the model id is a digest of the metadata as loaded, and must not change because a loader re-typed a value.
Real = int | float

NON_BLANK = r"\S"  # a str pattern: at least one non-space character
# Shapes the service config and the training config share (the training tiles frames as the service does).
Text = Annotated[str, msgspec.Meta(pattern=NON_BLANK)]  # a non-empty string
Pair = tuple[Annotated[int, msgspec.Meta(ge=1)], Annotated[int, msgspec.Meta(ge=1)]]  # [height, width], [dy, dx]
Rect = Annotated[tuple[Annotated[int, msgspec.Meta(ge=0)], Annotated[int, msgspec.Meta(ge=0)],
                       Annotated[int, msgspec.Meta(ge=1)], Annotated[int, msgspec.Meta(ge=1)]],
                 msgspec.Meta(extra={"expected": "[x, y, width, height] (x, y >= 0; width, height >= 1)"})]


def expect(text: str) -> msgspec.Meta:
    """Annotation metadata overriding the 'expected ...' words for a type too rich to describe generically."""
    return msgspec.Meta(extra={"expected": text})


def internal(default: Any) -> Any:
    """A dataclass field set by code, never read from the file (a key of that name is an unknown key)."""
    return dataclasses.field(default=default, metadata={"internal": True})


def load(cls: type[T], data: Any, where: str, *, error: type[InspectorError] = ConfigError,
         finite: bool = False, dec_hook: DecHook | None = None) -> T:
    """Check a parsed YAML document against dataclass `cls` and build it; any mistake is one `error` line.

    where: the file name the message starts with. finite: refuse .nan/.inf in number fields.
    dec_hook: builds types msgspec does not know (e.g. Path), as in msgspec.convert.
    """
    if not isinstance(data, dict):
        raise error(f"{where}: top level: expected a mapping, got {shown(data)}")
    try:
        loaded = msgspec.convert(data, cls, dec_hook=dec_hook)
    except msgspec.ValidationError as err:
        # An unknown key first: a typo'd required key is reported as the typo, not as the key missing.
        info = _type_info(cls)
        raise error(f"{where}: {_first_unknown_or_nonfinite(info, data, (), finite) or _explain(info, data, str(err))}"
                    ) from None
    if not _only_known_and_finite(loaded, data, finite):
        raise error(f"{where}: {_first_unknown_or_nonfinite(_type_info(cls), data, (), finite)}")
    return loaded


_TYPE_INFO: dict[Any, mi.Type] = {}


def _type_info(cls: Any) -> mi.Type:
    """msgspec's view of a class (~10 ms to build for ServiceConfig), kept: tests explain hundreds of errors."""
    if cls not in _TYPE_INFO:
        _TYPE_INFO[cls] = mi.type_info(cls)
    return _TYPE_INFO[cls]


def shown(value: Any) -> str:
    """How a bad value is shown in a one-line error: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(keys: tuple[Any, ...]) -> str:
    return ".".join(str(k) for k in keys) or "top level"


# -- what msgspec does not check for dataclasses --------------------------------------------------------


def _only_known_and_finite(loaded: Any, value: Any, finite: bool) -> bool:
    """The cheap check on every load: walk the built objects beside the document (no type introspection;
    msgspec.inspect.type_info costs ~10 ms per config class, so it is only used to explain a failure)."""
    if dataclasses.is_dataclass(loaded) and isinstance(value, dict):
        names = _input_names(type(loaded))
        return all(name in names and not (finite and _non_finite(item))
                   and _only_known_and_finite(getattr(loaded, name), item, finite) for name, item in value.items())
    if isinstance(loaded, (list, tuple)) and isinstance(value, list):
        return all(_only_known_and_finite(a, b, finite) for a, b in zip(loaded, value))
    if isinstance(loaded, dict) and isinstance(value, dict):
        return all(_only_known_and_finite(loaded.get(k), v, finite) for k, v in value.items())
    return True


_INPUT_NAMES: dict[type, frozenset[str]] = {}


def _input_names(cls: type) -> frozenset[str]:
    if cls not in _INPUT_NAMES:
        _INPUT_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal"))
    return _INPUT_NAMES[cls]


def _first_unknown_or_nonfinite(t: mi.Type, value: Any, keys: tuple[Any, ...], finite: bool) -> str | None:
    """Walk the document beside its type: the first unknown key (or non-finite number), as 'path: problem'."""
    t = _unwrap(t, value)
    if isinstance(t, mi.DataclassType) and isinstance(value, dict):
        fields = _input_fields(t)
        for name in value:
            if name not in fields:
                return f"{_join(keys + (name,))}: unknown key (expected one of {', '.join(fields)})"
        for name, item in value.items():
            field_type = fields[name].type
            if finite and _non_finite(item):
                return f"{_join(keys + (name,))}: expected {describe(field_type)}, got {shown(item)}"
            found = _first_unknown_or_nonfinite(field_type, item, keys + (name,), finite)
            if found is not None:
                return found
    elif isinstance(t, (mi.ListType, mi.VarTupleType)) and isinstance(value, list):
        for item in value:
            found = _first_unknown_or_nonfinite(t.item_type, item, keys, finite)
            if found is not None:
                return found
    elif isinstance(t, mi.DictType) and isinstance(value, dict):
        for item in value.values():
            found = _first_unknown_or_nonfinite(t.value_type, item, keys, finite)
            if found is not None:
                return found
    return None


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    return isinstance(value, list) and any(isinstance(v, float) and not math.isfinite(v) for v in value)


def _input_fields(t: mi.DataclassType) -> dict[str, mi.Field]:
    names = _input_names(t.cls)
    return {f.name: f for f in t.fields if f.name in names}


def _unwrap(t: mi.Type, value: Any = None) -> mi.Type:
    """The type that describes `value`: annotation metadata removed; in `X | None`, the X."""
    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        options = [o for o in t.types if not isinstance(o, mi.NoneType)]
        records = [o for o in options if isinstance(_unwrap(o), mi.DataclassType)]
        if records and isinstance(value, dict):
            return _unwrap(records[0])
        if len(options) == 1:
            return _unwrap(options[0])
    return t


# -- msgspec's error as the project's one line ----------------------------------------------------------

# msgspec ends a ValidationError with "- at `$.a.b[0]`" (or "- at `key` in `$.a`" for a mapping key).
_AT = re.compile(r" - at `(?:key` in `)?\$(?P<path>[^`]*)`$")
_SEGMENT = re.compile(r"\.(?P<name>[A-Za-z_][A-Za-z0-9_]*)|\[(?P<index>\d+|\.\.\.)\]")


def _explain(root: mi.Type, data: Any, message: str) -> str:
    """`key.path: expected X, got Y` for a msgspec ValidationError raised while converting `data`."""
    match = _AT.search(message)
    segments = [m.group("name") for m in _SEGMENT.finditer(match.group("path"))] if match else []
    t: mi.Type = root
    value: Any = data
    keys: tuple[str, ...] = ()
    for name in segments:  # follow field names while they lead through records; stop at list items
        record = _unwrap(t, value)
        if name is None or not isinstance(record, mi.DataclassType) or not isinstance(value, dict):
            break
        t, value, keys = _input_fields(record)[name].type, value.get(name), keys + (name,)
    record = _unwrap(t, value)
    if isinstance(record, mi.DataclassType) and isinstance(value, dict):
        for field in _input_fields(record).values():
            if field.required and field.name not in value:
                return f"{_join(keys + (field.name,))}: required key missing (expected {describe(field.type)})"
        return f"{_join(keys)}: {_AT.sub('', message)}"  # a record's own error: msgspec's words
    return f"{_join(keys)}: expected {describe(t)}, got {shown(value)}"


def describe(t: mi.Type) -> str:
    """The 'expected ...' words for a declared type, constraints included ('an integer in [1, 64]')."""
    if isinstance(t, mi.Metadata):
        return str((t.extra or {}).get("expected") or describe(t.type))
    if isinstance(t, mi.UnionType):
        options = [o for o in t.types if not isinstance(o, mi.NoneType)]
        kinds = {type(_unwrap(o)) for o in options}
        if kinds == {mi.IntType, mi.FloatType}:  # Real: a number, ranged like its float member
            return describe(next(o for o in options if isinstance(_unwrap(o), mi.FloatType)))
        return " or ".join(describe(o) for o in options) or "null"
    if isinstance(t, mi.IntType):
        return "an integer" + _range(t)
    if isinstance(t, mi.FloatType):
        return "a number" + _range(t)
    if isinstance(t, mi.TupleType):
        items = {describe(i) for i in t.item_types}
        return f"a list of {len(t.item_types)} {_plural(t.item_types[0]) if len(items) == 1 else 'values'}"
    if isinstance(t, (mi.ListType, mi.VarTupleType)):
        return f"a {'non-empty ' if t.min_length else ''}list of {_plural(t.item_type)}"
    if isinstance(t, mi.LiteralType):  # msgspec keeps the values sorted
        return "one of " + ", ".join(str(v) for v in t.values)
    if isinstance(t, mi.StrType):
        return "a non-empty string" if t.min_length or t.pattern == NON_BLANK else "a string"
    if isinstance(t, mi.CustomType) and t.cls is Path:
        return "a path"
    return _SIMPLE.get(type(t), getattr(t, "cls", type(t)).__name__)


_SIMPLE: dict[type, str] = {
    mi.BoolType: "true or false", mi.NoneType: "null", mi.AnyType: "any value",
    mi.DictType: "a mapping", mi.DataclassType: "a mapping", mi.StructType: "a mapping",
}


def _range(t: mi.IntType | mi.FloatType) -> str:
    """' in [1, 64]', ' in (0, 1000]', ' >= 0', ' > 0.5' ... (bounds as %g: Meta(gt=0) and Meta(gt=0.0) are equal,
    so typing's cache may hand either one back, and both must read the same)."""
    low, high = (t.ge, "[") if t.ge is not None else (t.gt, "("), (t.le, "]") if t.le is not None else (t.lt, ")")
    if low[0] is not None and high[0] is not None:
        return f" in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    if low[0] is not None:
        return f" {'>=' if low[1] == '[' else '>'} {low[0]:g}"
    if high[0] is not None:
        return f" {'<=' if high[1] == ']' else '<'} {high[0]:g}"
    return ""


def _plural(t: mi.Type) -> str:
    words = describe(t)
    if isinstance(_unwrap(t), mi.StrType):
        return words.removeprefix("a ") + "s"
    for single in ("an integer", "a number", "a mapping", "a path"):
        if words.startswith(single):
            return single.split(" ", 1)[1] + "s" + words[len(single):]
    return f"values ({words})"


# -- bounded YAML --------------------------------------------------------------------------------------------

# Limits on every YAML document this project reads (bundle.yaml, service and training configs). Real ones are
# small: the session test bundle.yaml is 1.6 kB and ~100 nodes, the largest example config under 3 kB. The caps
# make the worst document they let in cheap: on the 2-core dev VM (loaded by other jobs) libyaml took 2.1 s and
# PyYAML's pure-Python loader 15.7 s on a 1 MB flow list of 500,000 scalars, so the node cap, not the byte cap,
# bounds the time: 50,000 nodes took 0.2 s alone but 1.3-1.6 s as a reload beside a running pipeline, so the
# cap is 10,000 (100x a real bundle.yaml; figures from benchmarks/hardening_bench.py). Aliases and anchors are
# refused outright: nothing here needs them, and they are how a 1 kB "billion laughs" expands to gigabytes.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 10_000
MAX_YAML_DEPTH = 32

try:  # libyaml's scanner and parser (C); the composition below stays Python so it can count and refuse
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - PyYAML built without libyaml: the pure-Python parser, slower
    from yaml.parser import Parser as _PyParser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Parser(Reader, Scanner, _PyParser):  # type: ignore[no-redef]
        def __init__(self, stream: Any) -> None:
            Reader.__init__(self, stream)
            Scanner.__init__(self)
            _PyParser.__init__(self)


class YamlLimit(Exception):
    """A document over one of the caps above; the message says which, never what the document holds."""


class _BoundedLoader(Composer, _Parser, SafeConstructor, Resolver):
    """yaml.SafeLoader's behaviour with aliases and anchors refused, and nodes and nesting counted."""

    def __init__(self, stream: bytes) -> None:
        _Parser.__init__(self, stream)
        Composer.__init__(self)
        SafeConstructor.__init__(self)
        Resolver.__init__(self)
        self.nodes = 0
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        line = f" at line {event.start_mark.line + 1}" if event.start_mark is not None else ""
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise YamlLimit(f"YAML aliases and anchors are not accepted{line}")
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            raise YamlLimit(f"more than {MAX_YAML_NODES} YAML nodes{line}")
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels{line}")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_QUOTED = re.compile(r"""\s*(?:'[^']*'|"[^"]*")""")


def parse_yaml(data: bytes, where: str | Path, error: type[InspectorError] = ConfigError) -> Any:
    """Parse one YAML document within the caps above; any problem is one `error` line naming the file and a
    line number, never quoting the document (an error reply must not become a way to read a file)."""
    if len(data) > MAX_YAML_BYTES:
        raise error(f"{where}: larger than {MAX_YAML_BYTES // 1024} KiB ({len(data)} bytes; refused unread)")
    loader = _BoundedLoader(data)
    try:
        return loader.get_single_data()
    except YamlLimit as err:
        raise error(f"{where}: {err} (refused)") from None
    except yaml.reader.ReaderError as err:
        raise error(f"{where}: not UTF-8 text (undecodable byte at offset {err.position})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "not a YAML document"
        raise error(f"{where}: invalid YAML{at} ({_QUOTED.sub('', str(problem)).strip()})") from None
    except (RecursionError, MemoryError):  # pragma: no cover - the caps above should make these unreachable
        raise error(f"{where}: YAML too complex (refused)") from None
    finally:
        loader.dispose()


def read_capped(fd: int, where: str | Path, error: type[InspectorError], limit: int = MAX_YAML_BYTES) -> bytes:
    """Read an open descriptor's whole content if it is a regular file of at most `limit` bytes.

    Checked on the descriptor (fstat), so a FIFO or device swapped in after a path check is still refused,
    and at most limit+1 bytes are ever read (a file growing while it is read is refused too)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{where}: not a regular file (refused)")
    if info.st_size > limit:
        raise error(f"{where}: larger than {limit // 1024} KiB ({info.st_size} bytes; refused unread)")
    data = read_at_most(fd, limit)
    if data is None:
        raise error(f"{where}: larger than {limit // 1024} KiB (grew while read; refused)")
    return data


def read_at_most(fd: int, limit: int) -> bytes | None:
    """An open descriptor's content to its end, or None when it holds more than `limit` bytes: at most
    limit + 1 bytes are ever read, so a file that grows while it is read costs no more memory than the cap.
    The one bounded read behind bundle.yaml, configs and image files (core.images.read_file_bytes)."""
    chunks, size = [], 0
    while size <= limit:
        chunk = os.read(fd, min(1 << 20, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return None if size > limit else b"".join(chunks)


def read_yaml(path: Path, error: type[InspectorError] = ConfigError, missing: str = "not found",
              access: str = "the service user needs read access to it") -> Any:
    """Parse a YAML file (a config: links are followed, as configuration tools deploy them); a missing,
    unreadable, non-regular, oversized or malformed file is one `error` line with the position."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # NONBLOCK: a FIFO must not hang the open
    except (FileNotFoundError, NotADirectoryError):
        raise error(f"{path}: {missing}") from None
    except PermissionError as err:
        raise error(f"{path}: cannot read ({err.strerror}; {access})") from None
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise error(f"{path}: {missing} (a folder)")
        data = read_capped(fd, path, error)
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from None
    finally:
        os.close(fd)
    return parse_yaml(data, path, error)
