"""A small valid contract document shared by tests."""

from __future__ import annotations

import copy
from typing import Any

from headway_contract import DEV_KEY_ID, hash_api_key, keys

DEV_SECRET = keys._DEV_SECRET


def key_hash(api_key: str) -> str:
    return hash_api_key(DEV_KEY_ID, DEV_SECRET, api_key)


_SAMPLE: dict[str, Any] = {
    "schemaVersion": 1,
    "generation": 1,
    "namespace": "default",
    "pool": "small",
    "server": {"port": 8000, "models": ["llama-3.1-8b-instruct"]},
    "capacity": {
        "maxConcurrency": 4,
        "batchMaxShare": 0.75,
        "queues": {
            "realtime": {"maxDepth": 64, "timeout": 10.0},
            "batch": {"maxDepth": 256, "timeout": 60.0},
        },
    },
    "replicas": 1,
    "routes": [
        {
            "model": "chat",
            "backends": [{"pool": "small", "weight": 100, "model": "llama-3.1-8b-instruct"}],
            "priority": {"default": "realtime", "allowOverride": True},
            "defaultMaxTokens": 256,
            "timeouts": {"firstToken": 30.0, "total": 600.0},
        }
    ],
    "pools": [
        {
            "name": "small",
            "address": "http://127.0.0.1:8080",
            "pricing": {
                "inputPerMillionTokens": "0.20",
                "outputPerMillionTokens": "0.60",
                "currency": "USD",
            },
        }
    ],
    "tenants": [
        {
            "name": "team-a",
            "keyHashes": [key_hash("sk-team-a")],
            "quotas": [
                {
                    "id": "default/team-a",
                    "limits": {"tokensPerMinute": 100000, "requestsPerMinute": 600},
                    "priority": {"default": "realtime", "allowed": ["realtime", "batch"]},
                    "onExceeded": "reject",
                    "fairShareWeight": 1,
                }
            ],
        }
    ],
    "limiter": {"failMode": "open"},
    "pricing": {
        "inputPerMillionTokens": "0.20",
        "outputPerMillionTokens": "0.60",
        "currency": "USD",
    },
}


def sample() -> dict[str, Any]:
    """A fresh deep copy of the sample document, safe to modify."""
    return copy.deepcopy(_SAMPLE)
