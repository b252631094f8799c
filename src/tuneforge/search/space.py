"""Search spaces over run-config keys: parse, check at the door, sample, tie, apply.

A space file is a YAML mapping from dotted config keys to one distribution each::

    train.lr: {log_uniform: [1.0e-5, 5.0e-4]}
    train.warmup_ratio: {uniform: [0.0, 0.1]}
    method.r: {choice: [4, 8, 16, 32]}
    method.alpha: {tie: "2 * method.r"}
    train.batch_size: {int: [2, 16], step: 2}

``tie`` values are computed from other keys (sampled or from the run config) by a small arithmetic evaluator
(numbers, + - * / // % **, comparisons, ``a if c else b``, min/max/round/int/float/abs) — never ``eval``.

This module is pure (no torch, no optuna import): a sampled value comes from a ``suggest`` object passed in.
"""

from __future__ import annotations

import ast
import copy
import difflib
import itertools
import json
import math
import operator
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuneforge.config.load import KEY_ALIASES, read_yaml, set_dotted
from tuneforge.config.schema import METHOD_NAMES, RunConfig
from tuneforge.errors import UserError, did_you_mean

KINDS = ("log_uniform", "uniform", "int", "choice", "tie")
OPTIONS = {"int": ("step", "log"), "uniform": ("step",), "log_uniform": (), "choice": (), "tie": ()}


@dataclass(frozen=True)
class Param:
    """One searched key. ``kind`` is one of :data:`KINDS`; ``values`` holds the choices (``choice``)."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    log: bool = False
    values: tuple = ()
    expr: str | None = None

    @property
    def sampled(self) -> bool:
        return self.kind != "tie"

    def encoded_choices(self) -> list:
        """Choices as optuna can store them (scalars as they are, lists/mappings as JSON text)."""
        return [_encode(v) for v in self.values]

    def decode(self, value: Any) -> Any:
        """The config value for an optuna parameter value."""
        if self.kind == "choice":
            for original in self.values:
                if _encode(original) == value:
                    return copy.deepcopy(original)
        return value

    def candidates(self) -> list:
        """The values probed at the door: every choice, or both ends of a range."""
        if self.kind == "choice":
            return list(self.values)
        return [self.low, self.high]

    def suggest(self, trial) -> Any:
        """Sample this key's value from an optuna trial (``trial.suggest_*``)."""
        if self.kind == "log_uniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        if self.kind == "choice":
            return self.decode(trial.suggest_categorical(self.key, self.encoded_choices()))
        raise ValueError(f"{self.key}: a tie is computed, not sampled")

    def describe(self) -> str:
        if self.kind == "tie":
            return f"tie: {self.expr}"
        if self.kind == "choice":
            return f"choice: {list(self.values)}"
        extra = f", step {self.step}" if self.step else ""
        extra += ", log" if self.log and self.kind == "int" else ""
        return f"{self.kind}: [{self.low}, {self.high}]{extra}"


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return json.dumps(value, sort_keys=True)


