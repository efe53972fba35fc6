"""Rendering tests, golden files included.

The golden files under tests/operator/golden/ are what ``headway render`` writes
for golden/input/ with golden/hashing-keys. After a deliberate change to the
output, regenerate them and review the diff:

    HEADWAY_UPDATE_GOLDEN=1 .venv/bin/pytest tests/operator/test_rendering.py
"""

import os
import random
from pathlib import Path
from typing import Any

import headway_contract as contract
import pytest
from headway_contract import HashingKeys, hash_api_key
from headway_operator import cli, rendering, specs
from headway_operator.rendering import Rendering

GOLDEN = Path(__file__).parent / "golden"
KEYS = HashingKeys(keys=(("k1", b"first-secret"),))


def pool(name: str, **spec: Any) -> specs.ModelPool:
    body = {"models": [f"{name}-model"], **spec}
    return specs.parse_model_pool(_body("ModelPool", name, body))


def route(name: str, *backends: str, fallback: tuple[str, ...] = ()) -> specs.InferenceRoute:
    spec = {
        "model": name,
        "backends": [{"pool": b, "weight": 1} for b in backends],
        "fallback": [{"pool": f} for f in fallback],
    }
    return specs.parse_inference_route(_body("InferenceRoute", name, spec))


def quota(name: str, secret: str | None = None, **spec: Any) -> specs.TokenQuota:
    if secret is not None:
        spec["apiKeys"] = {"secretRef": {"name": secret}}
    return specs.parse_token_quota(_body("TokenQuota", name, spec))


def secret(name: str, **values: str) -> specs.Secret:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": values}
    return specs.parse_secret(body)


