"""An ARM Debian userland on this machine, under qemu-user, for the device-side tests.

``make test-arm64`` and ``make test-armhf`` build (or reuse) a cached tarball of a Debian
userland with ``deploy/arm/userland.sh`` and pass its path in an environment variable
(:attr:`UserlandSpec.env_var`). :class:`Userland` unpacks it into a scratch directory,
mounts what a device has (``/proc``, ``/sys``, ``/dev``; an ARM ``/proc/cpuinfo`` over the
host's, which qemu 7.2 would pass through and onnxruntime and LiteRT crash on), installs
edge-sdk from this working tree into a venv there exactly as the README tells a device
owner, and runs commands in it with ``chroot``: the kernel hands the ARM binaries to
qemu-user through binfmt_misc. The chroot shares the host's network, so the agent inside
reaches a Mosquitto on the host's 127.0.0.1. The pytest base temporary directory is
mounted at the same path inside, so a test's ``tmp_path`` means the same on both sides.

Every mount is undone by :meth:`Userland.close` (in reverse order, lazily if busy), which
the fixture calls in ``finally``; nothing else is mounted outside the scratch directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "userland_data"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
VENV = "/opt/edge"
SOURCE = "/opt/edge-sdk"
#: Seconds an emulated agent may take to start, accept an offer or finish an install.
EMULATED_TIMEOUT = 600.0
#: Seconds each step of the device install may take under emulation (python -m venv, pip install).
INSTALL_TIMEOUT = 3600.0
#: `edgectl deploy` options for an emulated device: emulation's patience.
DEPLOY_ARGS = ("--accept-timeout", str(EMULATED_TIMEOUT), "--timeout", str(EMULATED_TIMEOUT))
PIP_CACHE = Path(os.environ.get("EDGE_SDK_CACHE", Path.home() / ".cache" / "edge-sdk" / "userlands")) / "pip"


@dataclass(frozen=True)
class UserlandSpec:
    """One userland the targets build, and how a device owner installs edge-sdk on it.

    Attributes:
        name: ``bookworm-arm64``...
        env_var: where the make target puts the tarball's path.
        machine: what ``uname -m`` says inside (``aarch64``, ``armv7l``).
        cpuinfo: the ARM ``/proc/cpuinfo`` text mounted over the host's (tests/userland_data/).
        qemu_cpu: the CPU qemu emulates (``QEMU_CPU``); empty for qemu's default.
        system_site_packages: the venv sees Debian's python3-* packages (32-bit ARM).
        requirement: what ``pip install`` is given, ``{src}`` being this working tree's copy.
    """

    name: str
    env_var: str
    machine: str
    cpuinfo: str
    qemu_cpu: str
    system_site_packages: bool
    requirement: str


BOOKWORM_ARM64 = UserlandSpec(
    "bookworm-arm64", "EDGE_SDK_USERLAND_BOOKWORM_ARM64", "aarch64", "cpuinfo-pi4-arm64", "cortex-a72", False,
    "{src}[litert]",
)  # fmt: skip
BOOKWORM_ARMHF = UserlandSpec(
    "bookworm-armhf", "EDGE_SDK_USERLAND_BOOKWORM_ARMHF", "armv7l", "cpuinfo-pi4-armhf", "cortex-a15", True,
    "{src}[litert]",
)  # fmt: skip
TRIXIE_ARMHF = UserlandSpec(
    "trixie-armhf", "EDGE_SDK_USERLAND_TRIXIE_ARMHF", "armv7l", "cpuinfo-pi4-armhf", "cortex-a15", True, "{src}"
)


def tarball_for(spec: UserlandSpec) -> Path:
    """The tarball the make target built, checked against its .sha256; fails the test (never skips) without it."""
    value = os.environ.get(spec.env_var)
    if not value:
        raise AssertionError(
            f"{spec.env_var} is not set: run these tests through `make test-arm64` / `make test-armhf`, "
            "which build the userland tarball (deploy/arm/userland.sh) and set it"
        )
    tarball = Path(value)
    digest = Path(f"{tarball}.sha256")
    if not tarball.is_file() or not digest.is_file():
        raise AssertionError(f"{spec.name} userland {tarball} (or its .sha256) is missing; rebuild it")
    check = subprocess.run(
        ["sha256sum", "--check", "--status", digest.name], cwd=tarball.parent, capture_output=True, check=False
    )
    if check.returncode != 0:
        raise AssertionError(f"{tarball} does not match {digest}; delete both and run the make target again")
    return tarball


def _source_files() -> list[str]:
    """This working tree as git sees it: tracked and untracked files, less the ignored ones."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [p for p in out.split("\0") if p and (REPO / p).is_file()]


