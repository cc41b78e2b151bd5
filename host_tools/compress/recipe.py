"""Recipes and the pass registry: the one place that maps pass names to passes.

A recipe is a TOML file with one ``[[step]]`` table per pass, run in order::

    [[step]]
    pass = "lowrank"
    energy = 0.9

    [[step]]
    pass = "quantize"
    mode = "int8-static"
    method = "entropy"
    max_accuracy_drop = 0.005     # keep sensitive nodes in float until the drop fits

Every key besides ``pass`` is an option of that pass (the fields of its class). New passes
register here with :func:`register_pass`, so the CLI and recipes know them at once.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from edge_sdk.errors import ConfigError, ModelLoadError

from .pass_manager import CompressionPass
from .passes.accuracy_guard import AccuracyGuard
from .passes.decompose import DecomposeGemm
from .passes.distill import Distillation, MlpStudent, StudentSpec, parse_student
from .passes.finetune import FineTune
from .passes.lowrank import LowRankFactorization
from .passes.prune import MagnitudePruning, SensitivityPruning
from .passes.quantize import QUANTIZE_OPTIONS, QuantizationPass, quantize_mode
from .passes.structured import ChannelPruning
from .passes.weight_sharing import WeightSharing
from .training.loop import TrainingOptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "PASS_REGISTRY",
    "PassFactory",
    "build_pass",
    "load_recipe",
    "parse_recipe",
    "quantize_modes",
    "register_pass",
]

PassFactory = Callable[[Mapping[str, Any]], CompressionPass]
"""Builds a pass from a step's options (everything in the step but ``pass``)."""

_REGISTRY: dict[str, PassFactory] = {}
PASS_REGISTRY: Mapping[str, PassFactory] = MappingProxyType(_REGISTRY)
"""Pass names (as in recipes) and their factories; read-only view, add with :func:`register_pass`."""


def register_pass(name: str, factory: PassFactory) -> None:
    """Make a pass known to recipes and the CLI.

    Args:
        name: the ``pass = "..."`` value in a recipe.
        factory: builds the pass from the step's other keys; raises :class:`ConfigError`
            for a bad option.

    Raises:
        ConfigError: the name is already registered.
    """
    if name in _REGISTRY:
        raise ConfigError(f"compression pass {name!r} is already registered", key="pass")
    _REGISTRY[name] = factory


