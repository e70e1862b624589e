"""Command-line options generated from a flow's typed parameters, and their values parsed back.

Every leaf of a flow's parameters becomes one option: `train(config: TrainConfig)`
gives `--batch-size`, `--normalization`, ...; a mapping (a sweep's space) becomes a
repeated `KEY=VALUES` option plus a file; a list a repeated option. The help of an
option is the one its parameter shows in the Prefect UI: a pydantic field's
`description`, or the flow docstring's `Args:` entry. So the options cannot drift
from the flows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import CliError, describe_validation_error

@dataclasses.dataclass(frozen=True)
class FlowOption:
    """One command-line option standing for one leaf of a flow's parameters.

    path: where the value goes, e.g. ("spec", "base", "batch_size") for the
      batch_size of the sweep's base TrainConfig.
    kind: "scalar" (one value), "mapping" (repeated KEY=VALUES, plus a file) or
      "list" (a repeated option) or "json" (one JSON/YAML text).
    """

    path: tuple[str, ...]
    flag: str
    annotation: Any
    kind: str
    help: str
    panel: str

    @property
    def ident(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


def _strip_optional(annotation) -> tuple[Any, bool]:
    """(annotation without `| None`, whether None was allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return annotation, False


def _base_and_constraints(annotation) -> tuple[Any, list]:
    """Unwrap Annotated[...] (PositiveInt and friends) into the base type and its constraints."""
    constraints = []
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        constraints.extend(extra)
    return annotation, constraints


def _is_model(annotation) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, BaseModel)


def _is_scalar(annotation) -> bool:
    return annotation in (int, float, str, bool) or typing.get_origin(annotation) is Literal


def _describe_constraints(constraints) -> str:
    words = []
    for c in constraints:
        for attr, symbol in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(c, attr, None)
            if value is not None:
                words.append(f"{symbol} {value}")
    return f" Must be {' and '.join(words)}." if words else ""


def _show(value) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, BaseModel):
        return json.dumps(value.model_dump(mode="json"))
    return str(value)


def _leaves(annotation, path, default, description, panel):
    """Yield (path, annotation, kind, help, panel) for every option under one parameter."""
    # A field's own metadata wraps its whole annotation (Annotated[PositiveFloat | None, ...]): unwrap it, the
    # `| None`, then the type's constraints.
    bare, constraints = _base_and_constraints(annotation)
    bare, optional = _strip_optional(bare)
    bare, inner = _base_and_constraints(bare)
    constraints += inner
    if _is_model(bare):
        model_default = default if isinstance(default, bare) else None
        if model_default is None:
            with contextlib.suppress(ValidationError, TypeError):
                model_default = bare()
        title = (bare.__doc__ or bare.__name__).strip().splitlines()[0].rstrip(".")
        for name, field in bare.model_fields.items():
            field_default = getattr(model_default, name, None)
            field_annotation = field.annotation
            if field.metadata:
                field_annotation = Annotated[(field_annotation, *field.metadata)]
            description = field.description or ""
            yield from _leaves(field_annotation, (*path, name), field_default, description,
                               f"{bare.__name__}: {title}")
        return
    text = description or ""
    text += _describe_constraints(constraints)
    if default is not None and default != "":
        text += f" (default: {_show(default)})"
    origin = typing.get_origin(bare)
    if origin is dict:
        kind, option_type = "mapping", list[str]
    elif _is_scalar(bare):
        kind, option_type = "scalar", bare
    elif origin is list and _is_scalar(item := _base_and_constraints(typing.get_args(bare)[0])[0]):
        kind, option_type = "list", list[item]
    else:
        kind, option_type = "json", str
    yield path, option_type, kind, text.strip(), panel


def _flags(paths: list[tuple[str, ...]]) -> list[str]:
    """`--leaf-name` for each path, prefixed with its parents' names only where two would clash.

    The flow's parameter name is left out (train(config) gives `--batch-size`,
    not `--config-batch-size`) unless two parameters clash. Where names clash,
    a single shallowest path keeps the short name: a sweep's own `--name`, and
    `--base-name` for a field of the same name in its base, were there one.
    """
    parts = [p[1:] or p for p in paths]
    depth = [1] * len(paths)

    def name(i):
        return "--" + "-".join(parts[i][-depth[i]:]).replace("_", "-")

    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(paths)):
            groups.setdefault(name(i), []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(i) for i in range(len(paths))]
        for group in clashes:
            shallowest = [i for i in group if len(parts[i]) == min(len(parts[j]) for j in group)]
            for i in group:
                if len(shallowest) == 1 and i in shallowest:
                    continue
                if depth[i] == len(parts[i]):
                    parts[i] = paths[i]  # out of parents: name the flow parameter too
                depth[i] = min(depth[i] + 1, len(parts[i]))


