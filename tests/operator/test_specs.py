import base64
from decimal import Decimal
from typing import Any

import headway_contract as contract
import pytest
from headway_operator import specs
from headway_operator.specs import SpecError


def resource(kind: str, name: str, spec: dict[str, Any], **meta: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1" if kind == "Secret" else specs.API_VERSION,
        "kind": kind,
        "metadata": {"name": name, **meta},
        "spec": spec,
    }


def test_model_pool_absent_fields_take_the_design_defaults() -> None:
    pool = specs.parse_model_pool(resource("ModelPool", "small", {"models": ["m"]}))

    assert (pool.namespace, pool.name, pool.models, pool.port) == ("default", "small", ("m",), 8000)
    assert pool.template is None and pool.pricing is None
    cap = pool.capacity
    assert (cap.max_concurrency, cap.batch_max_share) == (32, 0.75)
    assert (cap.realtime.max_depth, cap.realtime.timeout) == (256, 10.0)
    assert (cap.batch.max_depth, cap.batch.timeout) == (4096, 300.0)
    s = pool.scaling
    assert (s.mode, s.min_replicas, s.max_replicas, s.target_queue_per_replica) == (
        "operator",
        1,
        8,
        4.0,
    )
    assert (s.ttft_target, s.scale_up_cooldown, s.scale_down_delay) == (0.8, 30.0, 300.0)
    assert pool.node_pool == specs.NodePool(
        node_selector={}, tolerations=(), gpus_per_replica=1, warm_replicas=0
    )


def test_model_pool_fields_are_read_with_durations_in_seconds() -> None:
    spec = {
        "models": ["a", "b"],
        "server": {"port": 9000, "template": {"spec": {"containers": []}}},
        "capacity": {"maxConcurrency": 8, "queues": {"realtime": {"timeout": "1m30s"}}},
        "scaling": {"minReplicas": 2, "maxReplicas": 3, "ttftTarget": "250ms"},
        "nodePool": {"nodeSelector": {"gpu": "l4"}, "gpusPerReplica": 2},
        "pricing": {"inputPerMillionTokens": "0.10", "outputPerMillionTokens": 1},
    }
    pool = specs.parse_model_pool(resource("ModelPool", "p", spec, namespace="ml"))

    assert pool.namespace == "ml" and pool.port == 9000
    assert pool.template == {"spec": {"containers": []}}
    assert pool.capacity.realtime.timeout == 90.0 and pool.capacity.realtime.max_depth == 256
    assert pool.scaling.ttft_target == 0.25
    assert pool.node_pool.node_selector == {"gpu": "l4"} and pool.node_pool.gpus_per_replica == 2
    assert pool.pricing is not None
    assert pool.pricing.input_per_million == Decimal("0.10") and pool.pricing.currency == "USD"


def test_route_and_quota_defaults() -> None:
    route = specs.parse_inference_route(
        resource("InferenceRoute", "chat", {"model": "chat", "backends": [{"pool": "p"}]})
    )
    assert route.backends[0].weight == 1 and route.backends[0].model is None
    assert route.fallback == ()
    assert (route.priority.default, route.priority.allow_override) == ("realtime", True)
    assert (route.default_max_tokens, route.first_token_timeout, route.total_timeout) == (
        512,
        30.0,
        600.0,
    )

    quota = specs.parse_token_quota(resource("TokenQuota", "team-a", {}))
    assert (quota.tenant, quota.secret_name, quota.routes, quota.id) == (
        "team-a",
        None,
        None,
        "default/team-a",
    )
    assert quota.limits == contract.Limits()
    assert (quota.priority.default, quota.priority.allowed) == (None, ("realtime", "batch"))
    assert (quota.on_exceeded, quota.fair_share_weight) == ("reject", 1)


