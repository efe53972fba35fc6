"""``headway render`` as a user runs it: a real process, its files, stdout and stderr."""

import base64
import json
import subprocess
import sys
from pathlib import Path

import headway_contract as contract
import pytest
import yaml
from headway_contract import hash_api_key

REPO = Path(__file__).resolve().parents[2]
HEADWAY = Path(sys.executable).parent / "headway"
GOLDEN_INPUT = REPO / "tests" / "operator" / "golden" / "input"
API_KEYS = (
    "sk-search-primary",
    "sk-search-secondary",
    "sk-batch-nightly",
    "sk-research-alice",
    "sk-research-bob",
)

POOLS = """
apiVersion: headway.dev/v1alpha1
kind: ModelPool
metadata: {name: small}
spec: {models: [small-model]}
---
apiVersion: headway.dev/v1alpha1
kind: InferenceRoute
metadata: {name: chat}
spec:
  model: chat
  backends: [{pool: small, weight: 9}, {pool: large, weight: 1}]
"""


def headway(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HEADWAY), "render", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def quota_yaml(name: str, secret: str, **keys: str) -> str:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}
    return (
        "---\napiVersion: headway.dev/v1alpha1\nkind: TokenQuota\n"
        f"metadata: {{name: {name}}}\n"
        f"spec: {{apiKeys: {{secretRef: {{name: {secret}}}}}, limits: {{tokensPerMinute: 100}}}}\n"
        f"---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}}}\n"
        f"data: {json.dumps(data)}\n"
    )


