"""Tests for smearnet.pseudonyms: keyed, secret, generated once, refused when missing in CI."""

from __future__ import annotations

import hashlib
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from smearnet.errors import SmearnetError
from smearnet.pseudonyms import KEY_ENV, KEY_FILE, id_key, key_fingerprint, pseudonym


@pytest.fixture
def no_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_pseudonym_is_an_hmac_under_the_key_not_a_plain_or_public_salted_hash() -> None:
    key = b"k" * 32
    value = pseudonym("P0001", key)
    assert value.startswith("pt-") and len(value) == 3 + 16
    assert pseudonym("P0001", key) == value != pseudonym("P0002", key)
    assert pseudonym("P0001", b"another key") != value
    plain = hashlib.sha256(b"P0001").hexdigest()
    public_salt = hashlib.sha256(b"smearnet-default-salt:P0001").hexdigest()
    assert value[3:] not in (plain[:16], public_salt[:16])


def test_a_key_file_is_generated_once_git_ignored_and_the_user_is_told(no_key: Path, capfd) -> None:
    first = id_key(no_key)
    message = capfd.readouterr().err
    assert str((no_key / KEY_FILE).resolve()) in message and "Keep it" in message and KEY_ENV in message
    assert (no_key / KEY_FILE).stat().st_mode & 0o077 == 0, "the key file must be private to its owner"
    assert (no_key / KEY_FILE.parent / ".gitignore").read_text().strip() == "*"
    # A new process reads the same key and says nothing.
    code = "from smearnet.pseudonyms import id_key; import sys; sys.stdout.write(id_key().decode())"
    again = subprocess.run([sys.executable, "-c", code], cwd=no_key, capture_output=True, text=True, check=True)
    assert again.stdout.encode() == first and again.stderr == ""


def _generate(folder: str, queue) -> None:
    from smearnet.pseudonyms import id_key

    queue.put(id_key(Path(folder)))


def test_two_processes_generating_at_once_end_with_one_key(no_key: Path) -> None:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_generate, args=(str(no_key), queue)) for _ in range(2)]
    for worker in workers:
        worker.start()
    keys = {queue.get(timeout=60) for _ in workers}
    for worker in workers:
        worker.join(timeout=60)
    assert keys == {(no_key / KEY_FILE).read_text().strip().encode()}


def test_the_environment_key_wins_and_an_empty_one_is_refused(no_key: Path, monkeypatch) -> None:
    monkeypatch.setenv(KEY_ENV, "team secret")
    assert id_key(no_key) == b"team secret" and not (no_key / KEY_FILE).exists()
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(SmearnetError, match=f"{KEY_ENV} is set but empty"):
        id_key(no_key)


def test_in_ci_a_missing_key_is_an_error_before_any_work(no_key: Path, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(SmearnetError, match="No key for patient pseudonyms in CI") as error:
        id_key(no_key)
    assert KEY_ENV in str(error.value) and not (no_key / KEY_FILE).exists()


def test_the_fingerprint_names_the_key_without_revealing_it() -> None:
    assert key_fingerprint(b"a") == key_fingerprint(b"a") != key_fingerprint(b"b")
    assert key_fingerprint(b"a").startswith("key-")