@dataclass
class Space:
    """A parsed, checked search space. ``params`` keeps the file's order; ties come after what they read."""

    params: list[Param]
    source: str = "space"
    tie_order: list[str] = field(default_factory=list)

    @property
    def sampled(self) -> list[Param]:
        return [p for p in self.params if p.sampled]

    @property
    def ties(self) -> list[Param]:
        by_key = {p.key: p for p in self.params}
        return [by_key[k] for k in self.tie_order]

    def grid(self) -> dict[str, list]:
        """``{key: encoded choices}`` for a grid sampler.

        Raises:
            UserError: a sampled key is a range, which a grid cannot enumerate.
        """
        ranges = [p.key for p in self.sampled if p.kind != "choice"]
        if ranges:
            raise UserError(f"{self.source}: --sampler grid enumerates choice lists; "
                            f"{', '.join(ranges)} {'is a range' if len(ranges) == 1 else 'are ranges'} "
                            "(write {choice: [...]} or use --sampler random|tpe)")
        if not self.sampled:
            raise UserError(f"{self.source}: nothing to search (only ties)")
        return {p.key: p.encoded_choices() for p in self.sampled}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.grid().values())

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the choices (decoded config values), in file order."""
        keys = [p.key for p in self.sampled]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(p.values for p in self.sampled))]

    def sample(self, trial) -> dict[str, Any]:
        """The sampled values of one trial (decoded), in file order."""
        return {p.key: p.suggest(trial) for p in self.sampled}

    def resolve(self, sampled: dict[str, Any], base: RunConfig) -> dict[str, Any]:
        """Sampled values plus every tie computed from them (and from ``base`` for other keys)."""
        values = dict(sampled)
        for param in self.ties:
            values[param.key] = evaluate_tie(param.expr, lambda name: _lookup(name, values, base), param.key)
        return values

    def trial_config(self, base_raw: dict, values: dict[str, Any]) -> dict:
        """``base_raw`` with every dotted key of ``values`` set."""
        return set_keys(base_raw, values)


# --------------------------------------------------------------------------- loading


def load_space(path: str | Path, base_raw: dict) -> Space:
    """Read and check a space file against the run config it will modify.

    Checks, all before any trial starts: every key is a config key (did-you-mean), every distribution is
    well formed (non-empty choices, low < high, log ranges above 0), ties only name config keys and have no
    cycle, and every candidate value is one the config schema accepts for its key.

    Raises:
        UserError: naming the space file, the key and the fix.
    """
    path = Path(path)
    raw = read_yaml(path)
    source = str(path)
    keys = config_keys(base_raw, raw.get("method.name"))
    params = []
    for key, spec in raw.items():
        key = str(key)
        if key not in keys:
            raise UserError(f"{source}: '{key}' is not a run-config key{_suggest(key, keys)}")
        params.append(parse_param(key, spec, source))
    space = Space(params=params, source=source)
    space.tie_order = _tie_order(space, keys)
    check_against_schema(space, base_raw)
    return space


def parse_param(key: str, spec: Any, source: str = "space") -> Param:
    """One ``key: {kind: ...}`` entry → :class:`Param` (raises UserError on a malformed one)."""
    where = f"{source}: {key}"
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{where}: expected a mapping like {{choice: [4, 8]}}, {{log_uniform: [1.0e-5, 1.0e-3]}}, "
                        f"{{uniform: [0, 0.1]}}, {{int: [2, 16]}} or {{tie: \"2 * method.r\"}} (got {spec!r})")
    kinds = [k for k in spec if k in KINDS]
    unknown = [k for k in spec if k not in KINDS and not any(k in opts for opts in OPTIONS.values())]
    if unknown:
        word = str(unknown[0])
        raise UserError(f"{where}: unknown distribution '{word}'{did_you_mean(word, KINDS)}; "
                        f"known: {', '.join(KINDS)}")
    if len(kinds) != 1:
        raise UserError(f"{where}: give exactly one of {', '.join(KINDS)} (got {', '.join(map(str, spec)) or 'none'})")
    kind = kinds[0]
    extra = [k for k in spec if k != kind and k not in OPTIONS[kind]]
    if extra:
        allowed = ", ".join(OPTIONS[kind]) or "none"
        raise UserError(f"{where}: option '{extra[0]}' does not apply to {kind} (options: {allowed})")
    value = spec[kind]
    if kind == "tie":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
            raise UserError(f"{where}: tie needs an expression, e.g. tie: \"2 * method.r\"")
        compile_tie(str(value), key, source)
        return Param(key=key, kind="tie", expr=str(value))
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise UserError(f"{where}: choice needs a non-empty list of values (got {value!r})")
        values = tuple(_number(v) for v in value)
        encoded = [_encode(v) for v in values]
        if len(set(map(repr, encoded))) != len(encoded):
            raise UserError(f"{where}: choice lists a value twice ({value!r})")
        return Param(key=key, kind="choice", values=values)
    return _range_param(key, kind, value, spec, where)


def _range_param(key: str, kind: str, value: Any, spec: dict, where: str) -> Param:
    if not isinstance(value, list) or len(value) != 2:
        raise UserError(f"{where}: {kind} needs [low, high] (got {value!r})")
    low, high = (_number(v) for v in value)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise UserError(f"{where}: {kind} bounds must be numbers (got {value!r})")
    if not all(math.isfinite(v) for v in (low, high)):
        raise UserError(f"{where}: {kind} bounds must be finite (got {value!r})")
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    log = bool(spec.get("log", False)) or kind == "log_uniform"
    if log and low <= 0:
        raise UserError(f"{where}: a log range needs low > 0 (got {low}); use uniform for ranges that reach 0")
    step = _number(spec["step"]) if "step" in spec else None
    if kind == "int":
        if not all(isinstance(v, int) for v in (low, high)):
            raise UserError(f"{where}: int bounds must be integers (got {value!r}); use uniform for real numbers")
        if step is not None and (not isinstance(step, int) or step <= 0):
            raise UserError(f"{where}: int step must be a positive integer (got {spec['step']!r})")
        if step is not None and log and step != 1:
            raise UserError(f"{where}: an int range cannot be both log and stepped (optuna samples one or the other)")
    elif step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise UserError(f"{where}: step must be a positive number (got {spec['step']!r})")
    if step is not None and kind == "uniform" and not _divides(high - low, step):
        raise UserError(f"{where}: step {step} does not divide the range [{low}, {high}]")
    return Param(key=key, kind=kind, low=float(low) if kind != "int" else low,
                 high=float(high) if kind != "int" else high, step=step, log=log)


def _divides(span: float, step: float) -> bool:
    ratio = span / step
    return abs(ratio - round(ratio)) < 1e-9


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-5`` as text; users mean a number."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


# --------------------------------------------------------------------------- config keys


def config_keys(base_raw: dict, method_choice: Any = None) -> list[str]:
    """Every dotted leaf key a run config accepts, for the method(s) the search may use."""
    names = _method_names(base_raw, method_choice)
    keys: list[str] = []
    for name, fld in RunConfig.model_fields.items():
        if name == "method":
            for method in names:
                cls = _method_class(method)
                keys.extend(f"method.{k}" for k in (cls.model_fields if cls else ()))
            continue
        keys.extend(_leaf_keys(name, fld.annotation))
    return list(dict.fromkeys(keys))


def _method_names(base_raw: dict, method_choice: Any) -> list[str]:
    method = base_raw.get("method")
    names = [method.get("name", "lora") if isinstance(method, dict) else "lora"]
    if isinstance(method_choice, dict) and isinstance(method_choice.get("choice"), list):
        names.extend(n for n in method_choice["choice"] if n in METHOD_NAMES)
    return list(dict.fromkeys(names))


def _method_class(name: str) -> type[BaseModel] | None:
    """The config class of ``method.name == name``, read from the schema's discriminated union."""
    for cls in typing.get_args(RunConfig.model_fields["method"].annotation):
        if isinstance(cls, type) and issubclass(cls, BaseModel) and "name" in cls.model_fields:
            if typing.get_args(cls.model_fields["name"].annotation) == (name,):
                return cls
    return None


