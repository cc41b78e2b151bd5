"""host_tools.packing.resolve_recipients: --encrypt-to takes key files and device ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_sdk.errors import ConfigError, KeyStoreError
from edge_sdk.trust import RecipientKey
from host_tools.packing import resolve_recipients


def test_key_files_in_both_forms_and_devices_from_the_registry(tmp_path: Path) -> None:
    a, b, c = RecipientKey.generate(), RecipientKey.generate(), RecipientKey.generate()
    (tmp_path / "a.pub").write_bytes(a.public.to_pem())
    (tmp_path / "b.txt").write_text(b.public.to_text() + "\n")
    known = {"pi-03": c.public.to_text()}
    got = resolve_recipients([str(tmp_path / "a.pub"), str(tmp_path / "b.txt"), "pi-03", "pi-03"], known.get)
    assert [k.keyid for k in got] == [a.keyid, b.keyid, c.keyid]


def test_unknown_device_or_bad_key_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="show-keys"):
        resolve_recipients(["pi-99"], {}.get)
    with pytest.raises(ConfigError):
        resolve_recipients(["pi-99"])
    (tmp_path / "bad.pub").write_text("hello")
    with pytest.raises(KeyStoreError):
        resolve_recipients([str(tmp_path / "bad.pub")])
    with pytest.raises(KeyStoreError):
        resolve_recipients(["pi-01"], {"pi-01": "x25519:short"}.get)
