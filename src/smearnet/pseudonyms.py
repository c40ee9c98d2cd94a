"""Patient pseudonyms: HMAC-SHA256 under a secret key, so nobody without the key can tell who was in a cohort.

A pseudonym is ``pt-`` plus the first 16 hex digits of HMAC-SHA256(key, patient id).  Record numbers and
other guessable ids cannot be tested against it without the key (a plain or publicly salted hash could).

Where the key comes from, in order:

1. ``SMEARNET_ID_SALT`` in the environment (a CI secret, or a key shared by a team).  Set but empty is an
   error, never an empty key.
2. The project's key file ``.smearnet/id_key`` (git-ignored), generated once on first use with a message
   saying where it is and to keep it.  Outside CI this makes a fresh clone's ``dvc exp run`` work with no
   set-up.  In CI (``CI=true``) a missing key is an error before any work: a key generated on a CI runner
   would be lost with the runner, and the models it made could never be compared with the next ones.

Models record the key's fingerprint (``key_fingerprint``), never the key; the promotion gate refuses to
compare models made under different keys, whose training-patient pseudonyms could not match.  Only names
depend on the key: the split, smear composition, folds and seeds are computed from the data's own order.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path

from smearnet.errors import SmearnetError

KEY_ENV = "SMEARNET_ID_SALT"
KEY_FILE = Path(".smearnet") / "id_key"
PREFIX = "pt-"
_HEX_DIGITS = 16
_cache: dict[tuple[str, str | None], bytes] = {}


def id_key(project: Path | None = None) -> bytes:
    """The secret key for pseudonyms (see the module docstring for where it comes from).

    Raises SmearnetError, naming the fix, when ``SMEARNET_ID_SALT`` is set but empty, or in CI when no key is
    configured.  Call it at the start of a stage that writes pseudonyms, so a missing key stops it before work.
    """
    project = Path(project) if project is not None else Path.cwd()
    env = os.environ.get(KEY_ENV)
    cache_key = (str(project.resolve()), env)
    if cache_key in _cache:
        return _cache[cache_key]
    if env is not None:
        if not env.strip():
            raise SmearnetError(f"{KEY_ENV} is set but empty, so patient pseudonyms would have no secret key.",
                                f"set {KEY_ENV} to a long random secret (e.g. `python -c 'import secrets; "
                                f"print(secrets.token_hex(32))'`), or unset it to use the project's key file "
                                f"{KEY_FILE}.")
        key = env.encode()
    else:
        key = _key_from_file(project / KEY_FILE)
    _cache[cache_key] = key
    return key


def pseudonym(patient_id: object, key: bytes | None = None) -> str:
    """The pseudonym of one patient (or smear) id: ``pt-`` + 16 hex digits of HMAC-SHA256 under the key."""
    key = id_key() if key is None else key
    digest = hmac.new(key, str(patient_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return PREFIX + digest[:_HEX_DIGITS]


def key_fingerprint(key: bytes | None = None) -> str:
    """A public name for the key (it reveals nothing about the key): equal keys, equal fingerprints."""
    key = id_key() if key is None else key
    return "key-" + hmac.new(key, b"smearnet key fingerprint", hashlib.sha256).hexdigest()[:12]


def _key_from_file(path: Path) -> bytes:
    if path.is_file():
        key = path.read_text(encoding="utf-8").strip().encode()
        if not key:
            raise SmearnetError(f"The pseudonym key file {path} is empty.",
                                "restore it from your backup, or delete it to generate a new key (models made "
                                "with the old key can then no longer be compared by the gate).")
        return key
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        raise SmearnetError(f"No key for patient pseudonyms in CI ({KEY_ENV} is not set).",
                            f"add a secret {KEY_ENV} to the CI environment (the same value every run, e.g. "
                            f"`python -c 'import secrets; print(secrets.token_hex(32))'`); a key generated "
                            f"on a CI runner would be lost with it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / ".gitignore").write_text("*\n")
    key = secrets.token_hex(32)
    # Written whole to a private temporary file, then linked into place: a process racing this one either
    # finds no key file or the whole key, and the loser of the race uses the winner's key.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(key + "\n")
    try:
        os.link(temporary, path)
    except FileExistsError:
        return _key_from_file(path)
    finally:
        temporary.unlink()
    print(f"smearnet: generated the secret key for patient pseudonyms in {path.resolve()} (git-ignored). "
          f"Keep it (back it up with your data): models made with another key cannot be compared by the "
          f"promotion gate. To use it in CI, set {KEY_ENV} to its contents.", file=sys.stderr)
    return key.encode()
