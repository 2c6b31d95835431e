"""MkDocs hook: the policy file and settings references, generated from their pydantic models.

A page holding a marker line gets it replaced by the reference of its model, so the reference
cannot drift from the code: every field's key, type, default, constraints and description (the
field's docstring, read by pydantic's `use_attribute_docstrings`), one section per model reachable
from the root model.

    <!-- policy-reference -->    policies.schema.Policy
    <!-- settings-reference -->  proxy.settings.Settings (with each field's environment variable,
                                 named by proxy.settings.env_variable)

`reference_markdown` is pure (no I/O); the hook functions only find the markers and import the
models. Sections are third-level headings: put a marker under a second-level one. The build
fails when a marker is found on no page.
"""

import importlib
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel, PlainSerializer
from pydantic.fields import FieldInfo

# marker line -> (module, root model, the module's function naming a setting's environment
# variable, or None)
MARKERS: dict[str, tuple[str, str, str | None]] = {
    "<!-- policy-reference -->": ("policies.schema", "Policy", None),
    "<!-- settings-reference -->": ("proxy.settings", "Settings", "env_variable"),
}

EnvVariable = Callable[[Sequence[str]], str]

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


@dataclass
class _Section:
    """A model found from the root: the paths it sits at, and whether it is written as text."""

    model: type[BaseModel]
    paths: list[str] = field(default_factory=list)
    as_text: bool = False


def _is_model(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _written_as_text(metadata: tuple[object, ...]) -> bool:
    """A model annotated with a serializer to `str`: written in the file as one string."""
    return any(isinstance(m, PlainSerializer) and m.return_type is str for m in metadata)


def _is_union(origin: object) -> bool:
    return origin is Union or origin is types.UnionType


def _nested(annotation: object, suffix: str = "") -> Iterator[tuple[type[BaseModel], str, bool]]:
    """The models inside `annotation`: each with the path suffix that reaches it (`[]` for a list
    item, `.<name>` for a map value) and whether it is written as text."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        base, *metadata = args
        if _is_model(base):
            yield base, suffix, _written_as_text(tuple(metadata))
        else:
            yield from _nested(base, suffix)
    elif _is_union(origin):
        for arg in args:
            yield from _nested(arg, suffix)
    elif origin in (list, tuple, set, frozenset):
        for arg in args:
            if arg is not Ellipsis:
                yield from _nested(arg, suffix + "[]")
    elif origin is dict:
        yield from _nested(args[1], suffix + ".<name>")
    elif _is_model(annotation):
        yield annotation, suffix, False


def _sections(root: type[BaseModel]) -> list[_Section]:
    """Every model reachable from `root` (itself first), in the order the fields reach them."""
    found: dict[type[BaseModel], _Section] = {}

    def walk(model: type[BaseModel], path: str, as_text: bool, stack: tuple[type, ...]) -> None:
        section = found.setdefault(model, _Section(model, as_text=as_text))
        if path:
            section.paths.append(path)
        if model in stack or as_text:
            return
        for name, info in model.model_fields.items():
            key = info.alias or name
            for sub, suffix, text in _nested(_full_annotation(info)):
                walk(sub, f"{path}.{key}{suffix}".lstrip("."), text, (*stack, model))

    walk(root, "", False, ())
    return list(found.values())


def _full_annotation(info: FieldInfo) -> object:
    """The field's annotation with the metadata pydantic lifted out of it put back."""
    if info.metadata:
        return Annotated[(info.annotation, *info.metadata)]
    return info.annotation


def anchor(model: type[BaseModel]) -> str:
    """The id of a model's section (as the toc extension makes it from the heading)."""
    return model.__name__.lower()


def _model_link(model: type[BaseModel], as_text: bool) -> str:
    link = f"[{model.__name__}](#{anchor(model)})"
    return f"string, read as {link}" if as_text else link


def type_text(annotation: object) -> str:
    """A reader's name of a field's type, models linked to their sections."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        base, *metadata = args
        if _is_model(base):
            return _model_link(base, _written_as_text(tuple(metadata)))
        return type_text(base)
    if _is_union(origin):
        names = [type_text(arg) for arg in args if arg is not type(None)]
        return names[0] if len(names) == 1 else "one of " + ", ".join(names)
    if origin is Literal:
        return " or ".join(f"`{json.dumps(arg)}`" for arg in args)
    if origin in (list, tuple, set, frozenset):
        return "list of " + type_text(args[0]) if args else "list"
    if origin is dict:
        return f"map of {type_text(args[0])} to {type_text(args[1])}"
    if _is_model(annotation):
        return _model_link(annotation, False)
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    return f"`{getattr(annotation, '__name__', annotation)}`"


def _plural(noun: str, count: int) -> str:
    return noun.removesuffix("s") if count == 1 else noun


def _bounds(metadata: typing.Iterable[object], noun: str) -> Iterator[str]:
    for item in metadata:
        if isinstance(item, FieldInfo):
            yield from _bounds(item.metadata, noun)
            if item.discriminator is not None:
                yield f"picked by `{item.discriminator}`"
        elif isinstance(item, annotated_types.Gt):
            yield f"> {item.gt}"
        elif isinstance(item, annotated_types.Ge):
            yield f"≥ {item.ge}"
        elif isinstance(item, annotated_types.Lt):
            yield f"< {item.lt}"
        elif isinstance(item, annotated_types.Le):
            yield f"≤ {item.le}"
        elif isinstance(item, annotated_types.MinLen):
            yield f"at least {item.min_length} {_plural(noun, item.min_length)}"
        elif isinstance(item, annotated_types.MaxLen):
            yield f"at most {item.max_length} {_plural(noun, item.max_length)}"
        elif getattr(item, "pattern", None) is not None:
            yield f"matches `{item.pattern}`"


def constraints(annotation: object, where: str = "") -> list[str]:
    """The constraints inside an annotation, those on items and map keys said so."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        base, *metadata = args
        base_origin = typing.get_origin(base)
        noun = "characters" if base is str else "items" if base_origin in (list, dict) else "values"
        return [where + bound for bound in _bounds(metadata, noun)] + constraints(base, where)
    if _is_union(origin):
        return [bound for arg in args for bound in constraints(arg, where)]
    if origin in (list, tuple, set, frozenset) and args:
        return constraints(args[0], where + "each item ")
    if origin is dict:
        return constraints(args[0], where + "each key ") + constraints(args[1], where + "each value ")
    return []


def _plain(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_defaults=True)
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def default_text(info: FieldInfo) -> str:
    """`required`, `unset` (None), a model's own defaults, or the default as JSON."""
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, BaseModel) and not _plain(value):
        return f"[its defaults](#{anchor(type(value))})"
    return f"`{json.dumps(_plain(value), ensure_ascii=False)}`"