@pytest.mark.parametrize(
    ("kind", "spec", "expected"),
    [
        (
            "ModelPool",
            {"models": ["m"], "scaling": {"minReplicas": 0}},
            "ModelPool default/x: spec.scaling.minReplicas: must be at least 1 (got 0)",
        ),
        (
            "ModelPool",
            {"models": ["m"], "scaling": {"minReplicas": 4, "maxReplicas": 2}},
            "ModelPool default/x: spec.scaling.maxReplicas: must not be below minReplicas",
        ),
        ("ModelPool", {}, "ModelPool default/x: spec.models: is required"),
        (
            "ModelPool",
            {"models": ["m"], "capacity": {"queues": {"batch": {"timeout": "soon"}}}},
            "spec.capacity.queues.batch.timeout: expected a positive duration like 500ms, 30s or "
            '5m (got "soon")',
        ),
        (
            "ModelPool",
            {"models": ["m"], "capacity": {"batchMaxShare": 1.5}},
            "spec.capacity.batchMaxShare: must be in (0, 1] (got 1.5)",
        ),
        (
            "ModelPool",
            {
                "models": ["m"],
                "pricing": {"inputPerMillionTokens": 0.2, "outputPerMillionTokens": "1"},
            },
            "spec.pricing.inputPerMillionTokens: expected a decimal string, quoted in YAML",
        ),
        (
            "ModelPool",
            {"models": ["m"], "sever": {"port": 1}},
            'ModelPool default/x: spec.sever: unknown field (got {"port": 1})',
        ),
        (
            "InferenceRoute",
            {"model": "c", "backends": [{"pool": "p", "weight": 0}]},
            "InferenceRoute default/x: spec.backends: weights must not all be 0",
        ),
        (
            "InferenceRoute",
            {"model": "c", "backends": [{"pool": "p"}], "fallback": [{"pool": "q", "weight": 3}]},
            "InferenceRoute default/x: spec.fallback[0].weight: unknown field (got 3)",
        ),
        (
            "InferenceRoute",
            {"model": "c", "backends": [{"pool": "p"}], "priority": {"default": "urgent"}},
            'spec.priority.default: expected one of realtime, batch (got "urgent")',
        ),
        (
            "TokenQuota",
            {"priority": {"default": "realtime", "allowed": ["batch"]}},
            'spec.priority.default: is not one of the allowed classes (got "realtime")',
        ),
        (
            "TokenQuota",
            {"limits": {"tokensPerMinute": "lots"}},
            'TokenQuota default/x: spec.limits.tokensPerMinute: expected an integer (got "lots")',
        ),
        (
            "TokenQuota",
            {"apiKeys": {"secretRef": {}}},
            "TokenQuota default/x: spec.apiKeys.secretRef.name: is required",
        ),
    ],
)
def test_bad_specs_name_the_resource_and_the_field(
    kind: str, spec: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError) as info:
        specs.PARSERS[kind](resource(kind, "x", spec))
    assert expected in str(info.value)
    assert info.value.problem.kind == kind and info.value.problem.name == "x"


def test_resource_identity_is_checked_before_the_spec() -> None:
    with pytest.raises(SpecError, match=r"ModelPool default/<unnamed>: metadata.name: is required"):
        specs.parse_model_pool({"kind": "ModelPool", "metadata": {}, "spec": {"models": ["m"]}})
    body = resource("ModelPool", "p", {"models": ["m"]})
    body["apiVersion"] = "headway.dev/v2"
    with pytest.raises(SpecError, match=r"apiVersion: expected headway.dev/v1alpha1"):
        specs.parse_model_pool(body)


def test_secret_values_are_decoded_stripped_and_never_shown() -> None:
    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {"name": "keys", "namespace": "ml"},
        "data": {"a": b64(" sk-a\n"), "b": b64("sk-old"), "blank": b64("  ")},
        "stringData": {"b": "sk-new", "c": "\tsk-c "},
    }
    secret = specs.parse_secret(body)

    assert secret.values == (("a", "sk-a"), ("b", "sk-new"), ("c", "sk-c"))
    assert "sk-" not in repr(secret)

    body["data"] = {"bad": "sk-not-base64!"}
    with pytest.raises(SpecError) as info:
        specs.parse_secret(body)
    assert str(info.value) == "Secret ml/keys: data.bad: is not base64-encoded UTF-8 text"
