"""One error tree for edge-sdk, split by who is to blame.

Every error the SDK raises on purpose is an :class:`EdgeError`. The four branches
say whose fault it is, which tells the caller what to do next::

    EdgeError
    +-- UntrustedInputError        the bytes we were given are bad: never retry them
    |   +-- BundleFormatError        not a bundle, truncated, hostile archive member
    |   +-- ManifestError            manifest malformed or inconsistent
    |   +-- HashMismatchError        a file's size or sha256 differs from the manifest
    |   +-- FileSetMismatchError     payload has a file the manifest lacks, or lacks one (mix-and-match)
    |   +-- TargetMismatchError      bundle or command is not for this device (arch, memory, id)
    |   |   +-- NotRecipientError      an encrypted bundle is not encrypted to this device's key
    |   +-- DecryptionError          an encrypted bundle does not decrypt (wrong key, altered ciphertext)
    |   +-- SignatureError           signature missing or does not verify
    |   |   +-- UntrustedKeyError      signed, but by a key this device does not trust
    |   +-- ExpiredError             signed metadata is past its expiry (freeze attack)
    |   +-- RollbackError            version not newer than the one installed
    |   +-- ReplayError              a signed command's nonce was already used
    |   +-- NotInstalledError        a command names a bundle the device does not have
    |   +-- RootError                root-of-trust document malformed, or not the next version
    |   +-- JsonError                untrusted JSON: not UTF-8 JSON, NaN/Infinity, too deep, wrong top type
    |   |   +-- JsonTooLargeError      the document is above its size limit (refused before decoding)
    |   +-- MessageError             malformed MQTT payload or unknown schema
    |   |   +-- MessageTooLargeError   payload above the configured limit
    |   +-- TransferError            chunked transfer broke its own declaration
    |   |   +-- TransferIncompleteError  chunks missing when the sender said "done"
    |   +-- DeltaError               a bundle delta is malformed or does not fit the installed base
    +-- TransportError             the link failed; the same request may work later
    |   +-- BrokerUnreachableError   no MQTT connection within the timeout
    |   +-- DeviceTimeoutError       the device did not answer in time
    +-- LocalStateError            this machine's own files, keys or config
    |   +-- ConfigError              invalid configuration or command-line values
    |   +-- KeyStoreError            signing keys missing, unreadable or malformed
    |   +-- StorageError             disk full, unwritable, inconsistent slot state
    +-- ModelError                 a model could not be loaded, run or transformed
        +-- RuntimeUnavailableError  the runtime a model needs is not installed
        +-- ModelLoadError           the runtime refused the model
        +-- HealthCheckError         the model loaded but failed its health check
        +-- CompressionError         a compression pass could not do what was asked

Each class carries a stable ``code`` used on the wire (the agent reports refusals
to the host as ``{"code": ..., "message": ...}``) and keeps structured facts in
``details`` rather than only in the message text.

The blame also decides how a program ends. :class:`ExitCode` is the one exit-code
table of both programs (``edgectl`` and ``edge-agent``); each branch names its code
in ``exit_code`` (configuration errors are usage errors, 2, although they are local
state), and :func:`exit_code_of` picks it for any exception.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

__all__ = [
    "EXIT_CODES",
    "BrokerUnreachableError",
    "BundleFormatError",
    "CompressionError",
    "ConfigError",
    "DecryptionError",
    "DeltaError",
    "DeviceTimeoutError",
    "EdgeError",
    "ExitCode",
    "ExpiredError",
    "FileSetMismatchError",
    "HashMismatchError",
    "HealthCheckError",
    "JsonError",
    "JsonTooLargeError",
    "KeyStoreError",
    "LocalStateError",
    "ManifestError",
    "MessageError",
    "MessageTooLargeError",
    "ModelError",
    "ModelLoadError",
    "NotInstalledError",
    "NotRecipientError",
    "ReplayError",
    "RollbackError",
    "RootError",
    "RuntimeUnavailableError",
    "SignatureError",
    "StorageError",
    "TargetMismatchError",
    "TransferError",
    "TransferIncompleteError",
    "TransportError",
    "UntrustedInputError",
    "UntrustedKeyError",
    "error_from_code",
    "exit_code_of",
]


class ExitCode(enum.IntEnum):
    """How ``edgectl`` and ``edge-agent`` end, chosen by who is to blame (one table for both)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNTRUSTED_INPUT = 3
    TRANSPORT = 4
    LOCAL_STATE = 5
    MODEL = 6

    @property
    def kind(self) -> str:
        """The lower-case name (``usage``, ``transport``, ...), as ``--json`` error objects print it."""
        return self.name.lower()

    @property
    def meaning(self) -> str:
        """What the code says, in the user's words (the README and ``edgectl --help`` print these)."""
        return EXIT_CODES[self]


