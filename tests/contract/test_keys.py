import headway_contract as contract
import pytest


def test_hashing_keys_parse_from_text_as_from_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = "# rotated on 2026-12-01\nk2: new-secret\n\nk1:old-secret\n"
    path = tmp_path / "keys"
    path.write_text(text)

    keys = contract.parse_hashing_keys(text)

    assert keys == contract.load_hashing_keys(path)
    assert keys.keys == (("k2", b"new-secret"), ("k1", b"old-secret"))
    assert keys.current == ("k2", b"new-secret")
    assert contract.parse_hashing_keys("only-secret\n").keys == (("k1", b"only-secret"),)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("k1:s3cr3t-one\nno-colon-s3cr3t\n", "line 2 is not '<id>:<secret>'"),
        ("# nothing\n", "holds no key"),
        ("k1:s3cr3t-one\nk1:s3cr3t-two\n", "a key id appears twice"),
    ],
)
def test_bad_hashing_keys_name_the_source_and_never_the_secret(text: str, fragment: str) -> None:
    with pytest.raises(contract.KeyFileError) as info:
        contract.parse_hashing_keys(text, "Secret ns/keys")
    assert str(info.value).startswith("Secret ns/keys: ")
    assert fragment in str(info.value)
    assert "s3cr3t" not in str(info.value)
