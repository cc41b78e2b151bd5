"""device_agent.platform: detection against fake filesystem trees."""

from __future__ import annotations

from pathlib import Path

from device_agent.platform import PlatformInfo, arch_family, detect_platform, is_emulated


def _write(root: Path, rel: str, data: bytes | str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)


def _meminfo(root: Path, kib: int) -> None:
    _write(root, "proc/meminfo", f"MemTotal:       {kib} kB\nMemFree:         1000 kB\n")


def test_raspberry_pi_model_with_trailing_nul(tmp_path: Path) -> None:
    _write(tmp_path, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    _meminfo(tmp_path, 3884096)
    info = detect_platform(tmp_path, arch="aarch64", cores=4)
    assert info == PlatformInfo("raspberry-pi", "Raspberry Pi 4 Model B Rev 1.4", "aarch64", 4, 3884096 * 1024)


def test_raspberry_pi_via_sysfs_device_tree(tmp_path: Path) -> None:
    _write(tmp_path, "sys/firmware/devicetree/base/model", b"Raspberry Pi 5 Model B Rev 1.0\x00")
    info = detect_platform(tmp_path, arch="aarch64", cores=4)
    assert info.kind == "raspberry-pi"
    assert info.model == "Raspberry Pi 5 Model B Rev 1.0"
    assert info.memory_bytes == 0  # no meminfo in the fake tree


def test_jetson_from_nv_tegra_release(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "etc/nv_tegra_release",
        "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1\n",
    )
    info = detect_platform(tmp_path, arch="aarch64", cores=6)
    assert info.kind == "jetson"
    assert info.model == "# R35 (release)"
    assert (info.arch, info.cores) == ("aarch64", 6)


def test_jetson_prefers_the_device_tree_model(tmp_path: Path) -> None:
    _write(tmp_path, "etc/nv_tegra_release", "# R32 (release), REVISION: 7.1\n")
    _write(tmp_path, "proc/device-tree/model", b"NVIDIA Jetson Nano Developer Kit\x00")
    info = detect_platform(tmp_path, arch="aarch64", cores=4)
    assert info.kind == "jetson"
    assert info.model == "NVIDIA Jetson Nano Developer Kit"


def test_jetson_from_chip_id_only(tmp_path: Path) -> None:
    _write(tmp_path, "sys/module/tegra_fuse/parameters/tegra_chip_id", "35\n")
    info = detect_platform(tmp_path, arch="aarch64", cores=8)
    assert info.kind == "jetson"
    assert info.model == "tegra chip 35"


def test_android_build_prop(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "system/build.prop",
        "ro.build.id=UP1A\nro.product.model=Pixel 7\nro.product.brand=google\n",
    )
    info = detect_platform(tmp_path, arch="aarch64", cores=8)
    assert info.kind == "android"
    assert info.model == "Pixel 7"


def test_android_termux_without_readable_build_prop(tmp_path: Path) -> None:
    (tmp_path / "data/data/com.termux").mkdir(parents=True)
    info = detect_platform(tmp_path, arch="aarch64", cores=8)
    assert info.kind == "android"
    assert info.model == "Android"


def test_generic_linux_with_dmi_product(tmp_path: Path) -> None:
    _write(tmp_path, "sys/class/dmi/id/product_name", "ThinkPad X1\n")
    _meminfo(tmp_path, 16 * 1024 * 1024)
    info = detect_platform(tmp_path, arch="x86_64", cores=8)
    assert info.kind == "generic-linux"
    assert info.model == "ThinkPad X1"
    assert info.memory_bytes == 16 * 1024**3


def test_empty_tree_is_generic_with_defaults(tmp_path: Path) -> None:
    info = detect_platform(tmp_path)
    assert info.kind == "generic-linux"
    assert info.model == "Linux"
    assert info.arch  # this interpreter's machine
    assert info.cores >= 1
    assert set(info.to_dict()) == {"kind", "model", "arch", "cores", "memory_bytes"}


def test_device_tree_model_that_is_neither_pi_nor_jetson(tmp_path: Path) -> None:
    _write(tmp_path, "proc/device-tree/model", b"Rockchip RK3588 EVB\x00")
    info = detect_platform(tmp_path, arch="aarch64", cores=8)
    assert (info.kind, info.model) == ("generic-linux", "Rockchip RK3588 EVB")


def test_power_model_names_follow_the_hardware() -> None:
    from device_agent.platform import power_model_name
    from edge_sdk.metrics import POWER_MODELS

    cases = {
        ("raspberry-pi", "Raspberry Pi 5 Model B Rev 1.0", "aarch64"): "raspberry-pi-5",
        ("raspberry-pi", "Raspberry Pi 4 Model B Rev 1.4", "aarch64"): "raspberry-pi-4",
        ("raspberry-pi", "Raspberry Pi 3 Model B Plus", "armv7l"): "generic-arm",
        ("jetson", "NVIDIA Jetson Orin Nano Developer Kit", "aarch64"): "jetson-orin-nano",
        ("jetson", "NVIDIA Jetson Nano Developer Kit", "aarch64"): "jetson-nano",
        ("android", "Pixel 7", "aarch64"): "android",
        ("generic-linux", "Standard PC", "x86_64"): "generic-x86",
        ("generic-linux", "Linux", "aarch64"): "generic-arm",
        ("generic-linux", "Linux", "riscv64"): "generic",
    }
    for (kind, model, arch), want in cases.items():
        got = power_model_name(PlatformInfo(kind, model, arch, 4, 1 << 30))
        assert got == want, (kind, model, arch)
        assert got in POWER_MODELS


def test_emulation_is_a_kernel_of_another_family_than_the_interpreter(tmp_path: Path) -> None:
    assert is_emulated(tmp_path, "aarch64") is False  # no /proc/sys/kernel/arch: nothing can be told
    _write(tmp_path, "proc/sys/kernel/arch", "x86_64\n")
    assert is_emulated(tmp_path, "aarch64") is True  # qemu-user: uname says aarch64, the kernel is x86
    assert is_emulated(tmp_path, "x86_64") is False
    _write(tmp_path, "proc/sys/kernel/arch", "aarch64\n")
    assert is_emulated(tmp_path, "armv7l") is False  # 32-bit Pi OS on a Pi's 64-bit kernel runs natively
    assert [arch_family(a) for a in ("aarch64", "armv7l", "armv8l", "x86_64", "i686", "riscv64")] == [
        "arm", "arm", "arm", "x86", "x86", "riscv",
    ]  # fmt: skip


def test_an_emulated_platform_says_so_in_its_status(tmp_path: Path) -> None:
    _write(tmp_path, "proc/sys/kernel/arch", "x86_64\n")
    _write(tmp_path, "proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\x00")
    info = detect_platform(tmp_path, arch="aarch64", cores=4)
    assert (info.kind, info.emulated, info.to_dict()["emulated"]) == ("raspberry-pi", True, True)
    assert "emulated" not in detect_platform(tmp_path, arch="x86_64", cores=4).to_dict()