def _body(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": specs.API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def render(*resources: Any, **options: Any) -> Rendering:
    def of(kind: type) -> list[Any]:
        return [r for r in resources if isinstance(r, kind)]

    options.setdefault("keys", KEYS)
    return rendering.render(
        of(specs.ModelPool),
        of(specs.InferenceRoute),
        of(specs.TokenQuota),
        of(specs.Secret),
        **options,
    )


def hashed(api_key: str, keys: HashingKeys = KEYS) -> set[str]:
    return {hash_api_key(key_id, key, api_key) for key_id, key in keys.keys}


def test_golden_documents_match(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = cli.render(
        files=[str(GOLDEN / "input")],
        out_dir=str(out),
        redis_url=None,
        key_file=str(GOLDEN / "hashing-keys"),
        fail_mode="open",
    )
    assert code == 0
    written = {p.name: p.read_text() for p in sorted(out.glob("*.json"))}
    if os.environ.get("HEADWAY_UPDATE_GOLDEN") == "1":
        for stale in GOLDEN.glob("*.json"):
            stale.unlink()
        for name, text in written.items():
            (GOLDEN / name).write_text(text)
    expected = {p.name: p.read_text() for p in sorted(GOLDEN.glob("*.json"))}

    assert sorted(written) == ["default.llama-70b.json", "default.llama-8b.json"]
    assert written == expected
    for text in written.values():
        document = contract.loads(text)
        assert contract.dumps(document) + "\n" == text


def test_same_resources_in_any_order_give_identical_json() -> None:
    resources: list[Any] = [
        pool("a"),
        pool("b"),
        route("chat", "a", "b", fallback=("b",)),
        route("code", "b"),
        quota("t1", "s1"),
        quota("t2", "s2", routes=["code"]),
        quota("t3", "s1", tenant="t1"),
        secret("s1", x="sk-1", y="sk-2"),
        secret("s2", z="sk-3"),
    ]
    first = render(*resources)
    texts = {key: contract.dumps(doc) for key, doc in first.documents.items()}
    for seed in range(5):
        random.Random(seed).shuffle(resources)
        again = render(*resources)
        assert {key: contract.dumps(doc) for key, doc in again.documents.items()} == texts
    assert first.problems == ()


def test_pool_document_holds_every_route_reaching_it_and_the_pools_they_name() -> None:
    result = render(
        pool("a"),
        pool("b"),
        pool("c"),
        pool("lonely"),
        route("split", "a", "b"),
        route("backup", "c", fallback=("a",)),
        route("only-b", "b"),
        pool_address="http://127.0.0.{pool}",
    )
    docs = result.documents

    assert [r.model for r in docs["default", "a"].routes] == ["backup", "split"]
    assert [p.name for p in docs["default", "a"].pools] == ["a", "b", "c"]
    assert [r.model for r in docs["default", "b"].routes] == ["only-b", "split"]
    assert [p.name for p in docs["default", "b"].pools] == ["a", "b"]
    assert docs["default", "c"].pool_ref("a") is not None
    assert docs["default", "lonely"].routes == () and docs["default", "lonely"].pools == ()
    assert docs["default", "a"].pools[0].address == "http://127.0.0.a"


def test_default_address_generation_replicas_and_limiter() -> None:
    redis = contract.RedisSettings(url="redis://127.0.0.1:6379/0", password_file="/run/pw")
    result = render(
        pool("a", scaling={"minReplicas": 2}),
        pool("b", scaling={"minReplicas": 3}),
        route("chat", "a", "b"),
        generation=lambda namespace, name: 7 if name == "a" else 8,
        replicas={("default", "b"): 5},
        redis=redis,
        fail_mode="closed",
    )
    a, b = result.documents["default", "a"], result.documents["default", "b"]

    assert (a.generation, a.replicas, b.generation, b.replicas) == (7, 2, 8, 5)
    assert a.pool_ref("b") == contract.PoolRef(
        name="b", address="http://b.default.svc.cluster.local:8080", pricing=None
    )
    assert a.limiter == contract.Limiter(redis=redis, fail_mode="closed")
    assert a.version == contract.loads(contract.dumps(a)).version != ""
    with pytest.raises(ValueError, match="fail mode"):
        render(pool("a"), fail_mode="sometimes")


def test_route_naming_a_missing_pool_is_rendered_without_it() -> None:
    result = render(
        pool("a"),
        route("chat", "a", "gone", fallback=("vanished",)),
        route("dead", "gone"),
    )

    doc = result.documents["default", "a"]
    chat = doc.route("chat")
    assert chat is not None
    assert [b.pool for b in chat.backends] == ["a"] and chat.fallback == ()
    assert doc.route("dead") is None
    messages = [str(p) for p in result.problems]
    assert messages == [
        "InferenceRoute default/chat: spec.backends[1].pool: names ModelPool 'gone', which does "
        "not exist in namespace default; left out",
        "InferenceRoute default/chat: spec.fallback[0].pool: names ModelPool 'vanished', which "
        "does not exist in namespace default; left out",
        "InferenceRoute default/dead: spec.backends[0].pool: names ModelPool 'gone', which does "
        "not exist in namespace default; left out",
        "InferenceRoute default/dead: spec.backends: no backend with weight is left; the route "
        "is not served",
    ]


def test_two_routes_claiming_one_model_serve_the_first_by_name() -> None:
    first = route("chat", "a")
    second = specs.parse_inference_route(
        _body("InferenceRoute", "chat-v2", {"model": "chat", "backends": [{"pool": "b"}]})
    )
    result = render(pool("a"), pool("b"), second, first)

    assert result.documents["default", "a"].route("chat") is not None
    assert result.documents["default", "b"].routes == ()
    assert [str(p) for p in result.problems] == [
        "InferenceRoute default/chat-v2: spec.model: 'chat' is already served by InferenceRoute "
        "default/chat; this route is not served"
    ]


def test_tenant_keys_are_hashed_with_every_hashing_key() -> None:
    keys = HashingKeys(keys=(("new", b"new-secret"), ("old", b"old-secret")))
    result = render(
        pool("a"),
        route("chat", "a"),
        quota("team", "team-keys"),
        secret("team-keys", one=" sk-one\n", two="sk-two", blank="   "),
        keys=keys,
    )

    (tenant,) = result.documents["default", "a"].tenants
    assert set(tenant.key_hashes) == hashed("sk-one", keys) | hashed("sk-two", keys)
    assert len(tenant.key_hashes) == 4
    assert {h.split(":")[1] for h in tenant.key_hashes} == {"new", "old"}
    assert "sk-one" not in contract.dumps(result.documents["default", "a"])


def test_quotas_naming_one_tenant_make_one_tenant() -> None:
    result = render(
        pool("a"),
        route("chat", "a"),
        quota("search", "k1", limits={"tokensPerMinute": 1000}),
        quota("search-daily", tenant="search", limits={"tokensPerDay": 50000}),
        quota("other", "k2"),
        secret("k1", a="sk-search"),
        secret("k2", a="sk-other"),
    )

    tenants = {t.name: t for t in result.documents["default", "a"].tenants}
    assert sorted(tenants) == ["other", "search"]
    search = tenants["search"]
    assert [q.id for q in search.quotas] == ["default/search", "default/search-daily"]
    assert search.quotas[1].limits == contract.Limits(tokens_per_day=50000)
    assert set(search.key_hashes) == hashed("sk-search")


def test_tenants_appear_only_where_their_routes_are_served() -> None:
    result = render(
        pool("a"),
        pool("b"),
        route("chat", "a"),
        route("code", "b"),
        quota("everywhere"),
        quota("chatty", routes=["chat"]),
        quota("coder", routes=["code"]),
        quota("lost", routes=["nope"]),
    )

    def names(pool_name: str) -> list[str]:
        return [t.name for t in result.documents["default", pool_name].tenants]

    assert names("a") == ["chatty", "everywhere"]
    assert names("b") == ["coder", "everywhere"]
    assert [str(p) for p in result.problems] == [
        "TokenQuota default/lost: spec.routes[0]: names no served route 'nope'"
    ]


def test_quota_routes_may_name_a_route_or_its_model() -> None:
    named = specs.parse_inference_route(
        _body("InferenceRoute", "chat-route", {"model": "chat", "backends": [{"pool": "a"}]})
    )
    result = render(
        pool("a"),
        named,
        quota("by-name", routes=["chat-route"]),
        quota("by-model", routes=["chat"]),
    )

    quotas = [q for t in result.documents["default", "a"].tenants for q in t.quotas]
    assert [q.routes for q in quotas] == [("chat",), ("chat",)]
    assert result.problems == ()


def test_quota_naming_a_missing_secret_keeps_its_limits_and_gets_no_keys() -> None:
    result = render(
        pool("a"),
        route("chat", "a"),
        quota("team", "missing-keys", limits={"tokensPerMinute": 10}),
        quota("fine", "fine-keys"),
        secret("fine-keys", a="sk-fine"),
    )

    tenants = {t.name: t for t in result.documents["default", "a"].tenants}
    assert tenants["team"].key_hashes == ()
    assert tenants["team"].quotas[0].limits.tokens_per_minute == 10
    assert set(tenants["fine"].key_hashes) == hashed("sk-fine")
    assert [str(p) for p in result.problems] == [
        "TokenQuota default/team: spec.apiKeys.secretRef.name: names Secret 'missing-keys', "
        "which does not exist in namespace default; tenant 'team' gets no API keys from this quota"
    ]


def test_key_listed_for_two_tenants_is_refused_for_both() -> None:
    result = render(
        pool("a"),
        route("chat", "a"),
        quota("alpha", "alpha-keys"),
        quota("beta", "beta-keys"),
        quota("alpha-extra", "alpha-keys", tenant="alpha"),
        secret("alpha-keys", own="sk-alpha", leaked="sk-shared"),
        secret("beta-keys", own="sk-beta", copy="sk-shared"),
    )

    tenants = {t.name: t for t in result.documents["default", "a"].tenants}
    assert set(tenants["alpha"].key_hashes) == hashed("sk-alpha")
    assert set(tenants["beta"].key_hashes) == hashed("sk-beta")
    messages = [str(p) for p in result.problems]
    assert (
        "TokenQuota default/alpha: spec.apiKeys.secretRef.name: Secret 'alpha-keys' entry "
        "'leaked' holds an API key that TokenQuota default/beta (tenant 'beta') also lists; "
        "refused for tenants 'alpha' and 'beta'"
    ) in messages
    pairs = {(p.name, p.message.split("TokenQuota ")[1].split(" ")[0]) for p in result.problems}
    assert pairs == {
        ("alpha", "default/beta"),
        ("alpha-extra", "default/beta"),
        ("beta", "default/alpha"),
        ("beta", "default/alpha-extra"),
    }
    assert len(messages) == 4
    assert all("sk-shared" not in m for m in messages)


def test_namespaces_are_rendered_apart() -> None:
    other = specs.parse_model_pool(
        {
            "apiVersion": specs.API_VERSION,
            "kind": "ModelPool",
            "metadata": {"name": "a", "namespace": "ml"},
            "spec": {"models": ["m"]},
        }
    )
    result = render(pool("a"), other, route("chat", "a"), quota("team"))

    assert sorted(result.documents) == [("default", "a"), ("ml", "a")]
    assert result.documents["ml", "a"].routes == () and result.documents["ml", "a"].tenants == ()
