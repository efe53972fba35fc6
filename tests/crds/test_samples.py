"""Samples and examples against the CRD schemas, offline.

Valid samples and every file in examples/ must pass the schema. An invalid
sample is refused either by the schema, for the field its `# expect:` lines
name, or by one CEL rule: then the schema must accept it, so that on a real API
server (test_apiserver.py) the rule alone is what refuses it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from headway_operator import specs

from tests.crds import crdschema

CHECKERS = crdschema.validators()
RULES = crdschema.cel_rules(crdschema.load_crds())
VALID = crdschema.samples("valid")
INVALID = crdschema.samples("invalid")


def _id(sample: crdschema.Sample) -> str:
    return sample.path.stem


def _cel_rules_matching(kind: str, fragment: str) -> list[crdschema.Rule]:
    return [r for r in RULES if r.kind == kind and fragment in r.message]


def _is_cel_sample(sample: crdschema.Sample) -> bool:
    (document,) = sample.documents
    return any(_cel_rules_matching(document["kind"], e) for e in sample.expects)


@pytest.mark.parametrize("sample", VALID, ids=_id)
def test_valid_sample_passes_the_schema(sample: crdschema.Sample) -> None:
    assert sample.documents
    for document in sample.documents:
        assert crdschema.schema_errors(document, CHECKERS) == []


@pytest.mark.parametrize("path", crdschema.example_files(), ids=lambda p: p.name)
def test_example_passes_the_schema(path: Path) -> None:
    sample = crdschema.read_sample(path)
    for document in sample.documents:
        assert document["apiVersion"] in ("headway.dev/v1alpha1", "v1"), path
        assert not document["metadata"].get("namespace"), "examples use the default namespace"
        errors = crdschema.schema_errors(document, CHECKERS)
        assert [e.message for e in errors] == []


def test_examples_hold_the_resources_the_demo_uses() -> None:
    documents = [
        d for path in crdschema.example_files() for d in crdschema.read_sample(path).documents
    ]
    by_kind: dict[str, dict[str, dict[str, object]]] = {}
    for document in documents:
        by_kind.setdefault(document["kind"], {})[document["metadata"]["name"]] = document
    assert set(by_kind["ModelPool"]) == {"llama-8b", "llama-70b"}
    assert {"search-app", "analytics", "intern-team"} <= set(by_kind["TokenQuota"])
    chat = by_kind["InferenceRoute"]["chat"]["spec"]
    assert [(b["pool"], b["weight"]) for b in chat["backends"]] == [  # type: ignore[index]
        ("llama-8b", 90),
        ("llama-70b", 10),
    ]
    assert [f["pool"] for f in chat["fallback"]] == ["llama-70b"]  # type: ignore[index]
    for quota in by_kind["TokenQuota"].values():
        secret = by_kind["Secret"][quota["spec"]["apiKeys"]["secretRef"]["name"]]  # type: ignore[index]
        keys = secret["stringData"].values()  # type: ignore[attr-defined]
        assert keys and all(k.startswith("sk-demo-") for k in keys)
    analytics = by_kind["TokenQuota"]["analytics"]["spec"]
    assert analytics["priority"]["allowed"] == ["batch"]  # type: ignore[index]
    assert by_kind["TokenQuota"]["intern-team"]["spec"]["onExceeded"] == "demote"  # type: ignore[index]


@pytest.mark.parametrize(
    "sample",
    [*VALID, *(crdschema.read_sample(p) for p in crdschema.example_files())],
    ids=_id,
)
def test_what_the_schema_accepts_the_operator_parses(sample: crdschema.Sample) -> None:
    # `headway render` and the operator read resources with their own parser;
    # a resource the API server stores must not be one they refuse.
    for document in sample.documents:
        parsed = specs.PARSERS[document["kind"]](copy.deepcopy(document))
        assert parsed.name == document["metadata"]["name"]


@pytest.mark.parametrize("sample", INVALID, ids=_id)
def test_invalid_sample_names_what_it_breaks(sample: crdschema.Sample) -> None:
    assert len(sample.documents) == 1, "one resource per invalid sample"
    assert sample.expects, "an invalid sample needs `# expect:` lines"
    kind = sample.documents[0]["kind"]
    kinds = {bool(_cel_rules_matching(kind, e)) for e in sample.expects}
    assert len(kinds) == 1, "an invalid sample is refused by the schema or by CEL, not both"
    for fragment in sample.expects:
        crdschema.field_named(fragment)


@pytest.mark.parametrize("sample", [s for s in INVALID if not _is_cel_sample(s)], ids=_id)
def test_schema_refuses_invalid_sample_for_the_named_fields(sample: crdschema.Sample) -> None:
    (document,) = sample.documents
    errors = crdschema.schema_errors(document, CHECKERS)
    assert errors, "the schema accepts it"
    fields = set().union(*(crdschema.error_fields(e) for e in errors))
    for fragment in sample.expects:
        wanted = crdschema.field_named(fragment)
        assert crdschema.covers(fields, wanted), f"no error about {wanted}; got {sorted(fields)}"


@pytest.mark.parametrize("sample", [s for s in INVALID if _is_cel_sample(s)], ids=_id)
def test_cel_sample_passes_the_schema_and_names_one_rule(sample: crdschema.Sample) -> None:
    (document,) = sample.documents
    assert crdschema.schema_errors(document, CHECKERS) == []
    for fragment in sample.expects:
        assert len(_cel_rules_matching(document["kind"], fragment)) == 1, fragment


def test_every_cel_rule_has_an_invalid_sample() -> None:
    exercised = {
        rule
        for sample in INVALID
        for fragment in sample.expects
        for rule in _cel_rules_matching(sample.documents[0]["kind"], fragment)
    }
    missing = [f"{r.kind} {r.path or '<root>'}: {r.message}" for r in RULES if r not in exercised]
    assert RULES and missing == []


def test_every_cel_message_names_its_field() -> None:
    for rule in RULES:
        field = crdschema.field_named(rule.message)
        anchor = rule.path.replace("[]", "")
        assert field.startswith(anchor) or not anchor, f"{rule.message!r} at {rule.path}"
