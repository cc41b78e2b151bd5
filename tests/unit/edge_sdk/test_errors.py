"""edge_sdk.errors: the tree, unique wire codes, and rebuilding errors from the wire."""

from __future__ import annotations

import pytest

from edge_sdk import errors
from edge_sdk.errors import (
    EdgeError,
    ExitCode,
    LocalStateError,
    ModelError,
    SignatureError,
    TransportError,
    UntrustedInputError,
    UntrustedKeyError,
    error_from_code,
    exit_code_of,
)

#: What errors.py exports besides the error classes: the exit-code table and two functions.
_NOT_CLASSES = {"error_from_code", "exit_code_of", "ExitCode", "EXIT_CODES"}


def _all_classes() -> list[type[EdgeError]]:
    return [getattr(errors, n) for n in errors.__all__ if n not in _NOT_CLASSES]


def test_all_exports_every_error_class_and_nothing_else() -> None:
    defined = {name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, EdgeError)}
    assert defined == set(errors.__all__) - _NOT_CLASSES


def test_every_class_has_a_unique_code() -> None:
    codes = [cls.code for cls in _all_classes()]
    assert len(codes) == len(set(codes)), sorted(codes)
    # Each subclass sets its own code rather than inheriting the parent's.
    for cls in _all_classes():
        assert "code" in vars(cls), cls.__name__


def test_names_end_in_error_and_every_class_is_under_one_branch() -> None:
    branches = (UntrustedInputError, TransportError, LocalStateError, ModelError)
    for cls in _all_classes():
        assert cls.__name__.endswith("Error")
        assert issubclass(cls, EdgeError)
        if cls is not EdgeError and cls not in branches:
            assert sum(issubclass(cls, b) for b in branches) == 1, cls.__name__


def test_the_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    for cls in _all_classes():
        assert cls.__name__ in doc, cls.__name__


@pytest.mark.parametrize("cls", _all_classes(), ids=lambda c: c.__name__)
def test_error_from_code_round_trips_every_class(cls: type[EdgeError]) -> None:
    original = cls("something went wrong", path="model.onnx", size=3)
    wire = original.to_dict()
    assert wire == {
        "code": cls.code,
        "message": "something went wrong",
        "details": {"path": "model.onnx", "size": 3},
    }
    rebuilt = error_from_code(wire["code"], wire["message"], **wire["details"])
    assert type(rebuilt) is cls
    assert rebuilt.message == original.message
    assert rebuilt.details == original.details
    assert str(rebuilt) == "something went wrong"


def test_unknown_code_becomes_plain_edge_error_keeping_its_code() -> None:
    err = error_from_code("from_a_newer_peer", "new kind of failure", hint="x")
    assert type(err) is EdgeError
    assert err.code == "from_a_newer_peer"
    assert err.to_dict()["code"] == "from_a_newer_peer"
    assert err.details == {"hint": "x"}
    # The class attribute is not changed by the instance override.
    assert EdgeError.code == "edge_error"


def test_signature_branch_is_caught_by_its_parent() -> None:
    with pytest.raises(SignatureError):
        raise UntrustedKeyError("nope")
    with pytest.raises(UntrustedInputError):
        raise UntrustedKeyError("nope")


def test_details_named_like_parameters_survive_the_wire() -> None:
    # A peer's details are untrusted: a key called "code" must not crash the host.
    err = error_from_code("storage", "disk full", code="ENOSPC")
    assert err.details == {"code": "ENOSPC"}


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (EdgeError, ExitCode.FAILURE),
        (UntrustedInputError, ExitCode.UNTRUSTED_INPUT),
        (UntrustedKeyError, ExitCode.UNTRUSTED_INPUT),
        (errors.NotInstalledError, ExitCode.UNTRUSTED_INPUT),
        (TransportError, ExitCode.TRANSPORT),
        (errors.DeviceTimeoutError, ExitCode.TRANSPORT),
        (LocalStateError, ExitCode.LOCAL_STATE),
        (errors.KeyStoreError, ExitCode.LOCAL_STATE),
        (errors.StorageError, ExitCode.LOCAL_STATE),
        (errors.ConfigError, ExitCode.USAGE),
        (ModelError, ExitCode.MODEL),
        (errors.CompressionError, ExitCode.MODEL),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_exit_code_follows_the_blame(cls: type[EdgeError], code: ExitCode) -> None:
    assert exit_code_of(cls("x")) == code == cls.exit_code


def test_exit_code_of_anything_else_is_failure_and_the_table_is_complete() -> None:
    assert exit_code_of(ValueError("bug")) == ExitCode.FAILURE == 1
    assert list(errors.EXIT_CODES) == list(ExitCode) == list(range(7))
    assert ExitCode.USAGE.kind == "usage" and ExitCode.LOCAL_STATE.kind == "local_state"
    assert "edgectl keys init" in ExitCode.LOCAL_STATE.meaning
    # A device's error with an unknown code is not mistaken for a known blame.
    assert exit_code_of(error_from_code("from_a_newer_peer", "x")) == ExitCode.FAILURE
