"""deploy/arm/userland.sh when its build fails: an error, and nothing cached.

The tools it drives (mmdebstrap, qemu-user-static, update-binfmts, arch-test, and mount for
binfmt_misc) are stand-in scripts on PATH here; the real build runs in `make test-arm64`. A failed mmdebstrap piped
into zstd once left a 13-byte "userland" and its checksum in the cache, which every later
run reused.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "arm" / "userland.sh"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


@pytest.mark.skipif(os.geteuid() != 0, reason="userland.sh needs root")
def test_a_failed_build_exits_non_zero_and_caches_nothing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "mmdebstrap", 'echo "E: install arch-test for foreign architecture support" >&2; exit 1')
    for name in ("arch-test", "qemu-aarch64-static", "update-binfmts", "mount"):
        _stub(bin_dir, name, "exit 0")
    cache = tmp_path / "cache"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", EDGE_SDK_CACHE=str(cache))
    r = subprocess.run(["sh", str(SCRIPT), "arm64", "bookworm"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0, r.stderr
    assert "install arch-test" in r.stderr
    assert r.stdout == ""  # no tarball path for the Makefile to use
    assert not cache.exists() or list(cache.iterdir()) == []
