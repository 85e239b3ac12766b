"""Typed settings: a method declares each setting once; a profile is a set of overrides.

A :class:`Setting` has a name, a type, a default, one line of help and, optionally, the values
it may take (``choices``) or a range (``minimum``/``maximum``). A method's settings form a
:class:`SettingsSchema`; :meth:`SettingsSchema.resolve` applies a profile's overrides and the
user's ``--set KEY=VALUE`` overrides and returns a :class:`Settings`, an immutable mapping whose
values have the declared types (``settings.epochs`` is an ``int``, ``settings.layers`` a tuple
of ints), so plugins never convert what they read.

Types
-----
``bool``, ``int``, ``float``, ``str``, ``tuple[int, ...]``, ``tuple[float, ...]``,
``tuple[str, ...]``, ``tuple[tuple[int, ...], ...]`` and ``dict[str, float]`` (or ``dict[str,
str]``, ``dict[str, int]``). An ``int`` is accepted where a ``float`` is declared; a list where
a tuple is. On the command line a value is parsed by its declared type: ``--set epochs=5``,
``--set layers=2,3`` or ``--set layers=[2,3]``, ``--set pretrained=false``,
``--set per_category='{"screw": 0.3}'``.

Open choices
------------
Where a paper leaves a value open, the setting's ``choice`` says what the default is and why,
and what the authors' code does where it exists. ``harness describe`` lists them and every
record repeats them under ``method_info.choices``.

Plugins written before typed settings (a ``profiles`` dict that defines every setting, and
``settings_help``) keep working: :func:`schema_from_profiles` infers each setting's type from
its value.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

from harness.errors import UsageError

_MISSING = object()


class SettingError(ValueError):
    """A value does not fit a setting's type, choices or range; the message says what would."""


