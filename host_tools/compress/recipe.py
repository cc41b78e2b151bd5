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

The step options of ``edgectl compress`` (``--prune magnitude:0.8``, ``--lowrank 2x``,
``--distill mlp:128,64``...) are the same passes spelled on a command line:
:class:`StepOptions` holds them as given and :func:`passes_from_options` turns them into
passes through the same registry.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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
    "PRUNE_KINDS",
    "PassFactory",
    "StepOptions",
    "build_pass",
    "compression_passes",
    "load_recipe",
    "parse_lowrank_option",
    "parse_prune_option",
    "parse_recipe",
    "passes_from_options",
    "quantize_modes",
    "register_pass",
    "training_passes",
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


# --- the step options of `edgectl compress` ---------------------------------------------------

PRUNE_KINDS: Mapping[str, tuple[str, str, Mapping[str, Any]]] = MappingProxyType(
    {
        "magnitude": ("prune", "sparsity", {}),
        "layer": ("prune", "sparsity", {"scope": "layer"}),
        "sensitivity": ("prune-sensitivity", "sparsity", {}),
        "channels": ("prune-channels", "ratio", {}),
    }
)
"""``--prune KIND:AMOUNT``: the pass each kind builds, the option AMOUNT sets, and fixed options."""


@dataclass(frozen=True)
class StepOptions:
    """The step options of ``edgectl compress``, as the operator wrote them.

    :func:`passes_from_options` turns them into passes, in a fixed order: distillation,
    pruning, low-rank, fine-tuning, weight sharing, quantization. A TOML recipe (see
    :func:`load_recipe`) says the same things one ``[[step]]`` at a time.

    Attributes:
        quantize: a :data:`QUANTIZE_OPTIONS` mode (``--quantize``).
        lowrank: a retained energy (``0.9``), a parameter reduction (``2x``) or ``auto`` (``--lowrank``).
        weight_share: bits per shared value (``--weight-share``).
        distill: a student, ``mlp:WIDTH[,WIDTH...]`` or a ``.onnx`` file (``--distill``).
        distill_temperature: distillation temperature (``--distill-temperature``).
        distill_alpha: weight of the teacher's soft targets (``--distill-alpha``).
        prune: ``magnitude:S``, ``layer:S``, ``sensitivity:S`` or ``channels:R`` (``--prune``).
        finetune_epochs: fine-tuning epochs (``--finetune``).
        train_epochs: distillation epochs (``--epochs``; 60 when ``None``).
        max_accuracy_drop: the quality budget (``--max-accuracy-drop``).
        guard_ranking: how the accuracy guard ranks nodes (``--guard-ranking``).
    """

    quantize: str | None = None
    lowrank: str | None = None
    weight_share: int | None = None
    distill: str | None = None
    distill_temperature: float = 4.0
    distill_alpha: float = 0.7
    prune: str | None = None
    finetune_epochs: int | None = None
    train_epochs: int | None = None
    max_accuracy_drop: float | None = None
    guard_ranking: str | None = None


def passes_from_options(options: StepOptions, recipe: str | Path | None = None) -> list[CompressionPass]:
    """The passes of ``edgectl compress``: from a recipe file, or from its step options.

    With neither a recipe nor any step, the result is one int8 static quantization.

    Args:
        options: the step options.
        recipe: a TOML recipe to use instead of the step options.

    Returns:
        The passes, in order.

    Raises:
        ConfigError: a malformed option (names it and shows its forms), options that do not
            go together (a recipe and step options, ``--weight-share`` with ``--quantize``,
            ``--guard-ranking`` without ``--max-accuracy-drop``...), or an invalid recipe.
        ModelLoadError: a student ``.onnx`` file is missing or invalid.
    """
    if options.max_accuracy_drop is not None and options.max_accuracy_drop < 0:
        raise ConfigError("--max-accuracy-drop must be >= 0", key="max_accuracy_drop")
    if options.guard_ranking is not None and recipe is not None:
        raise ConfigError("with --recipe, set guard_ranking in the recipe's quantize step", key="guard_ranking")
    if options.guard_ranking is not None and options.max_accuracy_drop is None:
        raise ConfigError("--guard-ranking needs --max-accuracy-drop", key="guard_ranking")
    training = training_passes(options)
    if (training or options.finetune_epochs) and recipe is not None:
        raise ConfigError("give either --recipe or step options (--prune, --distill, ...), not both")
    if recipe is not None:
        if options.quantize or options.lowrank or options.weight_share:
            raise ConfigError("give either --recipe or step options (--quantize, --lowrank, ...), not both")
        return load_recipe(recipe)
    return training + compression_passes(options, default_quantize=not (training or options.finetune_epochs))


