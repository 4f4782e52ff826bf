"""DKIM signing for the shared domains (RFC 6376, rsa-sha256, relaxed/relaxed), and key generation for
``postroom dkim genkey``.

Where the time goes decides the shape: the RSA signature runs in OpenSSL through ``cryptography`` (dkimpy's
pure-Python RSA costs ~25x more), on a key parsed once when the config is loaded (:class:`Keyring`; parsing
costs more than signing), and the body hash is computed over chunks as they come (:class:`BodyHash`), so a
25 MB reply is never copied whole.  dkimpy stays for what it does well: verification (the demo, the tests)
and nothing on the mail path.

The headers signed are those dkimpy and OpenDKIM pick by default: RFC 6376's recommended list, in message order,
with From over-signed so nobody can add a second From after us.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from postroom.config import Config

DNSFunc = Callable[..., bytes | None]

# RFC 6376 5.4.1's recommended header fields (the same list as dkimpy's DKIM.SHOULD and OpenDKIM's default).
SIGNED_HEADERS = frozenset(
    b"from sender reply-to subject date message-id to cc mime-version content-type content-transfer-encoding "
    b"content-id content-description resent-date resent-from resent-sender resent-to resent-cc resent-message-id "
    b"in-reply-to references list-id list-help list-unsubscribe list-subscribe list-post list-owner "
    b"list-archive".split()
)
# Signed once more than they occur: a verifier then fails a mail to which someone added another one.
OVERSIGNED = (b"from",)
MIN_BITS = 1024  # what dkimpy and most receivers refuse below


class DkimError(RuntimeError):
    """A signing failure, or (from :meth:`Keyring.from_config`) every unusable key as (config key, message)."""

    def __init__(self, message: str, problems: list[tuple[tuple[str, ...], str]] | None = None) -> None:
        self.problems = problems or []
        super().__init__(message)


class SigningKey:
    """A domain's selector and private key, parsed once.  Pickles as its PEM (worker processes parse it again)."""

    __slots__ = ("_key", "domain", "private_pem", "selector")

    def __init__(self, domain: str, selector: str, private_pem: bytes) -> None:
        self.domain = domain
        self.selector = selector
        self.private_pem = private_pem
        try:
            key = serialization.load_pem_private_key(private_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise DkimError(f"not a PEM private key without a passphrase ({exc})") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimError(f"not an RSA key ({type(key).__name__}); rsa-sha256 needs one")
        if key.key_size < MIN_BITS:
            raise DkimError(f"an RSA key of {key.key_size} bits; receivers refuse fewer than {MIN_BITS}")
        self._key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (SigningKey, (self.domain, self.selector, self.private_pem))

    def __repr__(self) -> str:
        return f"SigningKey({self.domain!r}, {self.selector!r})"

    def signature(self, data: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 over ``data``, as RFC 6376 3.3.1 asks."""
        return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())


class Keyring:
    def __init__(self, keys: dict[str, SigningKey]) -> None:
        self._keys = keys

    @classmethod
    def from_config(cls, config: Config) -> Keyring:
        keys: dict[str, SigningKey] = {}
        problems: list[tuple[tuple[str, ...], str]] = []
        for domain, entry in config.dkim.items():
            where = ("dkim", domain, "key_file")
            try:
                pem = Path(entry.key_file).read_bytes()
                keys[domain] = SigningKey(domain, entry.selector, pem)
            except OSError as exc:
                problems.append((where, f"{entry.key_file}: {exc.strerror}"))
            except DkimError as exc:
                problems.append((where, f"{entry.key_file}: {exc}"))
        if problems:
            raise DkimError("; ".join(f"{'.'.join(k)}: {m}" for k, m in problems), problems)
        return cls(keys)

    def for_address(self, address: str) -> SigningKey | None:
        return self._keys.get(address.rpartition("@")[2].lower())

    def __bool__(self) -> bool:
        return bool(self._keys)


_LINE_END = re.compile(b"\r?\n")
_BLOCK = 1 << 16  # pending empty lines are hashed this many at a time


def _text_end(data: bytes) -> int:
    """Where the whitespace and line ends at the end of ``data`` start; a bare CR among them is text."""
    end = len(data.rstrip(b" \r\n"))
    i = len(data)
    while (i := data.rfind(b"\r", end, i)) >= 0:
        if not data.startswith(b"\n", i + 1):
            return i + 1
    return end


class BodyHash:
    """SHA-256 of the relaxed canonical body (RFC 6376 3.4.4), fed in chunks of any size, split anywhere.

    The hash is that of the body as Postfix sends it on: a line ends with CRLF or a bare LF (both leave as CRLF),
    a last line without a line end gets one, and a bare CR is an ordinary character.
    Each chunk is canonicalised with a few C-speed passes over it; what cannot be decided yet (the whitespace
    and line ends at its end: trailing whitespace is dropped, and so are empty lines at the end of the body) is
    kept as a count, never as a copy, so memory stays a chunk's size whatever the body is.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._newlines = 0  # line ends not yet hashed: more text must follow, or they are empty lines at the end
        self._space = False  # whitespace after the last text or line end, not yet hashed
        self._cr = False  # the last chunk ended in CR: the next chunk may start with its LF
        self._text = False  # any text hashed: the canonical body is not empty and ends with CRLF

    def update(self, chunk: bytes) -> None:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        if chunk.count(b"\n") != chunk.count(b"\r\n"):
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # bare LFs, as Postfix sends them on
        if b"\t" in chunk:
            chunk = chunk.replace(b"\t", b" ")
        end = _text_end(chunk)
        if end:
            self._emit(chunk[:end] if end < len(chunk) else chunk)
        self._pend(chunk[end:])

    def _emit(self, text: bytes) -> None:
        """Hash what is pending and ``text``, which ends in text (neither whitespace nor a line end)."""
        while self._newlines:
            n = min(self._newlines, _BLOCK)
            self._hash.update(b"\r\n" * n)
            self._newlines -= n
        if self._space:
            text = b" " + text
            self._space = False
        # Runs of n spaces take log2(n) passes; a regular expression is several times slower on mail text.
        while b"  " in text:
            text = text.replace(b"  ", b" ")
        if b" \r\n" in text:
            text = text.replace(b" \r\n", b"\r\n")
        self._hash.update(text)
        self._text = True

    def _pend(self, tail: bytes) -> None:
        """Keep spaces and line ends (only) as counts until text follows them or the body ends."""
        if not tail:
            return
        lines = tail.count(b"\r\n")
        if lines:
            self._newlines += lines
            self._space = not tail.endswith(b"\r\n")  # whitespace before a line end is dropped
        else:
            self._space = True

    def digest(self) -> bytes:
        """The hash of the whole body: call once, after the last chunk."""
        if self._cr:
            self._cr = False
            self._emit(b"\r")  # a CR at the very end is text, and the body gets its final CRLF
        if self._text:
            self._hash.update(b"\r\n")
        return self._hash.digest()


def body_hash(body: bytes | Iterable[bytes]) -> bytes:
    """The bh= value (base64) for a body given whole or as chunks."""
    hasher = BodyHash()
    for chunk in [body] if isinstance(body, bytes) else body:
        hasher.update(chunk)
    return base64.b64encode(hasher.digest())


def _relaxed_header(name: str, value: str) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, whitespace runs as one space, none around the value."""
    raw = _LINE_END.sub(b"", value.encode("utf-8", "surrogateescape")).replace(b"\t", b" ")
    while b"  " in raw:
        raw = raw.replace(b"  ", b" ")
    return name.lower().rstrip().encode("utf-8", "surrogateescape") + b":" + raw.strip() + b"\r\n"


def _select(headers: Sequence[tuple[str, str]]) -> tuple[list[bytes], list[bytes]]:
    """The h= names and the canonical header lines they sign, picked from the bottom up (RFC 6376 5.4.2)."""
    names = [n.lower().encode("utf-8", "surrogateescape") for n, _ in headers]
    chosen = [n for n in names if n in SIGNED_HEADERS]
    chosen += [n for n in chosen if n in OVERSIGNED]
    lines: list[bytes] = []
    below: dict[bytes, int] = {}
    for name in chosen:
        i = below.get(name, len(headers))
        while i > 0:
            i -= 1
            if names[i] == name:
                lines.append(_relaxed_header(*headers[i]))
                break
        below[name] = i
    return chosen, lines


def sign(
    key: SigningKey, headers: Sequence[tuple[str, str]], body: bytes | Iterable[bytes], now: float | None = None
) -> str:
    """The value of a DKIM-Signature header (relaxed/relaxed) for the message as it will leave, on one line:
    the milter protocol and Postfix take one logical value, and Postfix folds long headers itself."""
    chosen, lines = _select(headers)
    if b"from" not in chosen:
        raise DkimError("the message has no From header, which DKIM must sign")
    stamp = int(time.time() if now is None else now)
    domain = key.domain
    value = (
        f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={domain}; i=@{domain}; q=dns/txt; s={key.selector}; t={stamp}; "
        f"h={b' : '.join(chosen).decode('ascii')}; bh={body_hash(body).decode()}; b="
    )
    # The signature covers the signed headers and this header itself with an empty b= and no final CRLF.
    signed = b"".join(lines) + b"dkim-signature:" + value.encode("utf-8", "surrogateescape")
    return value + base64.b64encode(key.signature(signed)).decode()


def public_txt(private_pem: bytes) -> str:
    """The DNS TXT record value (v=DKIM1; k=rsa; p=...) for a private key."""
    der = subprocess.run(
        ["openssl", "rsa", "-pubout", "-outform", "DER"], input=private_pem, capture_output=True, check=True
    ).stdout
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


def txt_strings(value: str, size: int = 255) -> list[str]:
    """A TXT value cut into the character-strings DNS can hold (255 bytes each); resolvers join them again."""
    data = value.encode("ascii")
    return [data[i : i + size].decode("ascii") for i in range(0, len(data), size)] or [""]


def zone_line(domain: str, selector: str, value: str) -> str:
    """The record as a zone-file line, in quoted strings of at most 255 bytes (one string would not load)."""
    quoted = " ".join(f'"{part}"' for part in txt_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def generate(bits: int = 2048) -> bytes:
    """A new RSA key in the traditional PEM form dkimpy reads."""
    return subprocess.run(["openssl", "genrsa", "-traditional", str(bits)], capture_output=True, check=True).stdout


def dns_answer(records: dict[str, str]) -> DNSFunc:
    """A dnsfunc for dkim.verify that answers from a dict {"sel._domainkey.domain.": "v=DKIM1; ..."}."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        value = records.get(name.decode())
        return value.encode() if value is not None else None

    return lookup
