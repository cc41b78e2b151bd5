"""The device's X25519 decryption key: bundles encrypted to it can be installed here.

Kept under the agent's data directory::

    decryption_key.pem    private key (PKCS#8 PEM, mode 0600); never leaves the device
    decryption_key.pub    its public key (PEM): the recipient key file for ``edgectl pack --encrypt-to``

The key is made at first start (or by ``edge-agent show-keys``) unless one was provisioned
there beforehand; the public file is rewritten from the private key when it is missing or
stale. The public key is also published in the device's status (``platform.decryption_key``,
``x25519:<base64>``), so that ``edgectl pack --encrypt-to DEVICE`` can find it in the registry.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edge_sdk.durable import atomic_write_bytes
from edge_sdk.errors import KeyStoreError, NotRecipientError, StorageError
from edge_sdk.protocol import DeployCommand
from edge_sdk.trust import RecipientKey

__all__ = ["PRIVATE_NAME", "PUBLIC_NAME", "check_recipient", "load_or_create_decryption_key"]

log = logging.getLogger(__name__)
PRIVATE_NAME = "decryption_key.pem"
PUBLIC_NAME = "decryption_key.pub"
_MAX_KEY_BYTES = 4096


def load_or_create_decryption_key(data_dir: Path) -> RecipientKey:
    """This device's decryption key: read from ``data_dir``, or made there at first start.

    Args:
        data_dir: the agent's data directory.

    Returns:
        The key.

    Raises:
        KeyStoreError: the key file exists but is not an X25519 private key, or is
            readable by others than its owner.
        StorageError: the key cannot be read or written.
    """
    private = Path(data_dir) / PRIVATE_NAME
    try:
        st = os.stat(private)
    except FileNotFoundError:
        key = RecipientKey.generate()
        atomic_write_bytes(private, key.to_pem(), mode=0o600)
        log.info("made this device's decryption key %s in %s", key.keyid, private)
    except OSError as exc:
        raise StorageError(f"cannot read {private}: {exc.strerror}") from exc
    else:
        if st.st_mode & 0o077:
            raise KeyStoreError(
                f"{private} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it", path=str(private)
            )
        if st.st_size > _MAX_KEY_BYTES:
            raise KeyStoreError(f"{private} is {st.st_size} bytes; not a key", path=str(private))
        try:
            key = RecipientKey.from_pem(private.read_bytes())
        except OSError as exc:
            raise StorageError(f"cannot read {private}: {exc.strerror}") from exc
    _publish(Path(data_dir) / PUBLIC_NAME, key)
    return key


def _publish(path: Path, key: RecipientKey) -> None:
    """Write the public key file unless it already holds this key."""
    pem = key.public.to_pem()
    try:
        if path.read_bytes() == pem:
            return
    except OSError:
        pass
    atomic_write_bytes(path, pem, mode=0o644)


def check_recipient(cmd: DeployCommand, key: RecipientKey) -> None:
    """Refuse an offer of an encrypted bundle that is not encrypted to this device, before any chunk moves.

    The offer's ``encrypted_for`` lists the recipient key ids the host read from the
    bundle's manifest. It is a hint (the signed manifest decides after receipt): a
    wrong hint can only make a device refuse early, never decrypt.

    Raises:
        NotRecipientError: the offer names recipients and this device's key is not among them.
    """
    recipients = cmd.transfer.encrypted_for
    if recipients and key.keyid not in recipients:
        raise NotRecipientError(
            f"{cmd.bundle_name} v{cmd.bundle_version} is encrypted for key(s) {', '.join(recipients)}; "
            f"this device's key {key.keyid} is not among them (pack it with --encrypt-to this device)",
            keyid=key.keyid,
            recipients=list(recipients),
        )
