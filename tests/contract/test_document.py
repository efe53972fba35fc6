import json

import headway_contract as contract
import pytest

from tests.contract.sample import sample


def test_document_round_trips_through_canonical_json() -> None:
    doc = contract.parse(sample())
    text = contract.dumps(doc)
    again = contract.loads(text)
    assert again == doc
    assert again.version == doc.version
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def test_version_ignores_generation_but_follows_content() -> None:
    first = contract.parse(sample())
    data = sample()
    data["generation"] = 7
    assert contract.parse(data).version == first.version
    data["capacity"]["maxConcurrency"] = 5
    assert contract.parse(data).version != first.version


@pytest.mark.parametrize(
    ("mutate", "path", "fragment"),
    [
        (lambda d: d.update(schemaVersion=2), "schemaVersion", "unsupported"),
        (lambda d: d["capacity"].update(maxConcurrency="4"), "capacity.maxConcurrency", '"4"'),
        (lambda d: d["capacity"].update(batchMaxShare=1.5), "capacity.batchMaxShare", "1.5"),
        (lambda d: d["routes"][0].update(bogus=1), "routes[0].bogus", "unknown field"),
        (
            lambda d: d["routes"][0]["backends"][0].update(pool="gone"),
            "routes[0].backends[0].pool",
            "gone",
        ),
        (
            lambda d: d["tenants"][0]["quotas"][0]["limits"].update(tokensPerMinute=-5),
            "tenants[0].quotas[0].limits.tokensPerMinute",
            "-5",
        ),
        (
            lambda d: d["pricing"].update(inputPerMillionTokens="ten"),
            "pricing.inputPerMillionTokens",
            "ten",
        ),
        (lambda d: d.update(version="sha256:0"), "version", "does not match"),
    ],
)
def test_bad_documents_name_the_field_and_value(mutate, path, fragment) -> None:  # type: ignore[no-untyped-def]
    data = sample()
    mutate(data)
    with pytest.raises(contract.ContractError) as info:
        contract.parse(data)
    assert info.value.path == path
    assert fragment in str(info.value)


def test_shared_api_key_between_tenants_is_refused() -> None:
    data = sample()
    other = json.loads(json.dumps(data["tenants"][0]))
    other["name"] = "team-b"
    data["tenants"].append(other)
    with pytest.raises(contract.ContractError, match="shares an API key"):
        contract.parse(data)


def test_not_json_is_a_contract_error() -> None:
    with pytest.raises(contract.ContractError, match="not valid JSON"):
        contract.loads("{")


@pytest.mark.parametrize(
    ("text", "seconds"), [("500ms", 0.5), ("30s", 30), ("10m", 600), ("1m30s", 90), ("1.5s", 1.5)]
)
def test_durations(text: str, seconds: float) -> None:
    assert contract.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10x", "5m 3s", "-1s"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        contract.parse_duration(text)


def test_hashing_keys_rotate(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys"
    path.write_text("new:secret-2\nold:secret-1\n")
    keys = contract.load_hashing_keys(path)
    assert keys.current == ("new", b"secret-2")
    signature = contract.sign(contract.HashingKeys(keys=(("old", b"secret-1"),)), "payload")
    assert contract.verify(keys, "payload", signature)
    assert not contract.verify(keys, "other", signature)