def _signature_hints(fn) -> dict[str, Any]:
    return typing.get_type_hints(fn, include_extras=True)


def flow_options(flow) -> list[FlowOption]:
    """The command-line options for every parameter of a Prefect flow (or plain function)."""
    from prefect.utilities.callables import parameter_docstrings  # what the Prefect UI shows

    fn = getattr(flow, "fn", flow)
    hints = _signature_hints(fn)
    leaves = []
    documented = parameter_docstrings(inspect.getdoc(fn))
    for name, parameter in inspect.signature(fn).parameters.items():
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        description = " ".join(documented.get(name, "").split())
        leaves.extend(_leaves(hints.get(name, str), (name,), default, description, "Flow parameters"))
    flags = _flags([leaf[0] for leaf in leaves])
    reserved = {"--params", "--help", "--output", "--local-server", "--no-local-server"}
    clash = reserved.intersection(flags)
    if clash:
        raise RuntimeError(f"flow parameters clash with cnnflow's own options: {sorted(clash)}")
    return [FlowOption(path, flag, annotation, kind, text, panel)
            for (path, annotation, kind, text, panel), flag in zip(leaves, flags)]


# ---------------------------------------------------------------- values from the command line


def _parse_scalar(text: str):
    """JSON where it parses (numbers, true, null, lists), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    """`KEY=V1,V2` -> (KEY, [V1, V2]); `KEY={low: 1e-4, high: 1e-2, log: true}` -> (KEY, that mapping).

    Values parse as JSON where they can (8 -> 8, 1e-3 -> 0.001, null -> None),
    else stay strings; a value starting with [ or { parses as YAML.
    """
    key, sep, value = text.partition("=")
    key, value = key.strip(), value.strip()
    if not sep or not key:
        raise CliError(f"expected KEY=VALUES, got {text!r}", 2)
    if value[:1] in "[{":
        try:
            return key, yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise CliError(f"cannot parse the value of {key}: {exc}", 2) from exc
    return key, [_parse_scalar(v.strip()) for v in value.split(",")]


def read_mapping_file(path: str | os.PathLike) -> dict:
    """A YAML or JSON file holding one mapping."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", 2) from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}): a YAML or "
                       "JSON file of the flow's parameters was expected", 2) from exc
    except yaml.YAMLError as exc:
        raise CliError(f"{path} is not valid YAML or JSON: {' '.join(str(exc).split())}", 2) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a mapping (key: value), got {type(data).__name__}", 2)
    return data


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def collect_parameters(options: list[FlowOption], given: dict[str, Any], params_file: str | None) -> dict:
    """The flow's parameters: the --params file, overridden by the options given."""
    params = read_mapping_file(params_file) if params_file else {}
    for option in options:
        value = given.get(option.ident)
        if option.kind == "mapping":
            file = given.get(option.ident + "_file")
            mapping = read_mapping_file(file) if file else {}
            mapping.update(parse_assignment(item) for item in (value or []))
            if mapping or file:  # an empty file is passed on, for the flow to refuse, never dropped
                _put(params, option.path, mapping)
            continue
        if value is None or (option.kind == "list" and not value):
            continue
        if option.kind == "list":
            value = list(value)
        elif option.kind == "json":
            value = yaml.safe_load(value)
        _put(params, option.path, value)
    return params


def validate_parameters(flow, params: dict, options: list[FlowOption]) -> dict:
    """Each parameter validated against the flow's annotation: models come back built."""
    fn = getattr(flow, "fn", flow)
    hints = _signature_hints(fn)
    signature = inspect.signature(fn)
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        # A parameter named for what it seeds (data_seed, input_seed) was `seed` before.
        hints = [f"; {name} is now called {found[0]}" for name in unknown
                 if len(found := [p for p in signature.parameters if p.endswith(f"_{name}")]) == 1]
        raise CliError(f"unknown parameters {unknown}; {flow.name if hasattr(flow, 'name') else fn.__name__} "
                       f"takes {sorted(signature.parameters)}{''.join(hints)}", 2)
    validated = {}
    for name, value in params.items():
        try:
            validated[name] = TypeAdapter(hints.get(name, Any)).validate_python(value)
        except ValidationError as exc:
            raise CliError(describe_validation_error(exc, options, root=(name,)), 2) from exc
    return validated


