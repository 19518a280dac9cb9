"""The NBD gateway's PSK file (`sheep run --nbd-tls-psk`), in psktool's format: what it
reads, what it refuses (in one line, never showing a key), and its re-reading."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from sheep.security.pskfile import PskFileError, PskKeys, parse_psk, read_psk_file

KEY = "99be19f40b75f244bf203b6175801dd33950c714ca8d158cc30ede7b26e07a6c"  # psktool's 32 B
OTHER = "c151fc1c652985892cbb69f970921f2640386f6b2c423f6cd94227ba55d96a8f"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    tmp.replace(path)
    return path


def test_psktool_lines_give_each_identity_its_key() -> None:
    # as `psktool -u alice`, `psktool -u 'b:ob'` and `psktool -u 'wé ird'` write them
    text = f"alice:{KEY}\n#623a6f62:{OTHER}\nwé ird:{KEY.upper()}\n"
    assert parse_psk(text) == {b"alice": bytes.fromhex(KEY), b"b:ob": bytes.fromhex(OTHER),
                               "wé ird".encode(): bytes.fromhex(KEY)}


def test_blank_lines_and_crlf_are_skipped() -> None:
    assert parse_psk(f"\r\nalice:{KEY}\r\n\n") == {b"alice": bytes.fromhex(KEY)}


def test_an_empty_file_has_no_identities() -> None:
    assert parse_psk("") == {}


def test_a_key_of_128_bits_is_taken() -> None:
    assert parse_psk(f"a:{'ab' * 16}") == {b"a": bytes([0xAB]) * 16}


@pytest.mark.parametrize(("text", "why"), [
    (f"alice:{'ab' * 15}", "line 1: key is 120 bits, under the 128 required"),
    (f"alice:{'ab' * 513}", "line 1: key is 513 bytes, over the 512 OpenSSL takes"),
    ("alice:not-hex-at-all", "line 1: key is not hex"),
    (f"alice{KEY}", "line 1: no ':' between identity and key"),
    (f":{KEY}", "line 1: empty identity"),
    (f"#zz:{KEY}", "line 1: identity after '#' is not hex"),
    (f"#ff:{KEY}", "line 1: identity is not UTF-8 text"),
    (f"a\x07b:{KEY}", "line 1: identity 'a\\x07b' holds a control or invisible"),
    (f"a\u200bb:{KEY}", "line 1: identity 'a\\u200bb' holds a control or invisible"),
    (f"{'x' * 257}:{KEY}", "line 1: identity is 257 bytes, over the 256 TLS takes"),
    (f"alice:{KEY}\n\nalice:{OTHER}", "line 3: identity 'alice' again (first on line 1)"),
])
def test_a_bad_line_is_refused_saying_which_and_why(text: str, why: str) -> None:
    with pytest.raises(PskFileError) as err:
        parse_psk(text)
    assert str(err.value).startswith(why)
    assert KEY not in str(err.value) and OTHER not in str(err.value)


def test_a_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.psk", f"alice:{KEY}\n", mode=0o640)
    with pytest.raises(PskFileError, match=r"keys.psk is readable by others \(mode 640\): "
                                           r"chmod 600 it"):
        read_psk_file(path)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo", 0o600)
    with pytest.raises(PskFileError, match="fifo is not a regular file"):
        read_psk_file(tmp_path / "fifo")


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PskFileError, match=r"cannot read PSK file .*: No such file"):
        read_psk_file(tmp_path / "none.psk")


def test_a_bad_file_names_itself_and_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.psk", f"alice:{KEY}\nbob:12\n")
    with pytest.raises(PskFileError, match=r"PSK file .*keys.psk, line 2: key is 8 bits"):
        read_psk_file(path)


def test_keys_follow_the_file_when_it_changes(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.psk", f"alice:{KEY}\n")
    keys = PskKeys(path)
    assert keys.key(b"alice") == bytes.fromhex(KEY) and keys.key(b"bob") is None
    write(path, f"bob:{OTHER}\n")
    assert keys.key(b"bob") == bytes.fromhex(OTHER) and keys.key(b"alice") is None


def test_a_file_edited_in_place_is_read_again(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.psk", f"alice:{KEY}\n")
    keys = PskKeys(path)
    with open(path, "a") as f:
        f.write(f"bob:{OTHER}\n")
    assert keys.key(b"bob") == bytes.fromhex(OTHER)


def test_a_file_spoilt_after_start_admits_nobody_and_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "keys.psk", f"alice:{KEY}\n")
    keys = PskKeys(path)
    write(path, f"alice:{KEY}\nbob:oops\n")
    with caplog.at_level(logging.ERROR):
        assert keys.key(b"alice") is None
    assert "line 2: key is not hex; no client is admitted by PSK until it is fixed" \
        in caplog.text
    write(path, f"alice:{KEY}\n")
    assert keys.key(b"alice") == bytes.fromhex(KEY)


def test_a_file_opened_to_others_after_start_admits_nobody(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.psk", f"alice:{KEY}\n")
    keys = PskKeys(path)
    os.chmod(path, 0o644)
    assert keys.key(b"alice") is None


def test_a_bad_file_at_start_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "keys.psk", "alice:00\n")
    with pytest.raises(PskFileError, match="line 1: key is 8 bits"):
        PskKeys(path)