def build_pass(name: str, options: Mapping[str, Any] | None = None) -> CompressionPass:
    """Build a registered pass.

    Args:
        name: the pass name.
        options: its options.

    Returns:
        The pass.

    Raises:
        ConfigError: unknown name (lists the known ones) or a bad option (names it).
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"unknown compression pass {name!r}; known: {', '.join(sorted(_REGISTRY))}", key="pass")
    return factory(dict(options or {}))


def parse_recipe(text: str, *, source: str = "<recipe>", base_dir: str | Path | None = None) -> list[CompressionPass]:
    """Parse recipe TOML into passes.

    Args:
        text: the TOML text.
        source: what to call it in error messages.
        base_dir: the folder relative file options (:data:`FILE_OPTIONS`, e.g. a distill
            step's ``student = "student.onnx"``) resolve against; the current directory
            when ``None``. :func:`load_recipe` passes the recipe's own folder.

    Returns:
        The passes, in order.

    Raises:
        ConfigError: not TOML, no ``[[step]]``, a step without ``pass``, or a bad pass
            or option; names the source, the step number and the key.
        ModelLoadError: a model file an option names is missing or invalid; names the
            source, the step and the file.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})", file=source) from exc
    steps = doc.get("step")
    unknown = sorted(set(doc) - {"step"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown top-level keys {unknown}; a recipe is a list of [[step]] tables", file=source
        )
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{source}: a recipe needs at least one [[step]] table", file=source)
    passes: list[CompressionPass] = []
    for number, step in enumerate(steps, start=1):
        options = dict(step)
        name = options.pop("pass", None)
        if not isinstance(name, str):
            raise ConfigError(f'{source}: step {number} has no pass = "..."', file=source, step=number)
        if base_dir is not None:
            for key in FILE_OPTIONS:
                value = options.get(key)
                if isinstance(value, str) and value.lower().endswith(".onnx") and not Path(value).is_absolute():
                    options[key] = str(Path(base_dir) / value)
        try:
            passes.append(build_pass(name, options))
        except ConfigError as exc:
            raise ConfigError(f"{source}: step {number} ({name}): {exc.message}", file=source, step=number) from exc
        except ModelLoadError as exc:
            raise ModelLoadError(f"{source}: step {number} ({name}): {exc.message}", file=source, step=number) from exc
    return passes


def load_recipe(path: str | Path) -> list[CompressionPass]:
    """Read and parse a recipe file.

    Args:
        path: the ``.toml`` file.

    Returns:
        The passes, in order.

    Raises:
        ConfigError: the file cannot be read or the recipe is invalid.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read recipe ({exc})", file=str(file)) from exc
    return parse_recipe(text, source=str(file), base_dir=file.parent)


FILE_OPTIONS = ("student",)
"""Step options whose value may name a model file; relative paths in a recipe file resolve
against the recipe's folder."""


_T = TypeVar("_T")


def _construct(cls: type[_T], options: Mapping[str, Any]) -> _T:
    """``cls(**options)`` with unknown keys and wrong values reported as ConfigError."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # every pass is a dataclass
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {sorted(known)}", key=unknown[0])
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def _quantize(options: Mapping[str, Any]) -> CompressionPass:
    opts = dict(options)
    cls, defaults = quantize_mode(str(opts.pop("mode", "int8-static")), key="mode")
    max_drop = opts.pop("max_accuracy_drop", None)
    ranking = opts.pop("guard_ranking", None)
    if ranking is not None and max_drop is None:
        raise ConfigError(
            "guard_ranking needs max_accuracy_drop (it orders the accuracy guard's search)", key="guard_ranking"
        )
    inner: QuantizationPass = _construct(cls, {**defaults, **opts})
    if max_drop is None:
        return inner
    return AccuracyGuard(inner, float(max_drop), ranking=ranking or "error")


def quantize_modes() -> Sequence[str]:
    """The ``mode`` values of the ``quantize`` pass (and of ``edgectl compress --quantize``)."""
    return tuple(QUANTIZE_OPTIONS)


register_pass("quantize", _quantize)
register_pass("lowrank", lambda o: _construct(LowRankFactorization, o))
register_pass("weight-share", lambda o: _construct(WeightSharing, o))
register_pass("decompose-gemm", lambda o: _construct(DecomposeGemm, o))


# --- pruning, fine-tuning, distillation -----------------------------------------------------


def _training_options(options: dict[str, Any]) -> TrainingOptions:
    """Pull ``epochs``, ``learning_rate``, ``batch_size``, ``weight_decay`` out of a step's options."""
    keys = [f.name for f in dataclasses.fields(TrainingOptions)]
    return _construct(TrainingOptions, {k: options.pop(k) for k in keys if k in options})


def _finetune(options: Mapping[str, Any]) -> CompressionPass:
    opts = dict(options)
    training = _training_options(opts)
    return _construct(FineTune, {**opts, "options": training})


def _distill(options: Mapping[str, Any]) -> CompressionPass:
    opts = dict(options)
    training = _training_options(opts)
    if "student" in opts and "hidden" in opts:
        raise ConfigError("a distill step takes student or hidden, not both", key="student")
    if "student" in opts:
        student: StudentSpec = parse_student(str(opts.pop("student")), key="student")
    else:
        hidden = opts.pop("hidden", (32,))
        student = MlpStudent(tuple(hidden) if isinstance(hidden, (list, tuple)) else (int(hidden),))
    return _construct(Distillation, {**opts, "student": student, "options": training})


register_pass("prune", lambda o: _construct(MagnitudePruning, o))
register_pass("prune-sensitivity", lambda o: _construct(SensitivityPruning, o))
register_pass("prune-channels", lambda o: _construct(ChannelPruning, o))
register_pass("finetune", _finetune)
register_pass("distill", _distill)
