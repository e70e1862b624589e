"""`cnnflow`: run, schedule and inspect the project's Prefect flows from a shell.

    cnnflow run train --normalization groupnorm --batch-size 8
    cnnflow run sweep --space normalization=batchnorm,groupnorm --space batch_size=8,32
    cnnflow serve            # the deployments of prefect.yaml, on their schedules
    cnnflow ui               # the MLflow UI on the project's store, at 127.0.0.1
    cnnflow runs             # recent MLflow runs: params and accuracies

The options of `cnnflow run X` are generated from flow X's typed parameters (its
signature and the pydantic models in it), so they cannot drift from the flow.
Errors are one line on stderr: exit code 2 for parameters the flow refuses,
1 for a run that failed; `cnnflow --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import types
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError
from typer.core import TyperGroup

# The flows `cnnflow run` knows: command name -> "module:function".
FLOWS = {
    "pipeline": "flows.pipeline:pipeline",
    "train": "flows.train:train",
    "sweep": "flows.sweep:sweep",
    "gradient-check": "flows.gradient_check:gradient_check",
    "load-data": "flows.load_data:load_data",
}

# Help for a parameter whose pydantic Field carries no description: by "Model.field"
# or "flow_function.parameter", else by bare name, else from the model's or flow's
# docstring (`name: text`). tests/ops checks that every option has help.
FIELD_HELP = {
    "dataset": "Dataset to load.",
    "num_train": "Training images to use (a seeded subset); all when unset.",
    "num_val": "Validation images to use (a seeded subset); the loader's split when unset.",
    "num_test": "Test images to use (a seeded subset); all when unset.",
    "data_seed": "Seed of the train/val/test split and subsets.",
    "normalization": "Normalization after the convolution.",
    "num_groups": "Groups for groupnorm; must divide --num-filters.",
    "num_filters": "Convolution filters.",
    "filter_size": "Convolution filter size (odd, so H and W are kept).",
    "hidden_dim": "Units in the hidden affine layer.",
    "weight_scale": "Standard deviation of the initial weights.",
    "reg": "L2 regularisation strength.",
    "update_rule": "Optimiser.",
    "learning_rate": "Initial learning rate.",
    "lr_decay": "Learning-rate factor applied after each epoch.",
    "batch_size": "Minibatch size.",
    "num_epochs": "Training epochs.",
    "dtype": "Floating-point type of data and weights.",
    "TrainConfig.seed": "Seed of the weight initialisation and minibatch order.",
    "seed": "Random seed.",
    "gradient_check.seed": "Seed of the random inputs of the checks.",
    "load_data.seed": "Seed of the train/val/test split and subsets.",
    "load_data.dtype": "Floating-point type of the images.",
    "only": "Run only the checks with this name; repeatable. Default: every check.",
    "run_name": "MLflow run name; default: derived from the configuration.",
    "parent_run_id": "MLflow run to nest this run under.",
    "device": "Where to train: cpu, or cuda (needs CuPy and a GPU).",
    "SweepSpec.study": "Write this study's table, figure and report on the sweep's parent run "
                       "(bn-vs-gn: the Group Normalization paper's batch-size comparison).",
    "max_workers": "Trials trained at once on this machine.",
    "pipeline.space": "Grid of values per TrainConfig field for the pipeline's sweep.",
    "SweepSpec.name": "Name of the sweep (its MLflow parent run and Prefect artifacts).",
    "SweepSpec.seed": "Seed of a random search's draws.",
    "space": "Values per TrainConfig field: a list (grid or random) or an interval {low, high, log} (random).",
    "search": "grid: every combination; random: --num-trials seeded draws.",
    "num_trials": "Trials of a random search.",
    "experiment": "MLflow experiment to log to.",
    "tracking_uri": "MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.",
    "dask_address": "Address of a Dask scheduler (tcp://host:8786) to run the trials on; this machine when unset.",
}

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"

app = typer.Typer(
    name="cnnflow",
    help="Run, schedule and inspect cnncore's Prefect flows, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CliError(Exception):
    """A failure to report as one line, with an exit code."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


