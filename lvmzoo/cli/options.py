"""A model's hyperparameters as ``lvmzoo fit`` flags, read from the model class itself.

Every dataclass field of a known model (the zoo's, a registered one, an installed
entry point or a ``module:Class`` given on the command line) becomes a flag:
``n_latent`` -> ``--n-latent``, its type from the annotation, its help text from
the ``Attributes:`` (or ``Args:``) section of the class docstring, and the models
that have it.  :func:`lvmzoo.models.base.hyperparameter` fields may rename the
flag, set the smallest accepted value or keep a field off the command line.
Nothing here names a model: a new model gets its flags without touching the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Optional

from lvmzoo.cli._common import UsageError

# Fields that describe how a model is used inside the library, not a choice a user makes.
_INTERNAL = {"freeze_batch_norm"}


@dataclasses.dataclass
class Option:
    """One hyperparameter flag, shared by every model with a field of that name."""

    field: str
    flag: str
    parse: Any  # argparse type, or None for a boolean switch
    metavar: Optional[str]
    help: str
    models: list[str]


def model_class(spec: str):
    """The class of ``MODEL`` (a name or ``module:Class``), or a one-line usage error."""
    from lvmzoo.models.registry import ModelNotFoundError, resolve_model

    try:
        return resolve_model(spec)
    except ModelNotFoundError as err:
        raise UsageError(str(err)) from None


def cli_fields(cls) -> list[dataclasses.Field]:
    """The dataclass fields of ``cls`` offered on the command line."""
    return [f for f in dataclasses.fields(cls)
            if f.init and not f.name.startswith("_") and f.name not in _INTERNAL
            and f.metadata.get("cli", True)]


def flag_of(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("flag", field.name.replace("_", "-"))


def collect_options(models: dict[str, type]) -> dict[str, Option]:
    """field name -> :class:`Option` over every model in ``models``."""
    options: dict[str, Option] = {}
    for name, cls in sorted(models.items()):
        hints = _type_hints(cls)
        docs = field_docs(cls.__doc__)
        for field in cli_fields(cls):
            known = options.get(field.name)
            if known is not None:
                known.models.append(name)
                mine = docs.get(field.name, "")
                if mine and (not known.help or (_refers(known.help)
                                                and not _refers(mine))):
                    known.help = mine  # prefer the model that explains the field itself
                continue
            parse, metavar = _parser_for(hints.get(field.name), field.default)
            options[field.name] = Option(field.name, flag_of(field), parse, metavar,
                                         docs.get(field.name, ""), [name])
    return options


def _refers(help_text: str) -> bool:
    """Whether a field's help only points at another model's ("as in Pseudotime")."""
    return help_text.startswith("as in ") or " as in " in help_text


def add_model_options(parser: argparse.ArgumentParser, models: dict[str, type]) -> None:
    """Add one flag per hyperparameter of ``models`` to the ``fit`` parser."""
    group = parser.add_argument_group(
        "model hyperparameters",
        "Each is a field of the model class (default: the model's own value); a model that "
        "lacks the field refuses the flag.")
    taken = set(parser._option_string_actions)  # the fit options proper win a name clash
    added, clashes = [], []
    for option in collect_options(models).values():
        if option.flag in taken or option.field in _dests(parser):
            clashes.append(option.field)
            continue
        added.append(option.field)
        taken.add(option.flag)
        which = ", ".join(option.models)
        text = f"{option.help} ({which})" if option.help else f"({which})"
        text = text.replace("%", "%%")
        if option.parse is None:
            group.add_argument(option.flag, dest=option.field,
                               action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(option.flag, dest=option.field, type=option.parse,
                               metavar=option.metavar, default=None, help=text)
    # Which args attributes are hyperparameters: a field named like a fit option (e.g.
    # "seed") is not one of them, and keeps the model's default.
    parser.set_defaults(model_fields=tuple(added), model_field_clashes=tuple(clashes))


def _dests(parser) -> set[str]:
    return {action.dest for action in parser._actions}


def given_options(args) -> list[str]:
    """Field names of the hyperparameter flags given on this command line."""
    from lvmzoo.models.registry import available_models

    fields = collect_options(available_models())
    offered = getattr(args, "model_fields", fields)
    return [name for name in fields if name in offered and getattr(args, name, None) is not None]


def option_flag(args, field: str) -> str:
    from lvmzoo.models.registry import available_models

    option = collect_options(available_models()).get(field)
    return option.flag if option else "--" + field.replace("_", "-")


def hyperparameters(cls, args) -> dict[str, Any]:
    """The given hyperparameter flags as keyword arguments of ``cls``, range-checked."""
    from lvmzoo.models.registry import available_models

    mine = {f.name: f for f in cli_fields(cls)}
    offered = getattr(args, "model_fields", None)
    chosen = {}
    for name, option in collect_options(available_models()).items():
        if offered is not None and name not in offered:
            continue  # named like a fit option: not a flag, the model's default stands
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in mine:
            raise UsageError(f"model {cls.name!r} has no {option.flag} option "
                             f"(its hyperparameters: {', '.join(mine) or 'none'})")
        if value is _NONE:  # 'none' on the command line: the field's None
            value = None
        _check_range(mine[name], option.flag, value)
        chosen[name] = value
    return chosen


def _check_range(field: dataclasses.Field, flag: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    minimum = field.metadata.get("minimum")
    if isinstance(value, float) and minimum is None:
        if not value > 0:
            raise UsageError(f"{flag} must be positive, got {value}")
        return
    if minimum is None:
        minimum = 0 if field.default == 0 else 1
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}, got {value}")


# --------------------------------------------------------------------------
# Types and help text from the class
# --------------------------------------------------------------------------


def _type_hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: fall back to the defaults' types
        return {}


def _parser_for(annotation, default):
    """``(argparse type or None for a switch, metavar)`` of a field."""
    kinds = _kinds(annotation, default)
    if kinds == {bool} or kinds == {bool, type(None)}:
        return None, None
    if kinds <= {int, type(None)}:
        return int, "N"
    if kinds <= {float, int, type(None)} and float in kinds:
        return _number(float, none=type(None) in kinds), "X"
    if tuple in kinds:
        return _names, "V[,V...]"
    if str in kinds and len(kinds - {str, type(None)}) > 0:
        return _mixed(kinds), "|".join(_metavar_words(kinds, default))
    return _text(none=type(None) in kinds), "VALUE"


def _kinds(annotation, default) -> set:
    if annotation is None:
        return {type(default)} if default is not dataclasses.MISSING else {str}
    origin = typing.get_origin(annotation)
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        kinds = set()
        for arg in typing.get_args(annotation):
            kinds |= _kinds(arg, dataclasses.MISSING)
        return kinds
    if origin in (tuple, list) or annotation in (tuple, list):
        return {tuple}
    if annotation is typing.Any:
        return {str}
    if origin is typing.Literal:
        return {type(a) for a in typing.get_args(annotation)}
    return {annotation if isinstance(annotation, type) else str}


def _metavar_words(kinds, default) -> list[str]:
    words = []
    if int in kinds:
        words.append("N")
    elif float in kinds:
        words.append("X")
    if isinstance(default, str):
        words.append(default)
    if type(None) in kinds:
        words.append("none")
    return words or ["VALUE"]


def _names(text: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one value")
    return names


def _number(kind, none: bool):
    def parse(text: str):
        if none and text.strip().lower() == "none":
            return _NONE
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def _text(none: bool):
    def parse(text: str):
        return _NONE if none and text.strip().lower() == "none" else text

    parse.__name__ = "text"
    return parse


def _mixed(kinds):
    """A value that may be a number or a word, e.g. ``--kl-warmup auto|N``."""

    def parse(text: str):
        word = text.strip()
        if type(None) in kinds and word.lower() == "none":
            return _NONE
        for kind in (int, float):
            if kind in kinds:
                try:
                    return kind(word)
                except ValueError:
                    pass
        if int in kinds and float not in kinds:
            try:
                float(word)
            except ValueError:
                return word
            raise argparse.ArgumentTypeError(f"expected a whole number or a word, got {text!r}")
        return word

    parse.__name__ = "value"
    return parse


class _NoneValue:
    """``none`` given on the command line: the field's ``None`` (distinct from "not given")."""

    def __repr__(self):
        return "None"


_NONE = _NoneValue()


def field_docs(doc: Optional[str]) -> dict[str, str]:
    """``{field: one-paragraph help}`` from a Google-style ``Attributes:``/``Args:`` section."""
    lines = (doc or "").splitlines()
    out: dict[str, str] = {}
    inside, indent, current = False, None, None
    for line in lines:
        stripped = line.strip()
        if stripped in ("Attributes:", "Args:", "Parameters:"):
            inside, indent, current = True, None, None
            continue
        if not inside:
            continue
        if not stripped:
            current = None
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:  # the section ended
            inside = False
            continue
        match = re.match(r"(\w+(?:,\s*\w+)*)(?:\s*\([^)]*\))?:\s*(.*)", stripped)
        if width == indent and match:
            current = [n.strip() for n in match.group(1).split(",")]
            for name in current:
                out[name] = match.group(2)
        elif current is not None:
            for name in current:
                out[name] += " " + stripped
    return {k: " ".join(re.sub(r":\w+:`~?([^`]*)`", r"\1", v).replace("``", "").split())
            for k, v in out.items()}
