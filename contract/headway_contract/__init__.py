"""The versioned config document the operator renders and every sidecar loads.

One document per ModelPool, serialised as canonical JSON. This package is
the only place that knows its shape: parsing (with errors naming the field
path and the bad value), canonical serialisation, the version hash and API
key hashing. Standard library only, so both sides can depend on it.
"""

from headway_contract.document import (
    CLASSES,
    SCHEMA_VERSION,
    Backend,
    Capacity,
    Document,
    Limiter,
    Limits,
    PoolRef,
    Pricing,
    PriorityPolicy,
    QueueSettings,
    Quota,
    QuotaPriority,
    RedisSettings,
    Route,
    Server,
    Tenant,
    dumps,
    loads,
    parse,
    to_dict,
    version_of,
)
from headway_contract.durations import parse_duration
from headway_contract.keys import (
    DEV_KEY_ID,
    HashingKeys,
    KeyFileError,
    hash_api_key,
    load_hashing_keys,
    parse_hashing_keys,
    sign,
    verify,
)
from headway_contract.reading import ContractError

__all__ = [
    "CLASSES",
    "DEV_KEY_ID",
    "SCHEMA_VERSION",
    "Backend",
    "Capacity",
    "ContractError",
    "Document",
    "HashingKeys",
    "KeyFileError",
    "Limiter",
    "Limits",
    "PoolRef",
    "Pricing",
    "PriorityPolicy",
    "QueueSettings",
    "Quota",
    "QuotaPriority",
    "RedisSettings",
    "Route",
    "Server",
    "Tenant",
    "dumps",
    "hash_api_key",
    "load_hashing_keys",
    "loads",
    "parse",
    "parse_duration",
    "parse_hashing_keys",
    "sign",
    "to_dict",
    "verify",
    "version_of",
]
