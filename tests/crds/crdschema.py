"""Offline checks of Headway's CRDs: their schemas as JSON Schema, and the samples.

The API server's own validation has three layers: the structural OpenAPI
schema, list types, and CEL rules. The first two convert to JSON Schema and run
here without a cluster; CEL rules are only collected (test_apiserver.py runs
them). Sample files carry `# expect: <message fragment>` comment lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
EXAMPLES_DIR = REPO / "examples"
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"
GROUP = "headway.dev"
VERSION = "v1alpha1"

# A field path as the API server prints it: spec.backends[0].pool.
_FIELD_PATH = re.compile(r"\b(?:metadata|spec|status)(?:\.[A-Za-z0-9]+|\[\d+\])*")


@dataclass(frozen=True, slots=True)
class Rule:
    """One x-kubernetes-validations entry and where it sits."""

    kind: str
    path: str  # schema location, e.g. "spec.scaling" ("" for the root)
    rule: str
    message: str


@dataclass(frozen=True, slots=True)
class Sample:
    path: Path
    documents: tuple[dict[str, Any], ...]
    expects: tuple[str, ...]  # message fragments the refusal must contain


def load_crds() -> dict[str, dict[str, Any]]:
    """The CRDs in crds/, by kind."""
    crds = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


def version_of(crd: Mapping[str, Any]) -> Mapping[str, Any]:
    (version,) = (v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    found: Mapping[str, Any] = version
    return found


def open_api_schema(crd: Mapping[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = version_of(crd)["schema"]["openAPIV3Schema"]
    return schema


def walk(node: Mapping[str, Any], path: str = "") -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every schema node with its field path; list items as `[]`, map values as `{}`."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), Mapping):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), Mapping):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def cel_rules(crds: Mapping[str, Mapping[str, Any]]) -> list[Rule]:
    rules = []
    for kind, crd in crds.items():
        for path, node in walk(open_api_schema(crd)):
            for entry in node.get("x-kubernetes-validations", ()):
                rules.append(Rule(kind, path, entry["rule"], entry["message"]))
    return rules


def to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    """The structural schema as JSON Schema (draft 4, like OpenAPI v3.0).

    Unknown fields are refused, as `kubectl apply` does by default (strict
    field validation), except under x-kubernetes-preserve-unknown-fields. A
    list of type `set` must not repeat an item.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def validators() -> dict[str, jsonschema.Draft4Validator]:
    return {
        kind: jsonschema.Draft4Validator(to_json_schema(open_api_schema(crd)))
        for kind, crd in load_crds().items()
    }


def schema_errors(
    document: Mapping[str, Any], checkers: Mapping[str, jsonschema.Draft4Validator]
) -> list[jsonschema.ValidationError]:
    """What the schema refuses in one Headway resource (others are not checked)."""
    if document.get("apiVersion") != f"{GROUP}/{VERSION}":
        return []
    return list(checkers[document["kind"]].iter_errors(document))


def error_fields(error: jsonschema.ValidationError) -> set[str]:
    """The field paths an offline error is about, spelled as the API server does."""
    path = ""
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    fields = {path}
    instance = error.instance if isinstance(error.instance, Mapping) else {}
    prefix = f"{path}." if path else ""
    if error.validator == "required":
        fields |= {prefix + name for name in error.validator_value if name not in instance}
    if error.validator == "additionalProperties":
        known = error.schema.get("properties", {})
        fields |= {prefix + name for name in instance if name not in known}
    return fields


def field_named(fragment: str) -> str:
    """The first field path in an expected message fragment."""
    match = _FIELD_PATH.search(fragment)
    if match is None:
        raise ValueError(f"expectation names no field: {fragment!r}")
    return match.group(0)


def covers(fields: set[str], wanted: str) -> bool:
    # NB: duplicates in a set are reported on the item (spec.models[1]), the
    # offline error on the list (spec.models).
    return wanted in fields or any(wanted.startswith(f"{f}[") for f in fields)


def read_sample(path: Path) -> Sample:
    text = path.read_text()
    expects = tuple(
        line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("# expect:")
    )
    documents = tuple(d for d in yaml.safe_load_all(text) if d is not None)
    return Sample(path, documents, expects)


def samples(kind: str) -> list[Sample]:
    return [read_sample(p) for p in sorted((SAMPLES_DIR / kind).glob("*.yaml"))]


def example_files() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("*.yaml"))
