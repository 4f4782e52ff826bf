"""DKIM signing for the shared domains (dkimpy), and key generation for ``postroom dkim genkey``.

Keys are read once when the config is loaded (:class:`Keyring`), so signing on the mail path does no file I/O.
Signing covers the headers dkimpy picks by default, which is RFC 6376's recommended list as OpenDKIM's
default ``SignHeaders`` is, with From over-signed so nobody can add a second From after us.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim

from postroom.config import Config

DNSFunc = Callable[..., bytes | None]


class DkimError(RuntimeError):
    pass


@dataclass(frozen=True)
class SigningKey:
    domain: str
    selector: str
    private_pem: bytes


class Keyring:
    def __init__(self, keys: dict[str, SigningKey]) -> None:
        self._keys = keys

    @classmethod
    def from_config(cls, config: Config) -> Keyring:
        keys: dict[str, SigningKey] = {}
        for domain, entry in config.dkim.items():
            try:
                pem = Path(entry.key_file).read_bytes()
            except OSError as exc:
                raise DkimError(f"dkim.{domain}.key_file {entry.key_file}: {exc.strerror}") from None
            try:
                dkim.crypto.parse_pem_private_key(pem)
            except dkim.UnparsableKeyError as exc:
                raise DkimError(f"dkim.{domain}.key_file {entry.key_file}: not an RSA private key ({exc})") from None
            keys[domain] = SigningKey(domain, entry.selector, pem)
        return cls(keys)

    def for_address(self, address: str) -> SigningKey | None:
        return self._keys.get(address.rpartition("@")[2].lower())

    def __bool__(self) -> bool:
        return bool(self._keys)


def sign(key: SigningKey, headers: Sequence[tuple[str, str]], body: bytes) -> str:
    """The value of a DKIM-Signature header for the message as it will leave (relaxed/relaxed)."""
    head = b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in headers)
    message = head + b"\r\n" + body
    try:
        signed = dkim.sign(
            message,
            key.selector.encode(),
            key.domain.encode(),
            key.private_pem,
            canonicalize=(b"relaxed", b"relaxed"),
        )
    except dkim.DKIMException as exc:
        raise DkimError(str(exc)) from exc
    name, _, value = signed.decode("ascii").partition(":")
    assert name == "DKIM-Signature"
    # Unfold: the milter protocol and Postfix take one logical value; Postfix folds long headers itself.
    return " ".join(value.split())


def public_txt(private_pem: bytes) -> str:
    """The DNS TXT record value (v=DKIM1; k=rsa; p=...) for a private key."""
    der = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=private_pem, capture_output=True, check=True
    ).stdout
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def generate(bits: int = 2048) -> bytes:
    """A new RSA key in the traditional PEM form dkimpy reads."""
    return subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], capture_output=True, check=True).stdout


def dns_answer(records: dict[str, str]) -> DNSFunc:
    """A dnsfunc for dkim.verify that answers from a dict {"sel._domainkey.domain.": "v=DKIM1; ..."}."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode())
        return value.encode() if value is not None else None

    return lookup
