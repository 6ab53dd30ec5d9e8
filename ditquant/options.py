"""Dataclass options built from plain data (YAML mappings, jsonargparse namespaces) with errors that name the
option's full path (``model.quant.weight.bits: …``, ``trainer.callbacks[0].init_args.options.rank: …``)."""

from __future__ import annotations

import dataclasses
import re
import typing

from jsonargparse import Namespace

from ditquant.errors import UserError


def build(hint, value, path: str, strict: bool = False):
    """``value`` (a Namespace / mapping / list of them / plain value) as ``hint`` requires, innermost dataclass
    first; a UserError names ``path``. ``strict``: a key the dataclass does not have is an error (jsonargparse
    checks keys itself where it knows the type; a free-form mapping needs it here)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return None if value is None else build(args[0], value, path, strict)
    if typing.get_origin(hint) is list and args and isinstance(value, list):
        return [build(args[0], v, f"{path}[{i}]", strict) for i, v in enumerate(value)]
    if not (dataclasses.is_dataclass(hint) and isinstance(value, (Namespace, dict))):
        return value
    hints = typing.get_type_hints(hint)
    fields = {f.name for f in dataclasses.fields(hint) if f.init}
    items = dict(vars(value) if isinstance(value, Namespace) else value)
    if strict and (unknown := sorted(set(items) - fields)):
        raise UserError(f"{path}: unknown option(s) {', '.join(map(str, unknown))}; {hint.__name__} takes "
                        f"{', '.join(sorted(fields)) or 'no options'}")
    kwargs = {k: build(hints[k], v, f"{path}.{k}", strict) for k, v in items.items() if k in fields}
    try:
        return hint(**kwargs)
    except UserError as e:
        raise UserError(qualify(path, str(e), hint)) from None
    except TypeError as e:
        if not strict:
            raise
        # A free-form mapping is not type-checked by jsonargparse: a string where a number belongs fails in the
        # dataclass's own checks.
        raise UserError(f"{path}: {e}") from None


def qualify(path: str, message: str, cls) -> str:
    """Prefix a dataclass's message with the option path it came from, merging the prefix it may already have."""
    parent, _, last = path.rpartition(".")
    for prefix in (f"{last}.", f"{cls.__name__}."):
        if message.startswith(prefix):
            return f"{path}.{message[len(prefix):]}"
    field = re.match(r"(\w+)[:\s]", message)
    if field and field.group(1) in {f.name for f in dataclasses.fields(cls)}:
        return f"{path}.{message}"
    return f"{path}: {message}"
