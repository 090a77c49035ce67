"""Reading a job file into a pydantic model, with errors that name the key path and the file.

``etl.core.config.load_job`` runs these steps with ``JobConfig``:

1. ``read_raw`` parses the TOML file (``tomllib``), applies ``ETL__SECTION__KEY``
   environment overrides and then ``--set key.path=value`` ones to the raw tables, and
   resolves ``${ENV_VAR}`` (and ``${ENV_VAR:-default}``) in every string;
2. ``validate`` validates into the model; unknown keys, wrong types and missing keys,
   and every problem of step 1, raise one ``ConfigError`` naming the key path
   (``transform.steps[2].expr``) and the file, with a "did you mean" for a misspelling.

Nothing here knows the job's sections: the model, the keys the loader sets itself
(``hidden``) and the union tags pydantic adds to error locations (``tags``) are passed
in. Also here: ``env_references`` (for ``etl cron``), ``json_schema`` and ``explain``.
"""

from __future__ import annotations

import difflib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from etl.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)

_UNION_TAG = re.compile(r"^(constrained-\w+|int|float|str|bool|none|(literal|list|dict|function-\w+)\[.*\])$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

ENV_PREFIX = "ETL__"
"""``ETL__TRANSFORM__WORKERS=4`` overrides ``transform.workers`` (``__`` between key parts)."""
SUGGEST_CUTOFF = 0.6  # difflib similarity for "did you mean": lower suggests noise, higher misses typos


def read_raw(
    path: Path, overrides: list[str], environ: Mapping[str, str], *, tags: frozenset[str] = frozenset()
) -> tuple[dict[str, Any], dict[str, str], list[tuple[str, str]]]:
    """The job file's tables with the overrides applied and ``${VARS}`` resolved, where each
    overridden key came from, and the problems found so far as ``(key path, message)``.

    Precedence: the job file < ``ETL__SECTION__KEY`` environment variables < ``--set``.
    A file that is missing or not TOML raises ``ConfigError`` at once."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("job file not found", file=str(path)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"not valid TOML: {e}", file=str(path)) from None
    origins: dict[str, str] = {}
    problems: list[tuple[str, str]] = []
    for origin, item in [*env_overrides(environ), *(("--set", o) for o in overrides)]:
        try:
            origins[apply_override(raw, item, file=str(path), tags=tags)] = origin
        except ConfigError as e:
            problems.append((e.item, f"{e.message} ({origin})"))
    raw = resolve_env(raw, "", environ, problems)
    return raw, origins, problems


def validate(
    model: type[M],
    raw: dict[str, Any],
    path: Path,
    origins: dict[str, str],
    problems: list[tuple[str, str]],
    *,
    hidden: frozenset[str] = frozenset(),
    tags: frozenset[str] = frozenset(),
) -> M:
    """``raw`` validated into ``model``. Every problem (those of ``read_raw``, then every
    invalid key) is raised as one ``ConfigError`` naming the file; ``hidden`` keys are never
    offered as suggestions."""
    try:
        cfg = model.model_validate(raw)
    except ValidationError as e:
        problems = problems + _problems(
            e.errors(), origins, {k for k, _ in problems}, model=model, hidden=hidden, tags=tags
        )
    if problems:
        key, message = problems[0]
        raise ConfigError(message, key=key, file=str(path), problems=problems)
    return cfg


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(origin, "key.path=value")`` for every ``ETL__…`` variable, sorted by name.

    ``ETL__DOWNLOAD__TIMEOUT__READ=5`` is ``download.timeout.read=5``; a part made of
    digits is a list index (``ETL__TRANSFORM__STEPS__0__EXPR``); names are lower-cased."""
    out = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        key = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts).lstrip(".")
        out.append((f"environment {name}", f"{key}={environ[name]}"))
    return out