def _leaf_keys(prefix: str, annotation: Any) -> list[str]:
    models = _models_in(annotation)
    if not models:
        return [prefix]
    keys = []
    for model in models:  # a discriminated union (train.retention): the keys of every member
        for name, fld in model.model_fields.items():
            keys.extend(_leaf_keys(f"{prefix}.{name}", fld.annotation))
    return list(dict.fromkeys(keys))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside ``annotation`` (``X``, ``X | None``, an annotated union of models), or [] for a
    plain value."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models_in(arg)]


def _suggest(key: str, keys: list[str]) -> str:
    head, _, last = key.rpartition(".")
    alias = KEY_ALIASES.get(last)
    if alias and f"{head}.{alias}" in keys:
        return f" — did you mean '{head}.{alias}'?"
    hint = did_you_mean(key, keys)
    if hint:
        return hint
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == head]
    close = difflib.get_close_matches(last, siblings, n=1, cutoff=0.6)
    return f" — did you mean '{head}.{close[0]}'?" if close else ""


# --------------------------------------------------------------------------- applying values


def set_keys(raw: dict, values: dict[str, Any]) -> dict:
    """A copy of ``raw`` with each dotted key of ``values`` set (creating sections as needed)."""
    data = copy.deepcopy(raw)
    for key, value in values.items():
        set_dotted(data, key, value)
    return data


def _lookup(name: str, values: dict[str, Any], base: RunConfig) -> Any:
    """A tie's input: a value of this trial, else the run config's (config fields only, nothing else)."""
    if name in values:
        return values[name]
    node: Any = base
    for part in name.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            raise UserError(f"tie: '{name}' is not a config key with a value in this run config")
        node = getattr(node, part)
    return node


def check_against_schema(space: Space, base_raw: dict) -> None:
    """Probe every candidate value of every key (others at their first candidate) through the schema.

    Only an error *on the probed key itself* (or a tie computed from it) stops the search at the door: an invalid
    combination of otherwise valid values is a failed trial, recorded as such.
    """
    from tuneforge.config import validate_config

    base = validate_config(base_raw, source="run config")
    first = {p.key: p.candidates()[0] for p in space.sampled}
    space.resolve(first, base)  # every tie evaluates (also when nothing is sampled)
    for param in space.sampled:
        for candidate in param.candidates():
            values = space.resolve({**first, param.key: candidate}, base)
            raw = space.trial_config(base_raw, values)
            errors = _schema_errors(raw)
            watched = {param.key, *(t.key for t in space.ties if param.key in tie_names(t.expr))}
            for loc, message in errors:
                if loc in watched:
                    shown = candidate if loc == param.key else f"{values[loc]!r} (tie, from {param.key}={candidate!r})"
                    raise UserError(f"{space.source}: {loc}: value {shown} is not accepted by the run config: "
                                    f"{message}")


