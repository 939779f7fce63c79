"""The CA directory on a meshd server host: where private CA material lives.

Layout (the directory is created 0700; every ``*.key`` is written 0600 atomically)::

    root-ca.pem / root-ca.key              the active root
    signing-ca.pem / signing-ca.key        the signing CA (cert, then any chain) meshd uses
    next-root-ca.pem / next-root-ca.key    the rotating-in root, during a rotation
    previous-root-ca.pem / .key            the retiring root, after the switch

Nothing here is published: the public trust bundle lives in Consul KV.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshd.keyfile import KeyFileError, read_secret, write_public, write_secret
from meshd.pki import CertificateAuthority, PkiError, load_ca, trust_domain_of

ROOT = "root-ca"
SIGNING = "signing-ca"
NEXT_ROOT = "next-root-ca"
PREVIOUS_ROOT = "previous-root-ca"


class CaDirError(KeyFileError):
    """The CA directory or one of its files is missing, unsafe or inconsistent."""


def ensure_dir(directory: Path) -> None:
    """Create *directory* 0700 if missing; refuse one that others may write to.

    Raises:
        CaDirError: not a directory, or group/other-writable.
    """
    try:
        directory.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        pass
    except OSError as exc:
        raise CaDirError(f"cannot create CA directory {directory}: {exc.strerror}") from None
    info = os.stat(directory, follow_symlinks=False)
    if not stat.S_ISDIR(info.st_mode):
        raise CaDirError(f"CA directory {directory} is not a directory")
    if stat.S_IMODE(info.st_mode) & 0o022:
        raise CaDirError(f"CA directory {directory} is writable by group or others")


def exists(directory: Path, name: str) -> bool:
    """Whether the certificate or key of *name* is present in *directory*."""
    return (directory / f"{name}.pem").exists() or (directory / f"{name}.key").exists()


def save(directory: Path, name: str, ca: CertificateAuthority, *, overwrite: bool) -> None:
    """Write *ca*'s key (0600, first) and certificate chain (0644) as ``<name>.key/.pem``.

    Raises:
        KeyFileError: a file exists and *overwrite* is false, or writing failed.
    """
    pem = serialization.Encoding.PEM
    write_secret(directory / f"{name}.key", ca.key_pem(), overwrite=overwrite)
    chain = b"".join(c.public_bytes(pem) for c in (ca.cert, *ca.chain))
    write_public(directory / f"{name}.pem", chain, overwrite=overwrite)


def load(directory: Path, name: str) -> CertificateAuthority:
    """Load ``<name>.pem`` and ``<name>.key``; the trust domain comes from the certificate.

    Raises:
        CaDirError: missing or unreadable files, an unsafe key file, or a bad CA.
    """
    try:
        cert_pem = (directory / f"{name}.pem").read_bytes()
        key_pem = read_secret(directory / f"{name}.key")
        trust_domain = trust_domain_of(x509.load_pem_x509_certificates(cert_pem)[0])
        return load_ca(trust_domain, cert_pem, key_pem)
    except OSError as exc:
        raise CaDirError(f"cannot read {directory / name}.pem: {exc.strerror}") from None
    except ValueError:
        raise CaDirError(f"{directory / name}.pem is not a PEM certificate") from None
    except (KeyFileError, PkiError) as exc:
        raise CaDirError(f"cannot load {name} from {directory}: {exc}") from None


def rename(directory: Path, old: str, new: str) -> None:
    """Move ``<old>.key/.pem`` to ``<new>.key/.pem`` (each rename atomic, key first)."""
    for suffix in (".key", ".pem"):
        os.replace(directory / f"{old}{suffix}", directory / f"{new}{suffix}")