def apply_override(raw: dict[str, Any], item: str, *, file: str = "", tags: frozenset[str] = frozenset()) -> str:
    """Apply one ``key.path=value`` (``transform.steps[0].expr=...``); value parsed as TOML.
    Returns the key path, written the way error messages write it (``tags`` as for ``key_path``)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key.path=value, got {item!r}", file=file)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word is a string: --set output.format=csv
    parts = [p for p in re.split(r"\.|\[(\d+)\]", key.strip()) if p]
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        index: int | str = int(part) if part.isdigit() else part
        if isinstance(node, list):
            if not isinstance(index, int) or index >= len(node):
                raise ConfigError(f"--set: no list item {part!r}", key=key, file=file)
        elif not isinstance(node, dict):
            raise ConfigError(f"--set: {part!r} is inside a value, not a table", key=key, file=file)
        if last:
            node[index] = value
        else:
            if isinstance(node, dict) and index not in node:
                node[index] = {}
            node = node[index]
    return key_path(tuple(int(p) if p.isdigit() else p for p in parts), tags)


def key_path(loc: tuple[Any, ...], tags: frozenset[str] = frozenset()) -> str:
    """Pydantic's ``loc`` as a job-file key path: ``transform.steps[2].expr``.

    ``tags`` are the values of the model's union discriminators (the step ops), which
    pydantic puts in ``loc`` after a list index; the user never wrote them."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in tags:
            pass  # the discriminated union adds the step's op to the path; the user never wrote it
        elif _UNION_TAG.match(part):
            pass  # likewise for a plain union's member type ("constrained-int", "literal['auto']")
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


def _problems(
    errors: list[ErrorDetails],
    origins: dict[str, str],
    known: set[str],
    *,
    model: type[BaseModel],
    hidden: frozenset[str],
    tags: frozenset[str],
) -> list[tuple[str, str]]:
    """Every validation error as (key path, message), each once, unknown keys first.

    A misspelt key shows up twice (unknown + missing); the missing one is dropped when the
    unknown one's suggestion names it. Keys already reported (an unset ``${VAR}``) are not
    repeated. A key set by an override says which one."""
    out: list[tuple[str, str]] = []
    suggested: set[str] = set()
    for err in sorted(errors, key=lambda err: err["type"] != "extra_forbidden"):
        key = key_path(err["loc"], tags)
        if err["type"] == "missing" and key in suggested or key in known:
            continue
        message = _message(err)
        if err["type"] == "extra_forbidden":
            names = sorted(_field_names(model, err["loc"][:-1], tags) - hidden)
            match = difflib.get_close_matches(str(err["loc"][-1]), names, n=1, cutoff=SUGGEST_CUTOFF)
            if match:
                message += f"; did you mean {match[0]!r}?"
                suggested.add(key.rpartition(".")[0] + "." + match[0] if "." in key else match[0])
            elif names:
                message += f"; known keys here: {', '.join(names)}"
        origin = next((o for k, o in reversed(origins.items()) if key == k or key.startswith((k + ".", k + "["))), None)
        by = f" (set by {origin})" if origin else ""
        same = next((i for i, (k, _) in enumerate(out) if k == key), None)
        if same is not None:  # one line per key: a union's members each add an error
            out[same] = (key, f"{out[same][1].removesuffix(by)}, or {message}{by}")
            continue
        out.append((key, message + by))
    return out


def _message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key"
    if err["type"] == "missing":
        return "required key is missing"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    message = f"{err['msg']}{shown}"
    ctx = err.get("ctx") or {}
    if err["type"] == "union_tag_invalid":
        choices, got = [str(t).strip("'") for t in str(ctx.get("expected_tags", "")).split(", ")], ctx.get("tag")
        message = f"unknown op {got!r} (one of: {', '.join(choices)})"
    elif err["type"] == "literal_error":
        choices, got = re.findall(r"'([^']*)'", str(ctx.get("expected", ""))), value
    else:
        return message
    match = difflib.get_close_matches(str(got), choices, n=1, cutoff=SUGGEST_CUTOFF)
    return f"{message}; did you mean {match[0]!r}?" if match else message