def _schema_errors(raw: dict) -> list[tuple[str, str]]:
    try:
        RunConfig.model_validate(raw)
    except ValidationError as exc:
        out = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            if len(loc) >= 2 and loc[0] == "method" and loc[1] in METHOD_NAMES:
                loc = [loc[0], *loc[2:]]
            out.append((".".join(loc), err["msg"].removeprefix("Value error, ")))
        return out
    return []


# --------------------------------------------------------------------------- ties


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
FUNCTIONS = {"min": min, "max": max, "round": round, "int": int, "float": float, "abs": abs}
MAX_EXPONENT = 64  # 2 ** 10 ** 10 would hang the evaluator; no hyperparameter needs more


def compile_tie(expr: str, key: str = "tie", source: str = "space") -> ast.Expression:
    """Parse a tie expression and check that it uses only the allowed syntax."""
    where = f"{source}: {key}"
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as exc:
        raise UserError(f"{where}: tie {expr!r} is not an expression ({exc.msg})") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS or node.keywords:
                raise UserError(f"{where}: tie {expr!r}: only {', '.join(FUNCTIONS)} may be called")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, bool)):
                raise UserError(f"{where}: tie {expr!r}: only numbers are allowed as constants")
        elif isinstance(node, ast.Attribute):
            if _dotted(node) is None:
                raise UserError(f"{where}: tie {expr!r}: '.' may only join config key names (e.g. method.r)")
            if any(part.startswith("_") for part in _dotted(node).split(".")):
                raise UserError(f"{where}: tie {expr!r}: names starting with '_' are not config keys")
        elif isinstance(node, ast.Name) and node.id.startswith("_"):
            raise UserError(f"{where}: tie {expr!r}: names starting with '_' are not config keys")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.IfExp,
                                   ast.Name, ast.Load, ast.And, ast.Or, *_BINARY, *_UNARY, *_COMPARE)):
            raise UserError(f"{where}: tie {expr!r}: {type(node).__name__} is not allowed "
                            "(numbers, config keys, + - * / // % **, comparisons, if/else, "
                            f"{', '.join(FUNCTIONS)})")
    return tree


def tie_names(expr: str) -> list[str]:
    """The config keys a tie expression reads (dotted), in order of appearance."""
    tree = ast.parse(expr.strip(), mode="eval")
    names: list[str] = []
    skip: set[int] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Call):
            skip.add(id(node.func))
        elif isinstance(node, ast.Attribute):
            names.append(_dotted(node))
            skip.update(id(n) for n in ast.walk(node) if n is not node)
        elif isinstance(node, ast.Name):
            names.append(node.id)
    return list(dict.fromkeys(names))


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def evaluate_tie(expr: str, lookup, key: str = "tie") -> Any:
    """Evaluate a checked tie expression; ``lookup(dotted_name)`` gives a config value.

    Raises:
        UserError: division by zero, a too-large power or a key without a numeric value.
    """
    tree = compile_tie(expr, key)

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, (ast.Name, ast.Attribute)):
            return lookup(_dotted(node))
        if isinstance(node, ast.BinOp):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
                raise UserError(f"{key}: tie {expr!r}: exponent {right} is too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](ev(node.operand))
        if isinstance(node, ast.Compare):
            left = ev(node.left)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = ev(comparator)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BoolOp):
            values = [ev(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.IfExp):
            return ev(node.body) if ev(node.test) else ev(node.orelse)
        if isinstance(node, ast.Call):
            return FUNCTIONS[node.func.id](*(ev(a) for a in node.args))
        raise UserError(f"{key}: tie {expr!r}: {type(node).__name__} is not allowed")

    try:
        return ev(tree)
    except ZeroDivisionError:
        raise UserError(f"{key}: tie {expr!r} divides by zero") from None
    except TypeError as exc:
        raise UserError(f"{key}: tie {expr!r}: {exc}") from None


def _tie_order(space: Space, keys: list[str]) -> list[str]:
    """Ties sorted so that each one comes after the ties it reads; unknown names and cycles are errors."""
    ties = {p.key: p for p in space.params if p.kind == "tie"}
    deps: dict[str, list[str]] = {}
    for key, param in ties.items():
        names = tie_names(param.expr)
        for name in names:
            if name not in keys:
                raise UserError(f"{space.source}: {key}: tie {param.expr!r} reads '{name}', which is not a "
                                f"run-config key{_suggest(name, keys)}")
        deps[key] = [n for n in names if n in ties]
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(key: str, chain: list[str]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "active":
            raise UserError(f"{space.source}: ties form a cycle: {' -> '.join([*chain, key])}")
        state[key] = "active"
        for dep in deps[key]:
            visit(dep, [*chain, key])
        state[key] = "done"
        order.append(key)

    for key in ties:
        visit(key, [])
    return order


def dump_values(values: dict[str, Any]) -> str:
    """``values`` as one short line (for logs and tables)."""
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
