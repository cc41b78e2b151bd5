"""`edgectl`'s entry point: say which install is missing instead of a traceback.

``pip install edge-sdk`` is the device install: it brings the ``edgectl`` script but not
the host extra (click, onnx, the compression code...). The console script points here,
and this module imports nothing of the host extra at import time, so that a device
install hears what to install (``pip install 'edge-sdk[host]'``) and gets the exit code
of a configuration error, instead of ``ModuleNotFoundError: No module named 'click'``.

``python -m host_tools`` runs ``edgectl`` too.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn

from edge_sdk.errors import ConfigError

__all__ = ["HOST_EXTRA_MODULES", "main"]

#: Top-level modules of the ``host`` extra's packages (pyproject.toml); a test keeps them in step.
HOST_EXTRA_MODULES = frozenset(
    {"click", "onnx", "onnx_ir", "sklearn", "amqtt", "tqdm", "ai_edge_quantizer", "matplotlib"}
)

#: The exit code of a usage or configuration error (the README's table of exit codes).
_EXIT_CONFIG = 2


def main() -> None:
    """Run ``edgectl``; a missing host-extra package ends in one line and exit code 2.

    Raises:
        ModuleNotFoundError: a module that is not part of the host extra is missing
            (a broken install, not the device install).
    """
    try:
        from host_tools.cli import main as cli_main
    except ModuleNotFoundError as exc:
        _missing_host_extra(exc)
    try:
        cli_main()
    except ModuleNotFoundError as exc:  # a command's own lazy import (onnx for compress, ...)
        _missing_host_extra(exc)


def _missing_host_extra(exc: ModuleNotFoundError) -> NoReturn:
    """Exit with the install to run when ``exc`` is about the host extra; re-raise it otherwise."""
    module = (exc.name or "").split(".")[0]
    if module not in HOST_EXTRA_MODULES:
        raise exc
    error = ConfigError(
        f"the host tools need the 'host' extra (module {module!r} is not installed): pip install 'edge-sdk[host]'",
        module=module,
    )
    if "--json" in sys.argv[1:]:
        print(json.dumps({"error": error.to_dict()}, indent=2, sort_keys=True))
    print(f"edgectl: error [{error.code}]: {error.message}", file=sys.stderr)
    sys.exit(_EXIT_CONFIG)


if __name__ == "__main__":
    main()