def training_passes(options: StepOptions) -> list[CompressionPass]:
    """Distillation and pruning passes from the step options, in that order.

    Args:
        options: the step options (``distill``, ``prune`` and their settings).

    Returns:
        Zero, one or two passes.

    Raises:
        ConfigError: a malformed ``--distill`` or ``--prune``.
        ModelLoadError: a student ``.onnx`` file is missing or invalid.
    """
    steps: list[CompressionPass] = []
    if options.distill:
        distill = {"student": options.distill, "temperature": options.distill_temperature}
        steps.append(
            build_pass(
                "distill",
                {
                    **distill,
                    "alpha": options.distill_alpha,
                    "epochs": options.train_epochs or 60,
                    "learning_rate": 0.01,
                },
            )
        )
    if options.prune:
        steps.append(parse_prune_option(options.prune))
    return steps


def compression_passes(options: StepOptions, *, default_quantize: bool = True) -> list[CompressionPass]:
    """Low-rank, fine-tuning, weight sharing and quantization passes from the step options.

    They run in that order, so that fine-tuning trains the pruned and factorized model
    and weight sharing clusters float weights before quantization.

    Args:
        options: the step options.
        default_quantize: add int8 static quantization when no other step is given.

    Returns:
        The passes, in order.

    Raises:
        ConfigError: a malformed ``--lowrank``, ``--lowrank auto`` without a quality
            budget, or ``--weight-share`` with ``--quantize``.
    """
    steps: list[CompressionPass] = []
    if options.lowrank:
        steps.append(parse_lowrank_option(options.lowrank, options.max_accuracy_drop))
    if options.finetune_epochs:
        steps.append(build_pass("finetune", {"epochs": options.finetune_epochs}))
    if options.quantize and options.weight_share:
        raise ConfigError("--weight-share clusters float weights; it cannot follow --quantize", key="weight_share")
    if options.weight_share:
        steps.append(build_pass("weight-share", {"bits": options.weight_share}))
    if options.quantize or (not steps and default_quantize):
        quantize: dict[str, Any] = {"mode": options.quantize or "int8-static"}
        if options.max_accuracy_drop is not None:
            quantize["max_accuracy_drop"] = options.max_accuracy_drop
        if options.guard_ranking is not None:
            quantize["guard_ranking"] = options.guard_ranking
        steps.append(build_pass("quantize", quantize))
    return steps


def parse_prune_option(text: str) -> CompressionPass:
    """A ``--prune KIND:AMOUNT`` value as a pass (see :data:`PRUNE_KINDS`).

    Args:
        text: e.g. ``magnitude:0.8`` or ``channels:0.25`` (case and spaces ignored).

    Returns:
        The pruning pass.

    Raises:
        ConfigError: an unknown kind, a missing or non-numeric amount, or an amount the
            pass refuses.
    """
    kind, _, value = text.strip().lower().partition(":")
    try:
        name, key, extra = PRUNE_KINDS[kind]
        amount = float(value)
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"--prune takes magnitude:S, layer:S, sensitivity:S or channels:R (e.g. magnitude:0.9), not {text!r}",
            key="prune",
        ) from exc
    return build_pass(name, {key: amount, **extra})


def parse_lowrank_option(text: str, max_drop: float | None = None) -> CompressionPass:
    """A ``--lowrank`` value as a pass.

    Args:
        text: a retained energy in (0, 1] (``0.9``), a parameter reduction (``2x``), or
            ``auto`` (pick ranks within ``max_drop``).
        max_drop: the quality budget; ``auto`` needs it.

    Returns:
        The low-rank factorization pass.

    Raises:
        ConfigError: none of those forms, ``auto`` without ``max_drop``, or a value the
            pass refuses.
    """
    spelled = text.strip().lower()
    if spelled == "auto":
        if max_drop is None:
            raise ConfigError("--lowrank auto needs --max-accuracy-drop", key="lowrank")
        return build_pass("lowrank", {"max_drop": max_drop})
    key = "param_ratio" if spelled.endswith("x") else "energy"
    try:
        value = float(spelled.removesuffix("x"))
    except ValueError as exc:
        raise ConfigError(
            f"--lowrank takes an energy in (0, 1], a reduction like 2x, or 'auto', not {text!r}", key="lowrank"
        ) from exc
    return build_pass("lowrank", {key: value})