_DEBUG = False


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False):
    global _DEBUG
    _DEBUG = debug


def _fail(message: str, exit_code: int = 1) -> typing.NoReturn:
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(exit_code)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """Turn any exception into `error: ...` on stderr and a non-zero exit (unless --debug)."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as exc:
        if _DEBUG:
            raise
        if isinstance(exc, CliError):
            _fail(str(exc), exc.exit_code)
        if isinstance(exc, ValidationError):
            _fail(describe_validation_error(exc), 2)
        if isinstance(exc, ValueError) or type(exc).__module__.startswith(("flows.", "cnncore.")):
            _fail(str(exc), 1)  # the project's own errors say what went wrong and what to do
        _fail(f"{type(exc).__name__}: {exc}", 1)


# ---------------------------------------------------------------- options from typed parameters


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


def docstring_help(obj, names: list[str]) -> dict[str, str]:
    """Parameter help written in obj's docstring as `name: text` (or `a, b: text`), by name.

    A parameter's text runs to the next documented name or the end of its
    paragraph, leaving out a closing "Returns ..." or "Raises ..." sentence.
    """
    if not names:
        return {}
    known = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    start = re.compile(rf"(?:^|(?<=[.;] ))((?:{known})(?:, (?:{known}))*): ")
    found: dict[str, str] = {}
    for paragraph in re.split(r"\n\s*\n", inspect.getdoc(obj) or ""):
        text = " ".join(paragraph.split())
        matches = list(start.finditer(text))
        for match, after in zip(matches, [*matches[1:], None]):
            body = text[match.end():after.start() if after else len(text)].strip().rstrip(";")
            body = re.split(r"(?<=\.) (?=Returns |Raises )", body)[0]
            for name in match.group(1).split(", "):
                found.setdefault(name, body[:1].upper() + body[1:])
    return found


def _help(owner: str, name: str, documented: dict[str, str]) -> str:
    """FIELD_HELP's "owner.name", else FIELD_HELP's name, else the owner's docstring."""
    return FIELD_HELP.get(f"{owner}.{name}") or FIELD_HELP.get(name) or documented.get(name, "")


def _leaves(annotation, path, default, description, panel):
    """Yield (path, annotation, kind, help, panel) for every option under one parameter."""
    bare, optional = _strip_optional(annotation)
    bare, constraints = _base_and_constraints(bare)
    if _is_model(bare):
        model_default = default if isinstance(default, bare) else None
        if model_default is None:
            with contextlib.suppress(ValidationError, TypeError):
                model_default = bare()
        title = (bare.__doc__ or bare.__name__).strip().splitlines()[0].rstrip(".")
        documented = docstring_help(bare, list(bare.model_fields))
        for name, field in bare.model_fields.items():
            field_default = getattr(model_default, name, None)
            field_annotation = field.annotation
            if field.metadata:
                field_annotation = Annotated[(field_annotation, *field.metadata)]
            description = field.description or _help(bare.__name__, name, documented)
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
    a single shallowest path keeps the short name: a sweep's own `--seed`, and
    `--base-seed` for the seed of its base TrainConfig.
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
    fn = getattr(flow, "fn", flow)
    hints = _signature_hints(fn)
    leaves = []
    documented = docstring_help(fn, list(inspect.signature(fn).parameters))
    for name, parameter in inspect.signature(fn).parameters.items():
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        description = _help(fn.__name__, name, documented)
        leaves.extend(_leaves(hints.get(name, str), (name,), default, description, "Flow parameters"))
    flags = _flags([leaf[0] for leaf in leaves])
    reserved = {"--params", "--help"}
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
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}", 2) from exc
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
            mapping = read_mapping_file(given[option.ident + "_file"]) if given.get(option.ident + "_file") else {}
            mapping.update(parse_assignment(item) for item in (value or []))
            if mapping:
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


# Boilerplate in a nested pydantic error's text: its count line, [type=...] and docs link.
_PYDANTIC_NOISE = re.compile(r"\d+ validation errors? for \w+\s*|\s*\[type=[^\]]*\]|\s*For further information visit \S+|Value error, ")