#: The exit-code table, in order. The README's table and ``edgectl --help`` are made from it.
EXIT_CODES: dict[ExitCode, str] = {
    ExitCode.OK: "ok",
    ExitCode.FAILURE: "anything else: a bug, or an error code this version does not know (please report it)",
    ExitCode.USAGE: "usage or configuration: a bad option or value, a missing input file, a key passphrase "
    "missing or wrong, an invalid config file",
    ExitCode.UNTRUSTED_INPUT: "untrusted input: a bundle or message failed a check, or the device refused it",
    ExitCode.TRANSPORT: "transport: the broker is unreachable, or the device did not answer in time",
    ExitCode.LOCAL_STATE: "local state: no keys yet (run `edgectl keys init`), keys or storage unreadable or full",
    ExitCode.MODEL: "model: a model does not load, run, pass its health check or compress",
}


def exit_code_of(exc: BaseException) -> ExitCode:
    """The exit code for an exception: its branch's for an :class:`EdgeError`, else :attr:`ExitCode.FAILURE`.

    Args:
        exc: what ended the program.

    Returns:
        The code from the table.
    """
    return exc.exit_code if isinstance(exc, EdgeError) else ExitCode.FAILURE


class EdgeError(Exception):
    """Root of every error edge-sdk raises on purpose.

    Args:
        message: what went wrong, naming the thing that is wrong.
        **details: structured facts (file names, sizes, versions) kept for
            callers and for the wire; they must be JSON-serialisable.
    """

    code = "edge_error"
    exit_code: ClassVar[ExitCode] = ExitCode.FAILURE

    def __init__(self, message: str, /, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The wire form: stable code, message and details."""
        return {"code": self.code, "message": self.message, "details": self.details}


# --- untrusted input -------------------------------------------------------------------


class UntrustedInputError(EdgeError):
    """Input from outside this process (bundle, message, file) is bad."""

    code = "untrusted_input"
    exit_code = ExitCode.UNTRUSTED_INPUT


class BundleFormatError(UntrustedInputError):
    """The bytes are not a well-formed bundle (truncated, hostile or unknown layout)."""

    code = "bundle_format"


class ManifestError(UntrustedInputError):
    """The manifest is malformed, inconsistent or names something unsupported."""

    code = "manifest_invalid"


class HashMismatchError(UntrustedInputError):
    """A file's size or sha256 differs from what the signed metadata declares."""

    code = "hash_mismatch"


class SignatureError(UntrustedInputError):
    """A required signature is missing or does not verify."""

    code = "signature_invalid"


class UntrustedKeyError(SignatureError):
    """The metadata is signed, but not by a key this verifier trusts."""

    code = "untrusted_key"


class ExpiredError(UntrustedInputError):
    """Signed metadata is past its expiry time."""

    code = "expired"


class RollbackError(UntrustedInputError):
    """The offered version is not newer than the one already accepted."""

    code = "rollback"


class FileSetMismatchError(UntrustedInputError):
    """The payload holds a file the signed manifest does not list, or lacks one it lists."""

    code = "file_set_mismatch"


class TargetMismatchError(UntrustedInputError):
    """A bundle's target constraints, or a command's device id, do not fit this device."""

    code = "target_mismatch"


class NotRecipientError(TargetMismatchError):
    """An encrypted bundle names recipient keys, and this device's key is not among them."""

    code = "not_recipient"


class DecryptionError(UntrustedInputError):
    """An encrypted bundle's content key or payload does not decrypt with this device's key."""

    code = "decryption"


class ReplayError(UntrustedInputError):
    """A signed command arrived again (its nonce was already used on this device)."""

    code = "replay"


class NotInstalledError(UntrustedInputError):
    """A command names a bundle the device does not have installed (so it did nothing)."""

    code = "not_installed"


class RootError(UntrustedInputError):
    """A root-of-trust document is malformed, or is not the next version of the trusted one."""

    code = "root_invalid"


class JsonError(UntrustedInputError):
    """Untrusted JSON is not UTF-8 JSON, uses NaN/Infinity, nests too deep, or has the wrong top-level type.

    Raised by :mod:`edge_sdk.untrusted_json`; the manifest, root and message parsers map
    it to their own type (:class:`ManifestError`, :class:`RootError`, :class:`MessageError`).
    """

    code = "json_invalid"


class JsonTooLargeError(JsonError):
    """An untrusted JSON document is above its size limit; ``details`` has ``size`` and ``limit``."""

    code = "json_too_large"


class MessageError(UntrustedInputError):
    """An MQTT payload is malformed, of an unknown type or of an unknown schema."""

    code = "message_invalid"


class MessageTooLargeError(MessageError):
    """An MQTT payload exceeds the configured size limit."""

    code = "message_too_large"


class TransferError(UntrustedInputError):
    """A chunked transfer contradicted its own declaration (size, count, hash)."""

    code = "transfer_invalid"


class TransferIncompleteError(TransferError):
    """The sender finished a transfer while chunks were still missing."""

    code = "transfer_incomplete"


class DeltaError(UntrustedInputError):
    """A bundle delta is malformed, names another base, or asks its base for bytes it does not hold.

    The delta is at fault (a damaged base slot is a :class:`StorageError` instead): the
    device never retries it and fetches the full bundle. See :mod:`edge_sdk.bundle.delta`.
    """

    code = "delta_invalid"


# --- transport -------------------------------------------------------------------------


class TransportError(EdgeError):
    """The network or broker failed; the same request may succeed later."""

    code = "transport"
    exit_code = ExitCode.TRANSPORT


class BrokerUnreachableError(TransportError):
    """No MQTT connection could be made within the timeout."""

    code = "broker_unreachable"


class DeviceTimeoutError(TransportError):
    """A device did not answer within the timeout."""

    code = "device_timeout"


# --- local state -----------------------------------------------------------------------


class LocalStateError(EdgeError):
    """This machine's own configuration, keys or storage are wrong."""

    code = "local_state"
    exit_code = ExitCode.LOCAL_STATE


class ConfigError(LocalStateError):
    """Configuration or command-line values are invalid."""

    code = "config_invalid"
    exit_code = ExitCode.USAGE


class KeyStoreError(LocalStateError):
    """Signing keys are missing, unreadable or malformed."""

    code = "keystore"


class StorageError(LocalStateError):
    """Local storage failed: disk full, unwritable directory, inconsistent state."""

    code = "storage"


# --- models ----------------------------------------------------------------------------


class ModelError(EdgeError):
    """A model could not be loaded, run or transformed."""

    code = "model"
    exit_code = ExitCode.MODEL


class RuntimeUnavailableError(ModelError):
    """The inference runtime a model needs is not installed on this machine."""

    code = "runtime_unavailable"


class ModelLoadError(ModelError):
    """The runtime refused to load the model."""

    code = "model_load"


class HealthCheckError(ModelError):
    """The model loaded but failed its post-install health check."""

    code = "health_check"


class CompressionError(ModelError):
    """A compression pass could not do what was asked of it."""

    code = "compression"


def _all_subclasses(cls: type[EdgeError]) -> list[type[EdgeError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(code: str, message: str, /, **details: Any) -> EdgeError:
    """Rebuild an error reported over the wire into the most specific local type.

    Unknown codes (a newer peer) become a plain :class:`EdgeError` that keeps the code.

    Args:
        code: the ``code`` field of a reported error.
        message: the reported message.
        **details: the reported details.

    Returns:
        An instance of the matching subclass.
    """
    for cls in _all_subclasses(EdgeError):
        if cls.code == code:
            return cls(message, **details)
    err = EdgeError(message, **details)
    err.code = code
    return err