class Userland:
    """An unpacked, mounted userland; :meth:`close` unmounts everything it mounted."""

    def __init__(self, spec: UserlandSpec, tarball: Path, work: Path, shared: Path) -> None:
        self.spec = spec
        self.root = work / "rootfs"
        self.shared = shared
        self._mounts: list[Path] = []
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "--zstd", "-xpf", str(tarball), "-C", str(self.root)], check=True)

    # --- mounts ----------------------------------------------------------------------

    def _inside(self, path: str | Path) -> Path:
        return self.root / str(path).lstrip("/")

    def mount(self, target: str | Path, *args: str) -> Path:
        """``mount ARGS ROOT/target``, made private so nothing propagates to the host; undone by close."""
        where = self._inside(target)
        subprocess.run(["mount", *args, str(where)], check=True, capture_output=True)
        self._mounts.append(where)
        subprocess.run(["mount", "--make-private", str(where)], check=True, capture_output=True)
        return where

    def unmount(self, where: Path) -> None:
        """Undo one mount (lazily when something still holds it)."""
        if subprocess.run(["umount", str(where)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(where)], capture_output=True, check=False)
        if where in self._mounts:
            self._mounts.remove(where)

    @contextmanager
    def bind_file(self, target: str, text: str, scratch: Path) -> Iterator[Path]:
        """``text`` bind-mounted at ``target`` inside (a device-tree model, a release file) for the block."""
        scratch.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_text(text)
        where = self._inside(target)
        made = not where.exists()
        where.parent.mkdir(parents=True, exist_ok=True)
        where.touch()
        self.mount(target, "--bind", str(scratch))
        try:
            yield where
        finally:
            self.unmount(where)
            if made:  # an empty /etc/nv_tegra_release left behind would still say Jetson
                where.unlink()

    def start(self) -> None:
        """Mount /proc, /sys, /dev, the ARM cpuinfo, the shared temp directory, pip's cache."""
        if os.geteuid() != 0:
            raise AssertionError("the userland tests need root (mount, chroot): run the make target as root")
        self.mount("/proc", "-t", "proc", "proc")
        self.mount("/sys", "-t", "sysfs", "sysfs")
        self.mount("/dev", "--bind", "/dev")
        self.mount("/proc/cpuinfo", "--bind", str(DATA / self.spec.cpuinfo))
        # the device tree of an ARM board lives here; an empty tmpfs hides the host's firmware tables
        self.mount("/sys/firmware", "-t", "tmpfs", "tmpfs")
        self._inside(self.shared).mkdir(parents=True, exist_ok=True)
        self.mount(self.shared, "--bind", str(self.shared))
        cache = PIP_CACHE / self.spec.name
        cache.mkdir(parents=True, exist_ok=True)
        self._inside("/root/.cache/pip").mkdir(parents=True, exist_ok=True)
        self.mount("/root/.cache/pip", "--bind", str(cache))
        shutil.copyfile("/etc/resolv.conf", self._inside("/etc/resolv.conf"), follow_symlinks=True)
        shutil.copyfile(HOST_CA, self._inside("/etc/host-ca.pem"))

    def close(self) -> None:
        """Unmount everything, innermost first; then the scratch tree can be deleted."""
        for where in reversed(list(self._mounts)):
            self.unmount(where)

    def mounted(self) -> list[Path]:
        """What is mounted under the root now, as the kernel says (for the cleanup check)."""
        root = str(self.root.resolve())
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
        return [Path(f.split()[4]) for f in lines if f.split()[4].startswith(root)]

    # --- commands --------------------------------------------------------------------

    def command(self, argv: Sequence[str], **env: str) -> list[str]:
        """``argv`` run inside, with a clean environment (plus ``env``)."""
        base = {
            "PATH": f"{VENV}/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PIP_CERT": "/etc/host-ca.pem",  # this machine reaches PyPI through its own CA
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            # pip would byte-compile every installed module, under emulation; Python compiles
            # what the agent imports when it first runs instead
            "PIP_NO_COMPILE": "1",
        }
        if self.spec.qemu_cpu:
            base["QEMU_CPU"] = self.spec.qemu_cpu
        pairs = [f"{k}={v}" for k, v in (base | env).items()]
        return ["chroot", str(self.root), "/usr/bin/env", "-i", *pairs, *argv]

    def run(self, argv: Sequence[str], timeout: float = EMULATED_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside and wait; stdout and stderr together in ``.stdout``."""
        return subprocess.run(
            self.command(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
        )

    def install(self) -> str:
        """Copy this working tree in and install it as the README says; returns pip's output."""
        src = self._inside(SOURCE)
        src.mkdir(parents=True)
        for rel in _source_files():
            dest = src / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest)
        venv = ["python3", "-m", "venv", *(["--system-site-packages"] if self.spec.system_site_packages else []), VENV]
        made = self.run(venv, timeout=INSTALL_TIMEOUT)
        assert made.returncode == 0, made.stdout
        pip = self.run(
            ["pip", "install", "--no-input", self.spec.requirement.format(src=SOURCE)], timeout=INSTALL_TIMEOUT
        )
        assert pip.returncode == 0, pip.stdout[-6000:]
        return pip.stdout


def emulated(userland: Userland) -> dict[str, Any]:
    """``start_agent`` keyword arguments: the venv's edge-agent inside ``userland``, with emulation's patience."""

    def launcher(argv: list[str]) -> list[str]:
        return userland.command([f"{VENV}/bin/edge-agent", *argv[1:]])

    return {"launcher": launcher, "timeout": EMULATED_TIMEOUT}
