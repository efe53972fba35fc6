"""The CRDs themselves: identity, structural schemas, descriptions, defaults, columns."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest

from tests.crds import crdschema

CRDS = crdschema.load_crds()
SHORT_NAMES = {"ModelPool": "mp", "InferenceRoute": "ir", "TokenQuota": "tq"}
# Keywords a structural schema may use; anything else (anyOf, $ref, ...) is
# either refused by the API server or makes the schema non-structural.
STRUCTURAL_KEYS = {
    "type", "description", "properties", "items", "additionalProperties", "required",
    "default", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties", "format",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
}  # fmt: skip


def schema_nodes() -> list[tuple[str, str, Mapping[str, Any]]]:
    return [
        (kind, path, node)
        for kind, crd in CRDS.items()
        for path, node in crdschema.walk(crdschema.open_api_schema(crd))
    ]


def test_crds_cover_the_three_kinds_with_their_names() -> None:
    assert set(CRDS) == set(SHORT_NAMES)
    for kind, crd in CRDS.items():
        spec = crd["spec"]
        assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.headway.dev"
        assert spec["group"] == "headway.dev"
        assert spec["scope"] == "Namespaced"
        assert spec["names"]["shortNames"] == [SHORT_NAMES[kind]]
        assert spec["names"]["categories"] == ["headway"]
        (version,) = spec["versions"]
        assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}


def test_schemas_are_structural() -> None:
    for kind, path, node in schema_nodes():
        where = f"{kind} {path or '<root>'}"
        assert "type" in node, f"{where} has no type"
        assert set(node) <= STRUCTURAL_KEYS, f"{where} uses {set(node) - STRUCTURAL_KEYS}"
        assert not ("properties" in node and "additionalProperties" in node), where
        if node["type"] == "array":
            assert "items" in node, f"{where} is an array without items"
        for name in node.get("required", ()):
            assert name in node.get("properties", {}), f"{where} requires unknown {name}"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object" and "properties" not in node, where


def test_root_metadata_is_left_to_the_api_server() -> None:
    # The API server refuses anything on root metadata but name/generateName
    # restrictions, a description included.
    for kind, crd in CRDS.items():
        assert crdschema.open_api_schema(crd)["properties"]["metadata"] == {"type": "object"}, kind


def test_every_field_has_a_description() -> None:
    missing = [
        f"{kind} {path or '<root>'}"
        for kind, path, node in schema_nodes()
        if path != "metadata" and not str(node.get("description", "")).strip()
    ]
    assert missing == []


def test_spec_lists_and_strings_are_bounded_for_cel_cost() -> None:
    # The API server estimates a CEL rule's cost from these bounds and refuses
    # CRDs over budget; unbounded ones also let one object grow without limit.
    unbounded = []
    for kind, path, node in schema_nodes():
        if not path.startswith("spec") or path.startswith("spec.server.template"):
            continue
        if node["type"] == "array" and "maxItems" not in node:
            unbounded.append(f"{kind} {path}")
        if node["type"] == "string" and "maxLength" not in node and "enum" not in node:
            unbounded.append(f"{kind} {path}")
        if (
            node["type"] == "object"
            and "additionalProperties" in node
            and "maxProperties" not in node
        ):
            unbounded.append(f"{kind} {path}")
    assert unbounded == []


def test_defaults_follow_the_design() -> None:
    def default(kind: str, path: str) -> object:
        nodes = {p: n for k, p, n in schema_nodes() if k == kind}
        return nodes[path]["default"]

    expected = {
        ("ModelPool", "spec.server.port"): 8000,
        ("ModelPool", "spec.capacity.maxConcurrency"): 32,
        ("ModelPool", "spec.capacity.batchMaxShare"): 0.75,
        ("ModelPool", "spec.capacity.queues.realtime.maxDepth"): 256,
        ("ModelPool", "spec.capacity.queues.realtime.timeout"): "10s",
        ("ModelPool", "spec.capacity.queues.batch.maxDepth"): 4096,
        ("ModelPool", "spec.capacity.queues.batch.timeout"): "5m",
        ("ModelPool", "spec.scaling.mode"): "operator",
        ("ModelPool", "spec.scaling.minReplicas"): 1,
        ("ModelPool", "spec.scaling.maxReplicas"): 8,
        ("ModelPool", "spec.scaling.targetQueuePerReplica"): 4,
        ("ModelPool", "spec.scaling.ttftTarget"): "800ms",
        ("ModelPool", "spec.scaling.scaleUpCooldown"): "30s",
        ("ModelPool", "spec.scaling.scaleDownDelay"): "5m",
        ("ModelPool", "spec.nodePool.gpusPerReplica"): 1,
        ("ModelPool", "spec.nodePool.warmReplicas"): 0,
        ("ModelPool", "spec.pricing.currency"): "USD",
        ("InferenceRoute", "spec.priority.default"): "realtime",
        ("InferenceRoute", "spec.priority.allowOverride"): True,
        ("InferenceRoute", "spec.defaultMaxTokens"): 512,
        ("InferenceRoute", "spec.timeouts.firstToken"): "30s",
        ("InferenceRoute", "spec.timeouts.total"): "10m",
        ("TokenQuota", "spec.priority.allowed"): ["realtime", "batch"],
        ("TokenQuota", "spec.onExceeded"): "reject",
        ("TokenQuota", "spec.fairShareWeight"): 1,
    }
    assert {key: default(*key) for key in expected} == expected


def test_defaults_are_valid_against_their_own_schema() -> None:
    # The API server refuses a CRD whose defaults its own schema would refuse.
    for kind, path, node in schema_nodes():
        if "default" in node:
            schema = crdschema.to_json_schema(node)
            errors = list(jsonschema.Draft4Validator(schema).iter_errors(node["default"]))
            assert errors == [], f"{kind} {path}: {errors[0].message}"


def test_enums_and_patterns_follow_the_design() -> None:
    nodes = {(k, p): n for k, p, n in schema_nodes()}
    assert nodes["ModelPool", "spec.scaling.mode"]["enum"] == ["operator", "external"]
    assert nodes["TokenQuota", "spec.onExceeded"]["enum"] == ["reject", "demote"]
    for key in [
        ("InferenceRoute", "spec.priority.default"),
        ("TokenQuota", "spec.priority.default"),
    ]:
        assert nodes[key]["enum"] == ["realtime", "batch"]
    durations = [n for (_, p), n in nodes.items() if n.get("pattern", "").endswith("(ms|s|m|h))+$")]
    assert len(durations) == 7
    duration = re.compile(durations[0]["pattern"])
    assert all(duration.fullmatch(t) for t in ("500ms", "10s", "1m30s", "1.5h"))
    assert not any(duration.search(t) for t in ("800", "10 s", "5min", "-1s", ""))
    money = re.compile(nodes["TokenQuota", "spec.limits.costPerMonth"]["pattern"])
    assert money.fullmatch("250.00") and money.fullmatch("0")
    assert not any(money.search(t) for t in ("$1", "1e3", "-1", "1.", ".5"))
    for key in [
        ("TokenQuota", "spec.tenant"),
        ("InferenceRoute", "spec.backends[].pool"),
        ("InferenceRoute", "spec.fallback[].pool"),
    ]:
        assert nodes[key]["maxLength"] == 63


def _schema_path(column_path: str) -> str:
    # .status.conditions[?(@.type=="Ready")].status -> status.conditions[].status
    return re.sub(r"\[[^\]]*\]", "[]", column_path.lstrip("."))


@pytest.mark.parametrize("kind", sorted(SHORT_NAMES))
def test_printer_columns_point_at_schema_fields(kind: str) -> None:
    crd = CRDS[kind]
    paths = {p for p, _ in crdschema.walk(crdschema.open_api_schema(crd))}
    columns = crdschema.version_of(crd)["additionalPrinterColumns"]
    for column in columns:
        if column["jsonPath"] == ".metadata.creationTimestamp":
            assert column["type"] == "date"
            continue
        path = _schema_path(column["jsonPath"])
        assert path in paths, f"{column['name']}: {path}"
        assert column["description"]
    assert columns[-1]["name"] == "Age"
