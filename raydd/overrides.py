"""``--set KEY=VALUE``: one parser for every command, typed by the dataclass the keys set.

``raydd farm`` sets a recipe's config, ``raydd condense`` and ``raydd reproduce`` a method's, ``raydd evaluate``
the evaluation protocol's. Each value is read by the annotation of the field it sets — ``dsa=False`` is the bool
False, ``lr=1`` the float 1.0, ``keep_epochs=none`` None, ``milestones=0.5,0.75`` a tuple — and a key the
dataclass does not have, or a value its annotation does not accept, is one ``ValueError`` line naming the key,
the value and what is accepted, before any work starts.

``check_annotations`` is the other half: every typed config (methods, recipes) enforces its annotations on
construction the same way, so a value that arrives from YAML, JSON or Python is held to the same types.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_NONE = ("none", "null")


def split_assignments(items: list[str] | tuple[str, ...] | None) -> dict[str, str]:
    """``["KEY=VALUE", ...]`` -> ``{KEY: VALUE}`` as text (the last of a repeated key wins)."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r} is invalid: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def describe(hint: Any, *, as_text: bool = False) -> str:
    """An annotation in words, for error lines: ``int or None``; ``as_text``: how a ``--set`` value is written
    (``bool (true or false)``)."""
    names = []
    for option in _options(hint):
        if option is type(None):
            names.append("None")
        elif option is bool:
            names.append("bool (true or false)" if as_text else "bool")
        elif typing.get_origin(option) in (tuple, list) and as_text:
            names.append("a comma-separated list or a JSON list")
        elif (typing.get_origin(option) is dict or option is dict) and as_text:
            names.append("a JSON object")
        else:
            names.append(getattr(option, "__name__", str(option)))
    return " or ".join(names)


def _read_one(option: Any, text: str) -> Any:
    """``text`` as one annotation option (no unions); ValueError where it is not one."""
    lowered = text.lower()
    if option is type(None):
        if lowered in _NONE:
            return None
    elif option is bool:
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    elif option is int:
        return int(text)
    elif option is float:
        return float(text)
    elif option is str:
        return text
    elif typing.get_origin(option) in (tuple, list):
        args = [a for a in typing.get_args(option) if a is not Ellipsis]
        item = args[0] if len(args) == 1 or (args and all(a == args[0] for a in args)) else Any
        if text.startswith("["):
            values = json.loads(text)
            if not isinstance(values, list):
                raise ValueError(text)
        else:
            values = [v.strip() for v in text.split(",") if v.strip()]
        parsed = [v if not isinstance(v, str) or item is Any else read_value(item, v) for v in values]
        return tuple(parsed) if typing.get_origin(option) is tuple else parsed
    elif typing.get_origin(option) is dict or option is dict:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    else:  # Any or a type without a text form: JSON where it parses, else the text
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    raise ValueError(text)


def read_value(hint: Any, text: str) -> Any:
    """``text`` read as annotation ``hint``: the first option of a union that reads it, None first and str last
    (``model: str | dict`` reads ``{"arch": "convnet"}`` as a dict, ``convnet`` as a name)."""
    options = sorted(_options(hint), key=lambda o: 0 if o is type(None) else 2 if o is str else 1)
    for option in options:
        try:
            return _read_one(option, text)
        except (ValueError, TypeError, json.JSONDecodeError):
            continue
    raise ValueError(text)


def typed_overrides(cls: type, items: list[str] | tuple[str, ...] | None, *, aliases: dict[str, str] | None = None,
                    exclude: tuple[str, ...] = (), what: str | None = None, noun: str = "key") -> dict[str, Any]:
    """``--set`` items read by the annotations of dataclass ``cls``'s fields: ``{field: value}``. An alias
    (``aliases``: the sweep symbols λ, τ, α, ζ of a method) is replaced by the field it names; ``exclude`` lists
    fields that are not set this way; ``what`` and ``noun`` name the dataclass and its fields in errors. Unknown
    keys and unreadable values: one ValueError line."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    aliases = dict(aliases or {})
    what = what or cls.__name__
    out: dict[str, Any] = {}
    for key, text in split_assignments(items).items():
        name = aliases.get(key, key)
        if name not in fields:
            accepted = fields + [f"{a} (= {t})" for a, t in aliases.items()]
            raise ValueError(f"--set {key}={text}: unknown {what} {noun} {key!r}: accepted {', '.join(accepted)}")
        try:
            out[name] = read_value(hints[name], text)
        except ValueError:
            raise ValueError(f"--set {key}={text} is invalid: {what}.{name} expects "
                             f"{describe(hints[name], as_text=True)}") from None
    return out


def check_type(owner: str, name: str, hint: Any, value: Any) -> Any:
    """``value`` held to annotation ``hint``: ints are accepted (and converted) for floats, a JSON list for a
    tuple; a bool is never a number and a number never a bool. Returns the value to store."""
    options = _options(hint)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (bool, str) and isinstance(value, option):
            return value
        if typing.get_origin(option) is tuple and isinstance(value, list):
            value = tuple(value)  # JSON (checkpoints, CLI) has no tuples
        if option not in (int, float, bool, str, type(None)) and _loosely_is(value, option):
            return value
    raise ValueError(f"{owner}.{name}={value!r} is invalid: expected {describe(hint)}")


def _loosely_is(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint) or hint
    return not isinstance(origin, type) or isinstance(value, origin)


def check_annotations(config: Any) -> None:
    """Hold every field of frozen dataclass ``config`` to its annotation (``check_type``), in place."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = check_type(type(config).__name__, f.name, hints[f.name], getattr(config, f.name))
        object.__setattr__(config, f.name, value)
