"""What this device is: Raspberry Pi, Jetson, Android (Termux) or generic Linux.

Every probe reads files under a ``root`` path, so tests build fake trees in a temporary
directory. Nothing here imports a runtime; which runtimes exist comes from
:func:`edge_sdk.runtime.available_runtimes`.
"""

from __future__ import annotations

import os
import platform as _platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["PlatformInfo", "arch_family", "detect_platform", "is_emulated", "power_model_name"]


@dataclass(frozen=True)
class PlatformInfo:
    """Facts about the device reported in its birth message.

    Attributes:
        kind: ``raspberry-pi``, ``jetson``, ``android`` or ``generic-linux``.
        model: human-readable model string when the device tells one.
        arch: machine architecture (``aarch64``, ``x86_64``...).
        cores: logical CPU count.
        memory_bytes: total RAM.
        emulated: this interpreter's architecture is not the kernel's family (an ARM
            userland under qemu-user on an x86 kernel, say): timings are the emulator's,
            not the device's. See :func:`is_emulated`.
    """

    kind: str
    model: str
    arch: str
    cores: int
    memory_bytes: int
    emulated: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "model": self.model,
            "arch": self.arch,
            "cores": self.cores,
            "memory_bytes": self.memory_bytes,
        }
        if self.emulated:  # only then: older hosts read the same status as before
            out["emulated"] = True
        return out


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def _mem_total(root: Path) -> int:
    text = _read_text(root / "proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


_FAMILIES = {
    "arm": ("aarch64", "arm64", "armv8", "armv7", "armv6", "arm"),
    "x86": ("x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"),
    "riscv": ("riscv",),
    "ppc": ("ppc", "powerpc"),
    "s390": ("s390",),
    "mips": ("mips",),
    "loongarch": ("loongarch",),
}


def arch_family(arch: str) -> str:
    """The instruction-set family of a machine name: ``aarch64`` and ``armv7l`` are both ``arm``.

    A 32-bit userland on a 64-bit kernel of the same family (Raspberry Pi OS armhf on a
    Pi 4's arm64 kernel) runs natively; only a different family means an emulator.
    Unknown names are their own family.
    """
    name = arch.strip().lower()
    return next((family for family, prefixes in _FAMILIES.items() if name.startswith(prefixes)), name)


def is_emulated(root: Path = Path("/"), arch: str | None = None) -> bool:
    """Whether this process runs under a user-mode emulator such as qemu-user.

    qemu-user answers ``uname`` with the emulated machine, so :func:`platform.machine`
    says ``aarch64``; it does not rewrite ``/proc/sys/kernel/arch``, which names the
    architecture the kernel itself runs (Linux 4.x and later). The two families differ
    only under emulation. Without that file (an older kernel, no /proc) nothing can be
    told and the answer is False.

    Args:
        root: filesystem root to probe (tests pass a fake tree).
        arch: this interpreter's machine; defaults to :func:`platform.machine`.
    """
    kernel = _read_text(Path(root) / "proc/sys/kernel/arch")
    if not kernel:
        return False
    return arch_family(kernel) != arch_family(arch or _platform.machine())


def detect_platform(root: Path = Path("/"), arch: str | None = None, cores: int | None = None) -> PlatformInfo:
    """Identify the device from files under ``root``.

    Args:
        root: filesystem root to probe (tests pass a fake tree).
        arch: architecture override; defaults to this interpreter's machine.
        cores: core-count override; defaults to ``os.cpu_count()``.

    Returns:
        The detected platform; ``generic-linux`` when nothing more specific matches.
    """
    root = Path(root)
    arch = arch or _platform.machine()
    cores = cores or os.cpu_count() or 1
    memory = _mem_total(root)
    emulated = is_emulated(root, arch)
    dt_model = _read_text(root / "proc/device-tree/model") or _read_text(root / "sys/firmware/devicetree/base/model")
    tegra = _read_text(root / "etc/nv_tegra_release")
    chip_id = _read_text(root / "sys/module/tegra_fuse/parameters/tegra_chip_id")
    if tegra is not None or chip_id is not None or (dt_model and "jetson" in dt_model.lower()):
        model = dt_model or (f"tegra chip {chip_id}" if chip_id else (tegra or "").split(",")[0])
        return PlatformInfo("jetson", model or "NVIDIA Jetson", arch, cores, memory, emulated)
    if dt_model and "raspberry pi" in dt_model.lower():
        return PlatformInfo("raspberry-pi", dt_model, arch, cores, memory, emulated)
    if (root / "system/build.prop").exists() or (root / "data/data/com.termux").exists():
        props = _read_text(root / "system/build.prop") or ""
        model = next(
            (ln.split("=", 1)[1] for ln in props.splitlines() if ln.startswith("ro.product.model=")), "Android"
        )
        return PlatformInfo("android", model, arch, cores, memory, emulated)
    product = _read_text(root / "sys/class/dmi/id/product_name")
    return PlatformInfo("generic-linux", dt_model or product or "Linux", arch, cores, memory, emulated)


def power_model_name(info: PlatformInfo) -> str:
    """Which entry of :data:`edge_sdk.metrics.POWER_MODELS` fits this device.

    It also picks the power sensors worth probing: ``raspberry-pi-5`` enables the PMIC
    (``vcgencmd pmic_read_adc``), which older Pis lack.
    """
    model = info.model.lower()
    if info.kind == "raspberry-pi":
        if "raspberry pi 5" in model:
            return "raspberry-pi-5"
        if "raspberry pi 4" in model:
            return "raspberry-pi-4"
        return "generic-arm"
    if info.kind == "jetson":
        if "orin" in model and "nano" in model:
            return "jetson-orin-nano"
        if "nano" in model:
            return "jetson-nano"
        return "generic-arm"
    if info.kind == "android":
        return "android"
    if info.arch in ("x86_64", "amd64", "i686", "i386"):
        return "generic-x86"
    if info.arch.startswith(("aarch64", "arm")):
        return "generic-arm"
    return "generic"
