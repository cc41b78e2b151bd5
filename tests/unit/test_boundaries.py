"""The package boundaries of DESIGN.md and STYLE.md rule 2, checked on the source.

Static: every ``.py`` file of ``edge_sdk``, ``host_tools`` and ``device_agent`` is parsed
with :mod:`ast` and each import, wherever it sits (module level, inside a function,
under ``TYPE_CHECKING``), is checked against :data:`RULES`. Failures name ``file:line``.

Dynamic: importing the agent in a fresh interpreter must not pull in the host's heavy
or host-only packages, because the agent imports runtimes lazily.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("edge_sdk", "host_tools", "device_agent")


@dataclass(frozen=True)
class Import:
    """One imported module name, where it is imported."""

    module: str
    file: str  # POSIX path relative to the repository root
    line: int


@dataclass(frozen=True)
class Rule:
    """``modules`` (and their submodules) may be imported only where ``allowed`` says.

    ``allowed`` holds path prefixes relative to the repository root: a directory ends
    with ``/``, anything else is one file. ``forbidden_in`` instead names prefixes where
    the modules may not appear; a rule uses one or the other. ``exempt`` modules (and
    submodules) are outside the rule.
    """

    why: str
    modules: tuple[str, ...]
    allowed: tuple[str, ...] = ()
    forbidden_in: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()

    def violated_by(self, imp: Import) -> bool:
        if not _matches(imp.module, self.modules) or _matches(imp.module, self.exempt):
            return False
        if self.forbidden_in:
            return imp.file.startswith(self.forbidden_in)
        return not imp.file.startswith(self.allowed)


RULES = (
    Rule(
        "edge_sdk is shared by both sides: it imports neither host_tools nor device_agent, and no click",
        ("host_tools", "device_agent", "click"),
        forbidden_in=("edge_sdk/",),
    ),
    Rule(
        "the agent stays small: no host code, click, torch, onnx or scikit-learn",
        ("host_tools", "click", "torch", "onnx", "sklearn"),
        forbidden_in=("device_agent/",),
    ),
    Rule("host_tools and device_agent never import each other", ("device_agent",), forbidden_in=("host_tools/",)),
    Rule("edge_sdk/mqtt.py is the only module that imports paho-mqtt", ("paho",), allowed=("edge_sdk/mqtt.py",)),
    Rule(
        "the bundle archive module is the only one that imports tarfile",
        ("tarfile",),
        allowed=("edge_sdk/bundle/archive.py",),
    ),
    Rule("click belongs to the operator's CLI only", ("click",), allowed=("host_tools/cli.py",)),
    Rule(
        "inference sessions are opened only in edge_sdk/runtime/",
        ("onnxruntime", "ai_edge_litert", "tflite_runtime"),
        allowed=("edge_sdk/runtime/",),
        exempt=(
            "onnxruntime.quantization",
            "onnxruntime.tools.symbolic_shape_infer",
            "onnxruntime.transformers.float16",
            "ai_edge_litert.schema_py_generated",
        ),
    ),
    Rule(
        "LiteRT's flatbuffer schema (reading and editing .tflite files) is host-side compression",
        ("ai_edge_litert.schema_py_generated",),
        allowed=("host_tools/compress/",),
    ),
    Rule(
        "onnxruntime's quantization tools are host-side compression",
        ("onnxruntime.quantization", "onnxruntime.transformers.float16"),
        allowed=("host_tools/compress/",),
    ),
)


def _matches(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def _package_of(file: Path) -> list[str]:
    parts = list(file.relative_to(ROOT).with_suffix("").parts)
    return parts if file.name == "__init__.py" else parts[:-1]


def imports_of(tree: ast.AST, file: str, package: list[str]) -> Iterator[Import]:
    """Every module an AST imports, as absolute dotted names.

    ``from a import b`` yields ``a.b`` (b may be a submodule, as in
    ``from onnxruntime import quantization``); relative imports are resolved against
    ``package``; ``importlib.import_module("x")`` and ``__import__("x")`` with a literal
    name count too.
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, file, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:
                yield Import(f"{module}.{alias.name}" if alias.name != "*" else module, file, node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield Import(node.args[0].value, file, node.lineno)


def _source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _all_imports() -> list[Import]:
    found: list[Import] = []
    for path in _source_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        found.extend(imports_of(tree, rel, _package_of(path)))
    return found


@pytest.fixture(scope="module")
def all_imports() -> list[Import]:
    return _all_imports()


@pytest.mark.parametrize("rule", RULES, ids=[r.why for r in RULES])
def test_imports_respect_package_boundaries(rule: Rule, all_imports: list[Import]) -> None:
    bad = [f"{i.file}:{i.line}: imports {i.module}" for i in all_imports if rule.violated_by(i)]
    assert not bad, f"{rule.why}:\n  " + "\n  ".join(bad)


def test_the_scan_sees_the_owners_lazy_imports(all_imports: list[Import]) -> None:
    """Guards the guard: each owner module's own (often function-local) import is found."""
    seen = {(i.file, i.module.split(".")[0]) for i in all_imports}
    for file, module in [
        ("edge_sdk/mqtt.py", "paho"),
        ("edge_sdk/bundle/archive.py", "tarfile"),
        ("edge_sdk/runtime/_onnx.py", "onnxruntime"),
        ("edge_sdk/runtime/_litert.py", "ai_edge_litert"),
        ("edge_sdk/runtime/_litert.py", "tflite_runtime"),
        ("host_tools/cli.py", "click"),
    ]:
        assert (file, module) in seen, f"{file} no longer imports {module}; update RULES or this test"


def test_imports_of_resolves_from_relative_and_literal_imports() -> None:
    source = (
        "import a.b as ab\n"
        "from onnxruntime import quantization as q\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('lazy.mod')\n"
    )
    found = [(i.module, i.line) for i in imports_of(ast.parse(source), "pkg/sub/m.py", ["pkg", "sub"])]
    assert found == [
        ("a.b", 1),
        ("onnxruntime.quantization", 2),
        ("pkg.sub.sibling", 3),
        ("pkg.other.thing", 4),
        ("importlib", 6),
        ("lazy.mod", 7),
    ]
    rule = next(r for r in RULES if "ai_edge_litert" in r.modules)
    assert not rule.violated_by(Import("onnxruntime.quantization.shape_inference", "host_tools/x.py", 1))
    assert rule.violated_by(Import("onnxruntime.InferenceSession", "host_tools/x.py", 1))
    assert not rule.violated_by(Import("onnxruntime", "edge_sdk/runtime/_onnx.py", 1))


def test_importing_the_agent_loads_nothing_heavy_or_host_side() -> None:
    code = (
        "import sys\n"
        "import device_agent.cli, device_agent.agent\n"
        "banned = {'click', 'onnx', 'torch', 'sklearn', 'host_tools', 'onnxruntime', 'ai_edge_litert',\n"
        "          'tflite_runtime'}\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_listing_devices_loads_no_client_and_no_model_code(tmp_path: Path) -> None:
    # `edgectl devices` reads the registry: its start-up is part of every listing's time.
    code = (
        "import atexit, runpy, sys\n"
        "banned = {'paho', 'onnx', 'onnxruntime', 'numpy', 'torch', 'cryptography'}\n"
        "def report():\n"
        "    print(sorted(m for m in sys.modules if m.split('.')[0] in banned), file=sys.stderr)\n"
        "atexit.register(report)\n"
        f"sys.argv = ['edgectl', '--registry', {str(tmp_path / 'registry.db')!r}, 'devices', '--json']\n"
        "runpy.run_module('host_tools', run_name='__main__')\n"
    )
    env = {**os.environ, "EDGE_SDK_BROKER": "", "EDGE_SDK_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
    assert result.stderr.splitlines()[-1] == "[]"


def test_every_test_file_has_a_unique_name() -> None:
    # pytest imports test files by their base name (rootdir-relative "prepend" mode): two
    # tests/**/test_x.py stop the whole run at collection, so the mirrored folders keep names apart.
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if path.name in seen:
            clashes.append(f"{seen[path.name]} and {relative}")
        seen.setdefault(path.name, relative)
    assert clashes == []