def assert_refused(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


def test_render_writes_one_loadable_document_per_pool(tmp_path: Path) -> None:
    out = tmp_path / "config"
    result = headway("-f", str(GOLDEN_INPUT), "-o", str(out))

    assert result.returncode == 0, result.stderr
    assert "development key" in result.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files == ["default.llama-70b.json", "default.llama-8b.json"]
    for name in files:
        text = (out / name).read_text()
        document = contract.loads(text)
        assert f"{document.namespace}.{document.pool}.json" == name
        assert document.generation == 1 and document.limiter.redis is None
        assert all(key not in text for key in API_KEYS)


def test_render_prints_one_document_per_line_with_every_key_hashed(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("current:first-secret\nprevious:second-secret\n")
    result = headway(
        "-f", str(GOLDEN_INPUT / "pools.yaml"), "-f", str(GOLDEN_INPUT / "routes.yaml"),
        "-f", str(GOLDEN_INPUT / "quotas.yaml"), "-f", str(GOLDEN_INPUT / "secrets.yaml"),
        "--key-file", str(key_file), "--redis-url", "redis://127.0.0.1:6390/0",
        "--fail-mode", "closed",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    documents = [contract.loads(line) for line in lines]
    assert [d.pool for d in documents] == ["llama-70b", "llama-8b"]
    assert all(key not in result.stdout for key in API_KEYS)
    hashes = {h for d in documents for t in d.tenants for h in t.key_hashes}
    expected = {
        hash_api_key(key_id, secret, api_key)
        for api_key in API_KEYS
        for key_id, secret in (("current", b"first-secret"), ("previous", b"second-secret"))
    }
    assert hashes == expected and len(hashes) == 2 * len(API_KEYS)
    for document in documents:
        assert document.limiter == contract.Limiter(
            redis=contract.RedisSettings(url="redis://127.0.0.1:6390/0"), fail_mode="closed"
        )


def test_render_refuses_a_route_naming_a_missing_pool(tmp_path: Path) -> None:
    (tmp_path / "route.yaml").write_text(POOLS)
    out = tmp_path / "config"
    result = headway("-f", str(tmp_path), "-o", str(out))

    assert_refused(
        result,
        f"{tmp_path / 'route.yaml'}: document 2: InferenceRoute default/chat: "
        "spec.backends[1].pool: names ModelPool 'large'",
        "nothing written",
    )
    assert not out.exists()


def test_render_refuses_a_quota_naming_a_missing_secret(tmp_path: Path) -> None:
    resources = tmp_path / "all.yaml"
    resources.write_text(
        POOLS.replace(", {pool: large, weight: 1}", "")
        + "---\napiVersion: headway.dev/v1alpha1\nkind: TokenQuota\nmetadata: {name: team}\n"
        "spec: {apiKeys: {secretRef: {name: team-keys}}}\n"
    )
    result = headway("-f", str(resources))

    assert_refused(
        result,
        "TokenQuota default/team: spec.apiKeys.secretRef.name: names Secret 'team-keys'",
    )


def test_render_refuses_a_key_listed_for_two_tenants(tmp_path: Path) -> None:
    resources = tmp_path / "all.yaml"
    resources.write_text(
        POOLS.replace(", {pool: large, weight: 1}", "")
        + quota_yaml("alpha", "alpha-keys", mine="sk-alpha", leaked="sk-shared")
        + quota_yaml("beta", "beta-keys", copy="sk-shared")
    )
    result = headway("-f", str(resources))

    assert_refused(
        result,
        "TokenQuota default/alpha: spec.apiKeys.secretRef.name: Secret 'alpha-keys' entry "
        "'leaked' holds an API key that TokenQuota default/beta (tenant 'beta') also lists",
        "TokenQuota default/beta: spec.apiKeys.secretRef.name: Secret 'beta-keys' entry 'copy'",
    )
    assert "sk-shared" not in result.stderr


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("kind: ModelPool\nmetadata: {name: p}\nspec: {models: [m", "not valid YAML"),
        (
            "apiVersion: headway.dev/v1alpha1\nkind: ModelPool\nmetadata: {name: p}\n"
            "spec: {models: [m], scaling: {minReplicas: 0}}\n",
            "ModelPool default/p: spec.scaling.minReplicas: must be at least 1 (got 0)",
        ),
        (
            "apiVersion: headway.dev/v1alpha1\nkind: ModelPol\nmetadata: {name: p}\n",
            "kind 'ModelPol' is not a Headway resource",
        ),
        (
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {k: 'c2stc2VjcmV0!'}\n",
            "Secret default/s: data.k: is not base64-encoded UTF-8 text",
        ),
    ],
)
def test_render_reports_bad_files_by_file_and_field(
    tmp_path: Path, text: str, fragment: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = headway("-f", str(path))

    assert_refused(result, str(path), fragment)
    assert "c2stc2VjcmV0" not in result.stderr


def test_render_reads_stdin_and_refuses_bad_flags(tmp_path: Path) -> None:
    source = POOLS.replace(", {pool: large, weight: 1}", "")
    result = headway("-f", "-", stdin=source)
    assert result.returncode == 0, result.stderr
    assert contract.loads(result.stdout).pool == "small"

    assert_refused(headway("-f", str(tmp_path / "nowhere.yaml")), "nowhere.yaml: cannot be read")
    assert_refused(
        headway("-f", "-", "--redis-url", "redis://:hunter2@127.0.0.1:6379", stdin=source),
        "--redis-url: a password in the URL",
    )
    mistyped = headway("-f", "-", "--redis-url", "http://:hunter2@127.0.0.1:6379", stdin=source)
    assert_refused(mistyped, "--redis-url: expected a redis://")
    assert "hunter2" not in mistyped.stderr
    assert_refused(
        headway("-f", "-", "--key-file", str(tmp_path / "missing"), stdin=source),
        "cannot read hashing key file",
    )
    (tmp_path / "empty.yaml").write_text("# nothing\n")
    assert_refused(headway("-f", str(tmp_path / "empty.yaml")), "no ModelPool found")


def test_render_of_examples_yields_a_document_per_pool(tmp_path: Path) -> None:
    bodies = [
        body
        for path in sorted((REPO / "examples").glob("*.yaml"))
        for body in yaml.safe_load_all(path.read_text())
        if isinstance(body, dict)
    ]
    pools = [b for b in bodies if b.get("kind") == "ModelPool"]
    api_keys = [
        v for b in bodies if b.get("kind") == "Secret" for v in b.get("stringData", {}).values()
    ]
    assert pools and api_keys
    out = tmp_path / "config"
    result = headway("-f", "examples", "-o", str(out))

    assert result.returncode == 0, result.stderr
    expected = {
        f"{body['metadata'].get('namespace', 'default')}.{body['metadata']['name']}.json"
        for body in pools
    }
    assert {p.name for p in out.iterdir()} == expected
    for path in out.iterdir():
        text = path.read_text()
        assert contract.loads(text).tenants
        assert all(api_key.strip() not in text for api_key in api_keys)