@dataclass(frozen=True)
class Setting:
    """One setting of a method.

    Attributes
    ----------
    name : str
        Identifier (``--set NAME=VALUE``); the same concept has the same name in every plugin
        (see :data:`SHARED_NAMES`).
    type : type
        One of the types listed in the module docstring.
    default : object
        The value when no profile overrides it.
    help : str
        One line shown by ``harness describe``.
    choices : tuple, optional
        The allowed values (for a tuple type: the allowed elements).
    minimum, maximum : float, optional
        Inclusive bounds of a number (for a tuple type: of every element).
    choice : str
        For a value the paper leaves open: why the default, and what the authors' code does.
    """

    name: str
    type: Any
    default: Any
    help: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    choice: str = ""

    def __post_init__(self) -> None:
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        # The default must itself be valid: a wrong default is the plugin's bug, found at import.
        object.__setattr__(self, "default", self.coerce(self.default))

    # -- values ---------------------------------------------------------------------------
    def coerce(self, value: Any) -> Any:
        """Return ``value`` converted to the declared type, or raise :class:`SettingError`."""
        converted = _coerce(self.type, value, self.name)
        for item in (converted if _is_tuple_type(self.type) else (converted,)):
            self._check_bounds(item)
        return converted

    def parse(self, text: str) -> Any:
        """Parse a command-line value by the declared type."""
        return self.coerce(_parse_text(self.type, text, self.name))

    def _check_bounds(self, item: Any) -> None:
        if self.choices is not None and not isinstance(item, tuple) and item not in self.choices:
            raise SettingError(f"setting {self.name!r}: {item!r} is not allowed; choose from "
                               f"{', '.join(map(repr, self.choices))}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            if self.minimum is not None and item < self.minimum:
                raise SettingError(f"setting {self.name!r}: {item!r} is below the minimum {self.minimum!r}")
            if self.maximum is not None and item > self.maximum:
                raise SettingError(f"setting {self.name!r}: {item!r} is above the maximum {self.maximum!r}")

    def describe_type(self) -> str:
        """The type as text, e.g. ``int``, ``tuple[int, ...]``, with the choices or range."""
        text = _type_name(self.type)
        if self.choices is not None:
            text += " in {" + ", ".join(map(repr, self.choices)) + "}"
        elif self.minimum is not None or self.maximum is not None:
            low = "-inf" if self.minimum is None else repr(self.minimum)
            high = "inf" if self.maximum is None else repr(self.maximum)
            text += f" in [{low}, {high}]"
        return text


#: Names that mean the same thing in every first-party plugin (a third party should reuse them).
SHARED_NAMES: Mapping[str, str] = {
    "image_size": "side of the square input the harness resizes images to (pixels)",
    "eval_batch_size": "images per predict call (the FPS figure states it)",
    "train_batch_size": "images (or feature tensors) per training step",
    "epochs": "training epochs over the job's training images",
    "lr": "learning rate of the main optimiser",
    "backbone": "timm name of the pretrained feature extractor",
    "backbone_layers": "timm feature stages of the backbone that are used",
    "backbone_pretrained": "load the backbone's ImageNet weights from disk; false = seeded random init",
    "backbone_weights_file": "explicit path of the backbone weights file (optional)",
    "sd_pretrained": "load Stable Diffusion weights from disk; false = seeded random init",
    "sd_path": "explicit Stable Diffusion folder or single-file checkpoint (optional)",
    "precision": "numeric precision of training and inference: fp32, bf16 or fp16 (autocast)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "smoothing_sigma": "Gaussian sigma (pixels) applied to the anomaly map",
    "inference_seed": "seed of the noise drawn at inference",
    "interpolation": "resampling used when resizing images to image_size",
    "antialias": "resize with Pillow's antialiased filter (true) or OpenCV's cv2.resize, which does not antialias "
                 "(false)",
    "resize_mode": "'square' (both sides to image_size) or 'shorter_side' (the shorter side, aspect ratio kept)",
}

#: The precisions ``--precision`` accepts.
PRECISIONS = ("fp32", "bf16", "fp16")
#: Resampling filters for the ``interpolation`` setting.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
#: Values of the ``resize_mode`` setting (see :func:`harness.data.resized_shape`).
RESIZE_MODES = ("square", "shorter_side")


def image_size(default: int, **kwargs: Any) -> Setting:
    """The ``image_size`` setting: the side the runner resizes inputs to before fit and predict."""
    return Setting("image_size", int, default, kwargs.pop("help", SHARED_NAMES["image_size"]), minimum=1, **kwargs)


def eval_batch_size(default: int, **kwargs: Any) -> Setting:
    """The ``eval_batch_size`` setting: the batch size the runner uses for ``predict``."""
    return Setting("eval_batch_size", int, default, kwargs.pop("help", SHARED_NAMES["eval_batch_size"]), minimum=1,
                   **kwargs)


def precision(default: str = "fp32", **kwargs: Any) -> Setting:
    """The ``precision`` setting (``--precision`` sets it)."""
    return Setting("precision", str, default, kwargs.pop("help", SHARED_NAMES["precision"]), choices=PRECISIONS,
                   **kwargs)


def interpolation(default: str, **kwargs: Any) -> Setting:
    """The ``interpolation`` setting: how the runner resizes images to ``image_size``."""
    return Setting("interpolation", str, default, kwargs.pop("help", SHARED_NAMES["interpolation"]),
                   choices=INTERPOLATIONS, **kwargs)


def antialias(default: bool, **kwargs: Any) -> Setting:
    """The ``antialias`` setting: Pillow's antialiased resize (true) or OpenCV's ``cv2.resize`` (false)."""
    return Setting("antialias", bool, default, kwargs.pop("help", SHARED_NAMES["antialias"]), **kwargs)


def resize_mode(default: str, **kwargs: Any) -> Setting:
    """The ``resize_mode`` setting: ``square`` or ``shorter_side`` (aspect ratio kept)."""
    return Setting("resize_mode", str, default, kwargs.pop("help", SHARED_NAMES["resize_mode"]), choices=RESIZE_MODES,
                   **kwargs)


class Settings(Mapping[str, Any]):
    """Resolved, typed, immutable settings of one job; values read as attributes or keys.

    Parameters
    ----------
    values : mapping
        Already validated values, in the schema's order.
    schema : SettingsSchema, optional
        Where the values were resolved (kept for :meth:`replace` and ``describe``).
    """

    __slots__ = ("_values", "_schema")

    def __init__(self, values: Mapping[str, Any], schema: "SettingsSchema | None" = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_schema", schema)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            known = ", ".join(self._values)
            raise AttributeError(f"no setting {name!r}; settings: {known}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("settings are immutable; use settings.replace(name=value)")

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __hash__(self) -> int:
        return hash(json.dumps(self.as_json(), sort_keys=True))

    @property
    def schema(self) -> "SettingsSchema | None":
        """The schema the values were resolved against."""
        return self._schema

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (validated when the schema is known)."""
        values = dict(self._values)
        for name, value in changes.items():
            if self._schema is not None:
                value = self._schema.setting(name).coerce(value)
            values[name] = value
        return Settings(values, self._schema)

    def as_json(self) -> dict[str, Any]:
        """The values as JSON-ready data (tuples become lists)."""
        return {k: _jsonable(v) for k, v in self._values.items()}


@dataclass(frozen=True)
class SettingsSchema:
    """The settings of a method, in declaration order.

    Parameters
    ----------
    settings : sequence of Setting
    inferred : bool
        True for a schema inferred from an old-style plugin's profiles.
    """

    settings: tuple[Setting, ...]
    inferred: bool = False
    _by_name: dict[str, Setting] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", tuple(self.settings))
        by_name: dict[str, Setting] = {}
        for setting in self.settings:
            if not isinstance(setting, Setting):
                raise TypeError(f"settings must be harness.Setting objects, got {type(setting).__name__}")
            if setting.name in by_name:
                raise ValueError(f"setting {setting.name!r} is declared twice")
            by_name[setting.name] = setting
        object.__setattr__(self, "_by_name", by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Setting]:
        return iter(self.settings)

    @property
    def names(self) -> tuple[str, ...]:
        """Setting names in declaration order."""
        return tuple(self._by_name)

    def setting(self, name: str) -> Setting:
        """The setting called ``name``; :class:`UsageError` listing the known ones otherwise."""
        try:
            return self._by_name[name]
        except KeyError:
            raise UsageError(f"{name!r} is not a setting; settings: {', '.join(self._by_name)}") from None

    def defaults(self) -> dict[str, Any]:
        """Every setting's default."""
        return {s.name: s.default for s in self.settings}

    def check_overrides(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Validate overrides given as values (a profile); return them coerced.

        Raises
        ------
        SettingError
            For an unknown name or a bad value, naming the setting.
        """
        out = {}
        for name, value in overrides.items():
            if name not in self._by_name:
                raise SettingError(f"{name!r} is not a setting (settings: {', '.join(self._by_name)})")
            out[name] = self._by_name[name].coerce(value)
        return out

    def parse_overrides(self, texts: Mapping[str, str]) -> dict[str, Any]:
        """Parse ``--set`` values (strings) by the declared types.

        Raises
        ------
        UsageError
            Naming the option, the setting and what it accepts.
        """
        out = {}
        for name, text in texts.items():
            if name not in self._by_name:
                raise UsageError(f"--set {name}: not a setting; settings: {', '.join(self._by_name)}")
            setting = self._by_name[name]
            try:
                out[name] = setting.parse(text)
            except SettingError as exc:
                raise UsageError(f"--set {name}={text}: {exc} (type {setting.describe_type()})") from None
        return out

    def resolve(self, profile: Mapping[str, Any] = (), overrides: Mapping[str, Any] = ()) -> Settings:
        """Defaults, then ``profile``'s overrides, then ``overrides``; every value validated."""
        values = self.defaults()
        values.update(self.check_overrides(dict(profile)))
        values.update(self.check_overrides(dict(overrides)))
        return Settings(values, self)

    def differences(self, settings: Mapping[str, Any], profile: Mapping[str, Any]) -> dict[str, Any]:
        """Settings whose value differs from what ``profile`` alone resolves to."""
        base = self.resolve(profile)
        return {k: _jsonable(v) for k, v in settings.items() if base.get(k, _MISSING) != v}


def schema_from_profiles(profiles: Mapping[str, Mapping[str, Any]], help_texts: Mapping[str, str] | None = None
                         ) -> SettingsSchema:
    """Infer a schema from an old-style plugin's profiles (each defines every setting).

    Each setting's type is the type of its value in the first profile that defines it (a tuple
    of ints, of floats or of strings is recognised; anything else keeps its value as given);
    its default is that value. ``help_texts`` (the old ``settings_help``) becomes the help.
    """
    help_texts = help_texts or {}
    seen: dict[str, Setting] = {}
    for values in profiles.values():
        for name, value in values.items():
            if name not in seen:
                seen[name] = Setting(name, _infer_type(value), value, help_texts.get(name, ""))
    return SettingsSchema(tuple(seen.values()), inferred=True)


# -- type machinery ---------------------------------------------------------------------------

def _is_tuple_type(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin is None:
        return getattr(tp, "__name__", str(tp))
    args = typing.get_args(tp)
    if origin is tuple:
        return f"tuple[{_type_name(args[0])}, ...]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return str(tp)


def _infer_type(value: Any) -> Any:
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return float
    if isinstance(value, str):
        return str
    if isinstance(value, (tuple, list)):
        kinds = {_infer_type(v) for v in value}
        if len(kinds) == 1 and (kind := kinds.pop()) in (int, float, str, bool):
            return tuple[kind, ...]
        if kinds <= {int, float} and kinds:
            return tuple[float, ...]
        return Any
    return Any


def _coerce(tp: Any, value: Any, name: str) -> Any:
    def fail(expected: str) -> SettingError:
        return SettingError(f"setting {name!r}: expected {expected}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    origin = typing.get_origin(tp)
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)):
            raise fail(f"a list of {_type_name(typing.get_args(tp)[0])}")
        return tuple(_coerce(typing.get_args(tp)[0], v, name) for v in value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(key_type, k, name): _coerce(value_type, v, name) for k, v in value.items()}
    raise SettingError(f"setting {name!r} declares an unsupported type {tp!r}")


def _parse_text(tp: Any, text: str, name: str) -> Any:
    text = text.strip()
    if tp is str:
        return text
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise SettingError(f"setting {name!r}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            number = json.loads(text)
        except ValueError:
            raise SettingError(f"setting {name!r}: expected a number, got {text!r}") from None
        return number
    origin = typing.get_origin(tp)
    if origin is tuple:
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError:
                raise SettingError(f"setting {name!r}: {text!r} is not a JSON list") from None
        if not text:
            return ()
        inner = typing.get_args(tp)[0]
        return [_parse_text(inner, part, name) for part in text.split(",")]
    if origin is dict:
        try:
            return json.loads(text or "{}")
        except ValueError:
            raise SettingError(f"setting {name!r}: {text!r} is not a JSON object") from None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_profiles(schema: SettingsSchema, profiles: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Problems of ``profiles`` against ``schema`` (unknown names, bad values), one line each."""
    problems = []
    for profile, values in profiles.items():
        try:
            schema.check_overrides(values)
        except SettingError as exc:
            problems.append(f"profile {profile!r}: {exc}")
    return problems


def describe_settings(schema: SettingsSchema, settings: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready row per setting: name, type, value, default, help, choice."""
    rows = []
    for setting in schema:
        rows.append({"name": setting.name, "type": setting.describe_type(), "value": _jsonable(settings.get(
            setting.name, setting.default)), "default": _jsonable(setting.default), "help": setting.help,
            "choice": setting.choice})
    return rows


def open_choices(schema: SettingsSchema, settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``method_info.choices``: every setting with a ``choice`` note, its value and the note."""
    return {s.name: {"value": _jsonable(settings.get(s.name, s.default)), "why": s.choice}
            for s in schema if s.choice}


__all__ = ["Setting", "Settings", "SettingsSchema", "SettingError", "SHARED_NAMES", "PRECISIONS", "INTERPOLATIONS",
           "RESIZE_MODES", "image_size", "eval_batch_size", "precision", "interpolation", "antialias", "resize_mode",
           "schema_from_profiles", "check_profiles",
           "describe_settings", "open_choices"]