def describe_validation_error(exc: ValidationError, options: list[FlowOption] | None = None,
                              root: tuple[str, ...] = ()) -> str:
    """One line: each problem as `--flag: message (got value)`."""
    flags = {o.path: o.flag for o in options or []}
    problems = []
    for error in exc.errors():
        loc = (*root, *(str(part) for part in error["loc"]))
        # A model-level error (loc is just the parameter) names no field.
        where = flags.get(loc) or ".".join(loc[1:])
        message = _PYDANTIC_NOISE.sub("", error["msg"].removeprefix("Value error, "))
        got = "" if error["type"] in ("value_error", "missing") else f" (got {error.get('input')!r})"
        problems.append(f"{where}: {message}{got}" if where else f"{message}{got}")
    return "invalid parameters: " + "; ".join(problems)


def validate_parameters(flow, params: dict, options: list[FlowOption]) -> dict:
    """Each parameter validated against the flow's annotation: models come back built."""
    fn = getattr(flow, "fn", flow)
    hints = _signature_hints(fn)
    signature = inspect.signature(fn)
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise CliError(f"unknown parameters {unknown}; {flow.name if hasattr(flow, 'name') else fn.__name__} "
                       f"takes {sorted(signature.parameters)}", 2)
    validated = {}
    for name, value in params.items():
        try:
            validated[name] = TypeAdapter(hints.get(name, Any)).validate_python(value)
        except ValidationError as exc:
            raise CliError(describe_validation_error(exc, options, root=(name,)), 2) from exc
    return validated


# ---------------------------------------------------------------- running a flow


class _NoTracebackFormatter(logging.Formatter):
    """Wraps a handler's formatter so that log records print without their traceback."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None, "stack_info": None})
        return self.inner.format(plain)


def _quiet_prefect_tracebacks() -> None:
    """Prefect logs a failed run's traceback to the console; the CLI says it in one line instead.

    The traceback still reaches the Prefect API (the UI's logs) and MLflow (the
    failure artifact); only the terminal copy goes.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    for logger in (logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)):
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _NoTracebackFormatter):
                handler.setFormatter(_NoTracebackFormatter(handler.formatter or logging.Formatter()))


def load_flow(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _plain(value):
    """JSON-able data; arrays shown by shape and dtype, not by value."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{value.dtype} array of shape {tuple(value.shape)}" if value.shape else value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def summarize(result) -> str:
    """A flow's return value as YAML for the terminal."""
    if result is None:
        return ""
    return yaml.safe_dump(_plain(result), sort_keys=False, width=120).rstrip()


def _run_flow(flow, options: list[FlowOption], given: dict[str, Any]) -> None:
    with _one_line_errors():
        params = collect_parameters(options, given, given.get("params"))
        validated = validate_parameters(flow, params, options)
        _check_tracking_server(flow, validated)
        if not _DEBUG:
            import prefect.logging.configuration  # noqa: F401  (Prefect configures logging on import)

            _quiet_prefect_tracebacks()
        result = flow(**validated)
        text = summarize(result)
        if text:
            typer.echo(text)


def _check_tracking_server(flow, params: dict) -> None:
    """Fail before starting Prefect when the flow would log to a tracking server that does not answer.

    The flow makes the same check itself; doing it here first saves the seconds a
    temporary Prefect server takes to start, only to report the same line.
    """
    if "tracking_uri" not in inspect.signature(getattr(flow, "fn", flow)).parameters:
        return
    from flows import tracking

    uri = tracking.resolve_tracking_uri(params.get("tracking_uri"))
    if uri.startswith(("http://", "https://")):
        tracking.connect(uri)


def build_run_command(command_name: str, flow) -> Any:
    """A typer command whose options are flow_options(flow)."""
    options = flow_options(flow)
    parameters = [
        inspect.Parameter(
            "params", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
            default=typer.Option(None, "--params", metavar="FILE", rich_help_panel="Input files",
                                 help="YAML or JSON file of the flow's parameters, shaped as in prefect.yaml's "
                                      "`parameters:`; options given on the command line override it."),
        )
    ]
    for option in options:
        if option.kind == "mapping":
            parameters.append(inspect.Parameter(
                option.ident, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                default=typer.Option(None, option.flag, metavar="KEY=VALUES", rich_help_panel=option.panel,
                                     help=f"{option.help} Repeat the option, one key each: `KEY=V1,V2` for a list, "
                                          "`KEY={low: 1e-4, high: 1e-2, log: true}` for an interval.")))
            parameters.append(inspect.Parameter(
                option.ident + "_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                default=typer.Option(None, option.flag + "-file", metavar="FILE", rich_help_panel="Input files",
                                     help=f"YAML or JSON mapping for {option.flag}; {option.flag} options "
                                          "given too add to it or override its keys.")))
            continue
        annotation = option.annotation
        metavar = "JSON" if option.kind == "json" else None
        parameters.append(inspect.Parameter(
            option.ident, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[annotation],
            default=typer.Option(None, option.flag, help=option.help, metavar=metavar, show_default=False,
                                 rich_help_panel=option.panel)))

    def command(**given):
        _run_flow(flow, options, given)

    command.__signature__ = inspect.Signature(parameters)
    fn = getattr(flow, "fn", flow)
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n")[0].replace("\n", " ")
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name=command_name, help=f"{summary}\n\nRuns the Prefect flow `{getattr(flow, 'name', fn.__name__)}` "
                                           "in this process and prints its result.")(command)
    return typer.main.get_command(single)


