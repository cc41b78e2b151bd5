"""`edgectl` on a device install (no host extra) says what to install, with exit code 2.

Each test runs the console script's real entry point (read from pyproject.toml) in a
fresh interpreter where the host extra's packages cannot be imported, as after
``pip install edge-sdk``.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from host_tools.__main__ import HOST_EXTRA_MODULES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10
    import tomli as tomllib

_PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[3] / "pyproject.toml").read_text())
_ENTRY = _PYPROJECT["project"]["scripts"]["edgectl"]

# Makes the named top-level modules unimportable, as if their packages were not installed.
_BLOCK = """
import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def _edgectl(blocked: set[str], *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    module, function = _ENTRY.split(":")
    code = f"BLOCKED = {sorted(blocked)!r}\n{_BLOCK}\nimport {module} as entry\nsys.exit(entry.{function}())\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"EDGE_SDK_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )


def test_the_entry_point_module_imports_nothing_of_the_host_extra(tmp_path: Path) -> None:
    module = _ENTRY.split(":")[0]
    code = (
        f"BLOCKED = {sorted(HOST_EXTRA_MODULES)!r}\n{_BLOCK}\nimport {module}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_without_click_edgectl_says_to_install_the_host_extra(tmp_path: Path) -> None:
    proc = _edgectl({"click"}, "keys", "show", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr
    assert proc.stderr.strip() == (
        "edgectl: error [config_invalid]: the host tools need the 'host' extra "
        "(module 'click' is not installed): pip install 'edge-sdk[host]'"
    )
    as_json = _edgectl({"click"}, "keys", "show", "--json", tmp_path=tmp_path)
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["error"]["details"] == {"module": "click"}


def test_a_host_package_a_command_imports_late_is_named_too(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    proc = _edgectl({"onnx"}, "compress", str(model), "-o", str(tmp_path / "out.onnx"), tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "module 'onnx' is not installed): pip install 'edge-sdk[host]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_with_the_host_extra_edgectl_runs(tmp_path: Path) -> None:
    proc = _edgectl(set(), "--version", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("edgectl, version")


def test_the_host_extra_modules_cover_every_package_of_the_host_extra() -> None:
    """Each package of pyproject's ``host`` extra provides one of HOST_EXTRA_MODULES."""
    provided: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            provided.setdefault(re.sub(r"[-_.]+", "-", distribution).lower(), set()).add(module)
    for requirement in _PYPROJECT["project"]["optional-dependencies"]["host"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement)[0]).lower()
        if name not in provided:
            pytest.fail(f"{name} (host extra) is not installed here; cannot check its modules")
        assert provided[name] & HOST_EXTRA_MODULES, f"{name} provides {sorted(provided[name])}"