def _models(tp: Any) -> list[type[BaseModel]]:
    """The models a field's annotation can hold (through Annotated, unions, Optional)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if get_origin(tp) in (Union, UnionType):
        return [m for a in get_args(tp) for m in _models(a)]
    return []


def _field_names(model: type[BaseModel], loc: tuple[Any, ...], tags: frozenset[str]) -> set[str]:
    """The keys allowed at ``loc`` in ``model`` (a pydantic location, tags included)."""
    types: list[Any] = [model]
    for part in loc:
        models = [m for t in types for m in _models(t)]
        if isinstance(part, int):
            types = [get_args(t)[0] for t in types for t in _unwrap_list(t)]
        elif fields := [f for m in models for n, f in m.model_fields.items() if part in (n, f.alias)]:
            types = [f.annotation for f in fields]
        elif part in tags:
            types = [
                m for m in models if "op" in m.model_fields and get_args(m.model_fields["op"].annotation) == (part,)
            ]
        # else: a plain union's member tag; the same types go on
    return {f.alias or name for t in types for m in _models(t) for name, f in m.model_fields.items()}


def _unwrap_list(tp: Any) -> list[Any]:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) is list:
        return [tp]
    if get_origin(tp) in (Union, UnionType):
        return [x for a in get_args(tp) for x in _unwrap_list(a)]
    return []


def resolve_env(node: Any, where: str, environ: Mapping[str, str], problems: list[tuple[str, str]]) -> Any:
    if isinstance(node, dict):
        return {k: resolve_env(v, f"{where}.{k}" if where else k, environ, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_env(v, f"{where}[{i}]", environ, problems) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            problems.append((where, f"environment variable ${{{name}}} is not set"))
            return m.group(0)

        return _ENV_REF.sub(sub, node)
    return node


def env_references(path: Path) -> list[tuple[str, str, bool]]:
    """``(key path, VAR, has a default)`` for every ``${VAR}`` in a job file's strings."""
    found: list[tuple[str, str, bool]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{where}.{k}" if where else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}[{i}]")
        elif isinstance(node, str):
            found.extend((where, m.group(1), m.group(2) is not None) for m in _ENV_REF.finditer(node))

    walk(tomllib.loads(path.read_text(encoding="utf-8")), "")
    return found


def json_schema(model: type[BaseModel], *, hidden: frozenset[str], title: str) -> dict[str, Any]:
    """``model``'s JSON Schema for editors: every key with its description (a section's
    from its class docstring, a step's op named), the ``hidden`` keys left out."""
    schema = model.model_json_schema()
    for props in [schema["properties"], *(d.get("properties", {}) for d in schema.get("$defs", {}).values())]:
        for key in hidden:
            props.pop(key, None)
    schema["required"] = [k for k in schema.get("required", []) if k not in hidden]
    defs = schema.get("$defs", {})
    for props in [schema["properties"], *(d.get("properties", {}) for d in defs.values())]:
        for prop in props.values():
            if isinstance(prop.get("default"), dict):
                for key in hidden:
                    prop["default"].pop(key, None)
            if "description" in prop:
                continue
            if "const" in prop:  # a step's op
                prop["description"] = f"The step: {prop['const']!r}."
            elif "$ref" in prop:  # a section: its class docstring
                prop["description"] = defs[prop["$ref"].rsplit("/", 1)[-1]].get("description", "")
    schema["title"] = title
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def explain(cfg: BaseModel, origins: dict[str, str], path: Path, *, exclude: dict[str, Any]) -> list[str]:
    """Every resolved setting with where it came from: ``default``, ``job file``,
    ``environment ETL__…`` or ``--set``. Header values are redacted; ``exclude`` (as for
    ``model_dump``) leaves out the keys the loader set."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    data = cfg.model_dump(mode="json", by_alias=True, exclude=exclude)
    lines: list[str] = []

    def in_file(parts: list[str | int]) -> bool:
        node: Any = raw
        for p in parts:
            if isinstance(node, dict) and p in node or isinstance(node, list) and isinstance(p, int) and p < len(node):
                node = node[p]  # type: ignore[index]  # guarded above: p is a key of the dict or an index of the list
            else:
                return False
        return True

    def walk(node: Any, parts: list[str | int]) -> None:
        if isinstance(node, dict) and node and not (parts and parts[-1] in ("headers", "params", "columns", "values")):
            for k, v in node.items():
                walk(v, [*parts, k])
            return
        if isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, v in enumerate(node):
                walk(v, [*parts, i])
            return
        key = key_path(tuple(parts))
        origin = next(
            (o for k, o in reversed(origins.items()) if key == k or key.startswith((k + ".", k + "["))),
            "job file" if in_file(parts) else "default",
        )
        shown = {k: "***" for k in node} if parts[-1] == "headers" and isinstance(node, dict) else node
        lines.append(f"{key} = {json.dumps(shown, ensure_ascii=False)}    # {origin}")

    walk(data, [])
    return lines