class _LazyFlowGroup(TyperGroup):
    """`cnnflow run`: each flow is imported only when its command is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return list(FLOWS)

    def get_command(self, ctx, name: str):
        if name not in FLOWS:
            return None
        try:
            return build_run_command(name, load_flow(FLOWS[name]))
        except Exception as exc:  # a flow that fails to import must not hide the others
            if _DEBUG:
                raise
            return _unavailable_command(name, f"cannot load the flow {FLOWS[name]}: {type(exc).__name__}: {exc}")


def _unavailable_command(name: str, reason: str):
    """A stand-in for a flow that cannot be loaded: listed with the reason, failing with it when run."""

    def command():
        _fail(reason)

    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name=name, help=f"(unavailable) {reason}", context_settings={"ignore_unknown_options": True,
                                                                               "allow_extra_args": True})(command)
    return typer.main.get_command(single)


run_app = typer.Typer(cls=_LazyFlowGroup, no_args_is_help=True,
                      help="Run one flow now, in this process; every flow parameter is an option.")
app.add_typer(run_app, name="run")


# ---------------------------------------------------------------- background servers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_until_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None,
                       log: Path | None = None) -> None:
    """Poll url until it answers 200; fail early when process exits, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process is not None and process.poll() is not None:
            raise CliError(f"{Path(process.args[0]).name} exited with code {process.returncode} before {url} "
                           f"answered. {_tail(log)}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        if time.monotonic() > deadline:
            raise CliError(f"{url} did not answer within {timeout_s:.0f} s. {_tail(log)}")
        time.sleep(0.25)


def stop_process_group(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group that `process` leads (its server workers too), then SIGKILL after grace_s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace_s)
    # Workers that outlived their parent (MLflow's job workers do) are in the same group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def background_server(command: list[str], health_url: str, *, env: dict | None = None,
                      log: Path | None = None, timeout_s: float = 90.0,
                      stop_grace_s: float = 10.0) -> Iterator[subprocess.Popen]:
    """Start command in a new process group, wait until health_url answers, stop the group on exit.

    Stopping sends SIGTERM to the group, then SIGKILL after stop_grace_s.
    """
    out = open(log, "ab") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_until_healthy(health_url, timeout_s, process, log)
        yield process
    finally:
        stop_process_group(process, stop_grace_s)
        if log:
            out.close()


