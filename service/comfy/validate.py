"""Validating an API-format workflow as ComfyUI's ``execution.validate_prompt`` does, with its error
shapes: a top-level ``{type, message, details, extra_info}`` and per-node ``{errors: [...],
dependent_outputs, class_type}``. Never raises: every defect of the graph (unknown class, cycle,
dangling or mistyped link, out-of-range or unlisted value, a bomb in a base64 image) is an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .node import Catalog, In, Node

MAX_NODES = 500  # a workflow's nodes (frontends' defaults have under 20)


@dataclass
class Validation:
    ok: bool
    error: dict[str, Any] | None = None
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    prompt: dict[str, Any] = field(default_factory=dict)  # the graph with values converted

    def body(self) -> dict[str, Any]:
        """POST /prompt's 400 body."""
        return {"error": self.error, "node_errors": self.node_errors}


def _err(kind: str, message: str, details: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _invalid(message: str, details: str = "") -> Validation:
    return Validation(False, _err("invalid_prompt", message, details))


class _Checker:
    def __init__(self, prompt: dict[str, Any], nodes: dict[str, type[Node]], catalog: Catalog) -> None:
        self.prompt, self.nodes, self.catalog = prompt, nodes, catalog
        self.done: dict[str, tuple[bool, list[dict[str, Any]]]] = {}
        self.visiting: set[str] = set()
        self.converted: dict[str, dict[str, Any]] = {}

    def node(self, node_id: str) -> tuple[bool, list[dict[str, Any]]]:
        if node_id in self.done:
            return self.done[node_id]
        self.visiting.add(node_id)
        entry = self.prompt[node_id]
        cls = self.nodes[entry["class_type"]]
        given = entry["inputs"]
        errors: list[dict[str, Any]] = []
        valid = True
        values: dict[str, Any] = {}
        for name, spec in cls.inputs(self.catalog).items():
            if name not in given:
                if not spec.optional:
                    errors.append(
                        _err("required_input_missing", "Required input is missing", name, input_name=name)
                    )
                continue
            value = given[name]
            if isinstance(value, list):
                problem = self.link(name, spec, value)
                if problem is None and str(value[0]) in self.visiting:
                    problem = _err(
                        "dependency_cycle",
                        "Dependency cycle detected",
                        f"{name}: node '#{value[0]}' depends on node '#{node_id}'",
                        input_name=name,
                        linked_node=value,
                    )
                if problem is None:
                    ok, _ = self.node(str(value[0]))
                    valid = valid and ok
                    values[name] = [str(value[0]), int(value[1])]
                else:
                    errors.append(problem)
                continue
            converted, problem = self.value(cls, name, spec, value)
            if problem is not None:
                errors.append(problem)
            else:
                values[name] = converted
        self.visiting.discard(node_id)
        self.converted[node_id] = values
        result = (valid and not errors, errors)
        self.done[node_id] = result
        return result

    def link(self, name: str, spec: In, value: list[Any]) -> dict[str, Any] | None:
        info = spec.config()
        if len(value) != 2 or not isinstance(value[0], str | int) or type(value[1]) is not int:
            return _err(
                "bad_linked_input",
                "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                name,
                input_name=name,
                input_config=info,
                received_value=_short(value),
            )
        source, slot = str(value[0]), value[1]
        if source not in self.prompt:
            return _err(
                "bad_linked_input",
                f"Bad linked input: node '#{source}' does not exist",
                name,
                input_name=name,
                input_config=info,
                received_value=_short(value),
            )
        returns = self.nodes[self.prompt[source]["class_type"]].RETURNS
        received = returns[slot][0] if 0 <= slot < len(returns) else None
        expected = "COMBO" if spec.choices is not None else spec.type
        if received != expected:
            return _err(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                f"{name}, received_type({received}) mismatch input_type({expected})",
                input_name=name,
                input_config=info,
                received_type=received,
                linked_node=value,
            )
        return None

    def value(self, cls: type[Node], name: str, spec: In, value: Any) -> tuple[Any, dict[str, Any] | None]:
        info = spec.config()
        if not spec.is_value:
            return None, _err(
                "invalid_input_type",
                f"Input {name} of type {spec.type} must be a link [node_id, slot_index]",
                f"{name}, {_short(value)}",
                input_name=name,
                input_config=info,
                received_value=_short(value),
            )
        try:
            value = _convert(spec.type, value)
        except (TypeError, ValueError, OverflowError) as exc:
            return None, _err(
                "invalid_input_type",
                f"Failed to convert an input value to a {spec.type} value",
                f"{name}, {_short(value)}, {exc}",
                input_name=name,
                input_config=info,
                received_value=_short(value),
                exception_message=str(exc),
            )
        if isinstance(value, str) and len(value) > spec.max_length:
            return None, _err(
                "value_bigger_than_max",
                f"Value length {len(value)} bigger than max length of {spec.max_length}",
                name,
                input_name=name,
                input_config=info,
                received_value=_short(value),
            )
        if spec.min is not None and value < spec.min:
            return None, _err(
                "value_smaller_than_min",
                f"Value {value} smaller than min of {spec.min}",
                name,
                input_name=name,
                input_config=info,
                received_value=value,
            )
        if spec.max is not None and value > spec.max:
            return None, _err(
                "value_bigger_than_max",
                f"Value {value} bigger than max of {spec.max}",
                name,
                input_name=name,
                input_config=info,
                received_value=value,
            )
        if spec.choices is not None and not cls.CHECKED and value not in spec.choices:
            if not (isinstance(value, str) and spec.accepts is not None and spec.accepts(value)):
                listed = (
                    f"(list of length {len(spec.choices)})"
                    if len(spec.choices) > 20
                    else str(list(spec.choices))
                )
                return None, _err(
                    "value_not_in_list",
                    "Value not in list",
                    f"{name}: '{_short(value)}' not in {listed}",
                    input_name=name,
                    input_config=info if len(spec.choices) <= 20 else None,
                    received_value=_short(value),
                )
        reason = cls.check(name, value, self.catalog)
        if reason is not None:
            return None, _err(
                "custom_validation_failed",
                "Custom validation failed for node",
                f"{name} - {reason}",
                input_name=name,
                input_config=info,
                received_value=_short(value),
            )
        return value, None


def _short(value: Any) -> Any:
    """A value as echoed in an error: JSON (no NaN), long strings (base64 images) cut."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + f"... ({len(value)} characters)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list) and len(value) <= 4:
        return [_short(v) for v in value]
    if value is None or isinstance(value, int | float | bool):
        return value
    return _short(str(value))


def _convert(kind: str, value: Any) -> Any:
    """ComfyUI converts INT / FLOAT / STRING values (so "20" is 20); non-finite numbers are refused."""
    if isinstance(value, dict):
        raise TypeError("an object is not a value")
    if kind == "INT":
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("not a finite number")
        return int(value)
    if kind == "FLOAT":
        out = float(value)
        if not math.isfinite(out):
            raise ValueError("not a finite number")
        return out
    if kind == "STRING":
        return str(value)
    if kind == "BOOLEAN":
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ValueError("not true or false")
            return value.lower() == "true"
        return bool(value)
    return value  # COMBO: compared with its list


def validate(prompt: Any, nodes: dict[str, type[Node]], catalog: Catalog) -> Validation:
    """ComfyUI's validate_prompt, over our node classes."""
    if not isinstance(prompt, dict):
        return _invalid("The prompt must be an object of node id -> {class_type, inputs}")
    if len(prompt) > MAX_NODES:
        return _invalid(f"The prompt has {len(prompt)} nodes; at most {MAX_NODES} are served")
    prompt = {str(k): v for k, v in prompt.items()}
    outputs = []
    for node_id, entry in prompt.items():
        if not isinstance(entry, dict) or "class_type" not in entry:
            return _invalid(
                "Cannot execute because a node is missing the class_type property.", f"Node ID '#{node_id}'"
            )
        class_type = entry["class_type"]
        if not isinstance(class_type, str) or class_type not in nodes:
            out = _invalid(
                f"Cannot execute because node {_short(class_type)} does not exist.", f"Node ID '#{node_id}'"
            )
            error = _err(
                "invalid_prompt", f"Node type {_short(class_type)!s} does not exist", f"Node ID '#{node_id}'"
            )
            out.node_errors = {
                node_id: {"errors": [error], "dependent_outputs": [], "class_type": _short(class_type)}
            }
            return out
        if not isinstance(entry.get("inputs", {}), dict):
            return _invalid(
                "Cannot execute because a node's inputs are not an object.", f"Node ID '#{node_id}'"
            )
        if nodes[class_type].OUTPUT_NODE:
            outputs.append(node_id)
    if not outputs:
        return Validation(False, _err("prompt_no_outputs", "Prompt has no outputs"))
    prompt = {k: {**v, "inputs": v.get("inputs", {})} for k, v in prompt.items()}
    checker = _Checker(prompt, nodes, catalog)
    good, failed = [], []
    node_errors: dict[str, dict[str, Any]] = {}
    for out in outputs:
        ok, reasons = checker.node(out)
        if ok:
            good.append(out)
            continue
        failed.append((out, reasons))
        for node_id, (valid, errs) in checker.done.items():
            if not valid and errs:
                entry = node_errors.setdefault(
                    node_id,
                    {"errors": errs, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
                )
                entry["dependent_outputs"].append(out)
    converted = {
        k: {"class_type": prompt[k]["class_type"], "inputs": checker.converted[k]} for k in checker.converted
    }
    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        error = _err("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
        return Validation(False, error, node_errors, [], converted)
    return Validation(True, None, node_errors, good, converted)
