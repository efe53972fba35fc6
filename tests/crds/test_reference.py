"""docs/resources.md carries the field reference hack/crd-reference.py generates."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.crds import crdschema


def _reference_script() -> ModuleType:
    path = crdschema.REPO / "hack" / "crd-reference.py"
    spec = importlib.util.spec_from_file_location("crd_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_reference_matches_the_crds() -> None:
    script = _reference_script()
    current = script.DOC.read_text()
    assert script.updated(current) == current, "run: python3 hack/crd-reference.py"


def test_reference_lists_every_spec_field_and_rule() -> None:
    text = _reference_script().render()
    crds = crdschema.load_crds()
    for crd in crds.values():
        for path, _ in crdschema.walk(crdschema.open_api_schema(crd)):
            scalar_item = path.endswith(("[]", "{}"))
            if path.startswith(("spec.", "status.")) and not scalar_item:
                assert f"`{path}`" in text, path
    for rule in crdschema.cel_rules(crds):
        assert " ".join(rule.message.split()) in text, rule.message