def mlflow_server_command(backend_store_uri: str, port: int, *, artifacts_destination: str | None = None,
                          default_artifact_root: str | None = None, host: str = "127.0.0.1") -> list[str]:
    """`mlflow server` on host:port with one worker, for the given stores."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
               "--host", host, "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        command += ["--serve-artifacts", "--artifacts-destination", artifacts_destination]
    elif default_artifact_root:
        command += ["--default-artifact-root", default_artifact_root]
    return command


# ---------------------------------------------------------------- cnnflow ui


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one. The links the flows "
                                           "leave in Prefect point at 5000.")] = 5000,
    backend_store_uri: Annotated[Optional[str], typer.Option(
        help="MLflow store to show; default: $MLFLOW_TRACKING_URI when it is a database URI, "
             "else the project's sqlite store (mlruns/mlflow.db).")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the UI to answer.")] = 90.0,
):
    """Start the MLflow UI on 127.0.0.1 for the project's store, print its address, and keep it up until Ctrl-C."""
    with _one_line_errors():
        from flows import tracking

        uri = backend_store_uri or tracking.resolve_tracking_uri()
        if uri.startswith(("http://", "https://")):
            typer.echo(f"MLFLOW_TRACKING_URI points at a tracking server; its UI is at {uri}")
            return
        if (db := tracking.sqlite_path(uri)) is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            artifacts = (db.parent / "artifacts").as_uri()
        else:
            artifacts = None
        port = port or free_port()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                raise CliError(f"port {port} on 127.0.0.1 is taken; choose another with --port (0 picks a free one)")
        address = f"http://127.0.0.1:{port}"
        command = mlflow_server_command(uri, port, default_artifact_root=artifacts)
        typer.echo(f"starting the MLflow UI on {uri} ...", err=True)
        try:
            with background_server(command, f"{address}/health", timeout_s=timeout) as process:
                typer.echo(f"MLflow UI: {address}  (Ctrl-C stops it)")
                code = process.wait()
                raise CliError(f"the MLflow UI exited with code {code}")
        except KeyboardInterrupt:
            typer.echo("stopped", err=True)


# ---------------------------------------------------------------- cnnflow serve


@app.command()
def serve(
    file: Annotated[Path, typer.Option("--file", "-f", help="Deployment declarations to serve.")] = PREFECT_YAML,
    deployment: Annotated[Optional[list[str]], typer.Option(
        "--deployment", "-d", help="Serve only this deployment (its name in prefect.yaml); repeatable.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Most flow runs at once; unlimited when unset.")] = None,
):
    """Serve prefect.yaml's deployments, with their schedules, from this process until Ctrl-C.

    Needs a Prefect server: PREFECT_API_URL set (`prefect server start`, or the
    docker-compose stack). Scheduled and ad hoc runs (`prefect deployment run
    'sweep/weekly-bn-vs-gn' -p ...`) execute here, in subprocesses.
    """
    with _one_line_errors():
        from flows import deployments

        specs = deployments.read_deployments(file, only=deployment)
        api = deployments.require_prefect_api()
        runner_deployments = [deployments.to_runner_deployment(spec) for spec in specs]
        typer.echo(f"serving {', '.join(s.full_name for s in specs)} against {api}", err=True)
        from prefect import serve as prefect_serve

        prefect_serve(*runner_deployments, limit=limit)


# ---------------------------------------------------------------- cnnflow runs


# Shown by `cnnflow runs`, where a run has them, under these short names.
KEY_PARAMS = {"normalization": "norm", "batch_size": "bs", "learning_rate": "lr", "num_epochs": "epochs"}
VAL_METRICS = ("best_val_acc", "val_acc")
TEST_METRICS = ("test_acc",)


