"""Fixtures for the ARM userland tests (`make test-arm64`, `make test-armhf`; not part of `make test`).

``bookworm_arm64``, ``bookworm_armhf`` and ``trixie_armhf`` are session fixtures: each
unpacks its userland's tarball (tests/userland.py), mounts it, installs edge-sdk from this
working tree as the README says, and unmounts everything when the session ends, also when
a test failed. Without the tarball (the tests run outside their make target) they fail.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from userland import BOOKWORM_ARM64, BOOKWORM_ARMHF, TRIXIE_ARMHF, Userland, UserlandSpec, tarball_for


def _userland(spec: UserlandSpec, factory: pytest.TempPathFactory) -> Iterator[Userland]:
    tarball = tarball_for(spec)
    work = Path(tempfile.mkdtemp(prefix=f"edge-sdk-{spec.name}-", dir="/var/tmp"))
    userland: Userland | None = None
    try:
        userland = Userland(spec, tarball, work, factory.getbasetemp().resolve())
        userland.start()
        userland.install()
        yield userland
    finally:
        left = []
        if userland is not None:
            userland.close()
            left = userland.mounted()
        if left:  # never delete through a mount that is still there
            raise AssertionError(f"still mounted under {work} after cleanup: {left}")
        subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)


@pytest.fixture(scope="session")
def bookworm_arm64(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Userland]:
    yield from _userland(BOOKWORM_ARM64, tmp_path_factory)


@pytest.fixture(scope="session")
def bookworm_armhf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Userland]:
    yield from _userland(BOOKWORM_ARMHF, tmp_path_factory)


@pytest.fixture(scope="session")
def trixie_armhf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Userland]:
    yield from _userland(TRIXIE_ARMHF, tmp_path_factory)