def _cell(text: str) -> str:
    """`text` fit for one table cell: one line, pipes outside code escaped."""
    parts = " ".join(text.split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _env_name(env_variable: EnvVariable, path: str, key: str) -> str | None:
    """The variable of the key at `path`, or None under a list item or a map value (which no
    variable reaches)."""
    parts = [*path.split("."), key] if path else [key]
    if any("[" in part or "<" in part for part in parts):
        return None
    return env_variable(parts)


def reference_markdown(root: type[BaseModel], level: int = 2, env_variable: EnvVariable | None = None) -> str:
    """The reference of `root` and every model reachable from it, one section each: where the
    model sits, its docstring, and a table of its fields (key, type, default, constraints,
    description). With `env_variable`, each key of a model at one fixed path is given the
    environment variable that sets it, as `env_variable` names it."""
    hashes = "#" * level
    out: list[str] = []
    for section in _sections(root):
        model = section.model
        out.append(f"{hashes} {model.__name__}\n")
        if section.paths:
            where = ", ".join(f"`{path}`" for path in section.paths)
            out.append(f"*{'Written at' if section.as_text else 'At'}:* {where}\n")
        elif model is root:
            out.append("*At:* the top level of the file\n")
        if model.__doc__:
            out.append(inspect.cleandoc(model.__doc__) + "\n")
        fixed_path = section.paths[0] if len(section.paths) == 1 else "" if model is root else None
        first = "field (not a key)" if section.as_text else "key"
        out.append(f"| {first} | type | default | constraints | description |")
        out.append("| --- | --- | --- | --- | --- |")
        for name, info in model.model_fields.items():
            key = info.alias or name
            key_cell = f"`{key}`"
            annotation = _full_annotation(info)
            # a section's own keys have their variables; a whole section is set key by key
            section_field = any(not suffix for _, suffix, _ in _nested(annotation))
            keyed = fixed_path is not None and not section.as_text and not section_field
            if env_variable is not None and keyed:
                env = _env_name(env_variable, fixed_path, key)
                if env is not None:
                    key_cell += f"<br>`{env}`"
            bounds = constraints(annotation)
            if info.discriminator is not None:
                bounds.append(f"picked by `{info.discriminator}`")
            row = [
                key_cell,
                type_text(annotation),
                default_text(info),
                "; ".join(bounds) or "–",
                info.description or "",
            ]
            out.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
        out.append("")
    return "\n".join(out)


# --- the hook: finds the markers, imports the models ---------------------------------------------

_replaced: set[str] = set()


def _import(module: str) -> types.ModuleType:
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(module)


def on_pre_build(config: Any, **kwargs: Any) -> None:
    _replaced.clear()


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    lines = markdown.split("\n")
    for i, line in enumerate(lines):
        target = MARKERS.get(line.strip())
        if target is not None:
            module_name, name, env_function = target
            module = _import(module_name)
            env_variable = getattr(module, env_function) if env_function else None
            lines[i] = reference_markdown(getattr(module, name), 3, env_variable)
            _replaced.add(line.strip())
    return "\n".join(lines)


def on_post_build(config: Any, **kwargs: Any) -> None:
    from mkdocs.exceptions import PluginError

    missing = sorted(set(MARKERS) - _replaced)
    if missing:
        raise PluginError(f"schema_reference: no page holds the marker(s) {', '.join(missing)}")