def recent_runs(tracking_uri: str | None, experiments: list[str] | None, limit: int) -> list[dict]:
    """The most recent runs of the store, newest first, as plain rows."""
    from flows import tracking

    client = tracking.connect(tracking_uri).client
    if experiments:
        found = {name: client.get_experiment_by_name(name) for name in experiments}
        missing = [name for name, e in found.items() if e is None]
        if missing:
            known = sorted(e.name for e in client.search_experiments())
            raise CliError(f"no experiment named {missing} in {tracking.resolve_tracking_uri(tracking_uri)}; "
                           f"known: {known}")
        chosen = list(found.values())
    else:
        chosen = client.search_experiments()
    names = {e.experiment_id: e.name for e in chosen}
    if not names:
        return []
    found_runs = client.search_runs(list(names), max_results=limit, order_by=["attributes.start_time DESC"])
    run_names = {r.info.run_id: r.info.run_name for r in found_runs}
    for parent in {r.data.tags.get("mlflow.parentRunId") for r in found_runs} - set(run_names) - {None}:
        with contextlib.suppress(Exception):  # a deleted parent keeps its id
            run_names[parent] = client.get_run(parent).info.run_name
    rows = []
    for run in found_runs:
        metrics, params = run.data.metrics, run.data.params
        parent = run.data.tags.get("mlflow.parentRunId")
        rows.append({
            "run": run.info.run_name,
            "experiment": names[run.info.experiment_id],
            "parent": run_names.get(parent, parent) if parent else None,
            "status": run.info.status,
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
            "params": {k: params[k] for k in KEY_PARAMS if k in params},
            "val_acc": next((metrics[k] for k in VAL_METRICS if k in metrics), None),
            "test_acc": next((metrics[k] for k in TEST_METRICS if k in metrics), None),
            "run_id": run.info.run_id,
        })
    return rows


def print_runs_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        typer.echo("no runs yet")
        return
    # A terminal's own width; a pipe gets every column in full.
    console = Console(width=None if sys.stdout.isatty() else 180)
    cells = {
        "run": lambda r: r["run"],
        "status": lambda r: r["status"],
        "val acc": lambda r: "" if r["val_acc"] is None else f"{r['val_acc']:.3f}",
        "test acc": lambda r: "" if r["test_acc"] is None else f"{r['test_acc']:.3f}",
        "params": lambda r: " ".join(f"{KEY_PARAMS[k]}={v}" for k, v in r["params"].items()),
        "experiment": lambda r: r["experiment"],
        "parent": lambda r: r["parent"] or "",
        "started": lambda r: r["started"],
    }
    # (least, most) width of each column, in the order they are given up when the terminal is narrow.
    widths = {"run": (16, 40), "status": (8, 8), "val acc": (7, 7), "test acc": (8, 8), "params": (16, 40),
              "experiment": (10, 18), "parent": (10, 22), "started": (16, 16)}
    room = console.width - 1
    shown = []
    for column, (least, _) in widths.items():  # the columns whose least widths fit
        if sum(widths[c][0] + 2 for c in shown) + least + 2 <= room:
            shown.append(column)
    size = {c: widths[c][0] for c in shown}
    spare = room - sum(size[c] + 2 for c in shown)
    for column in shown:  # then widen them, in order, up to their most
        grow = min(spare, widths[column][1] - size[column])
        size[column] += grow
        spare -= grow
    table = Table(box=None, header_style="bold")
    for column in shown:
        table.add_column(column, justify="right" if column.endswith("acc") else "left", no_wrap=True,
                         overflow="ellipsis", width=size[column])
    for row in rows:
        table.add_row(*(cells[column](row) for column in shown))
    console.print(table)


@app.command()
def runs(
    experiment: Annotated[Optional[list[str]], typer.Option(
        "--experiment", "-e", help="Experiment name; repeatable. Default: every experiment.")] = None,
    limit: Annotated[int, typer.Option(help="Most recent runs to show.", min=1)] = 20,
    tracking_uri: Annotated[Optional[str], typer.Option(
        help="MLflow tracking URI; else $MLFLOW_TRACKING_URI, else the project's sqlite store.")] = None,
    output: Annotated[Literal["table", "json"], typer.Option(help="table for people, json for scripts.")] = "table",
):
    """List recent MLflow runs, newest first: name, parent, status, key parameters, val/test accuracy."""
    with _one_line_errors():
        rows = recent_runs(tracking_uri, experiment, limit)
        if output == "json":
            typer.echo(json.dumps(rows, indent=2))
        else:
            print_runs_table(rows)


def main() -> None:  # pragma: no cover - the console script calls app directly
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
