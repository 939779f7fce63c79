"""Fixtures: a mesh CA and SVIDs, built through the production code in :mod:`meshd.pki`.

- ``mesh_ca``: a :class:`MeshCa` (root + signing CA + trust bundle) for trust domain
  :data:`TRUST_DOMAIN`, created fresh per test.
- ``issue_svid``: ``issue_svid(service, *, datacenter="dc1", ttl=1 h) -> (chain_pem, key_pem)``,
  a leaf for ``spiffe://<TRUST_DOMAIN>/ns/default/dc/<dc>/svc/<service>`` signed by
  ``mesh_ca`` through :func:`meshd.pki.sign_leaf`, followed by the signing CA certificate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization

from meshd import pki
from meshd.identity import SpiffeId
from meshd.trustbundle import BundleRoot, RootState, TrustBundle

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"
IssueSvid = Callable[..., tuple[bytes, bytes]]


@dataclass(frozen=True)
class MeshCa:
    """A root and signing CA, and the bundle that trusts the root."""

    trust_domain: str
    root: pki.CertificateAuthority
    signing: pki.CertificateAuthority
    bundle: TrustBundle

    def issue(
        self,
        service: str,
        *,
        datacenter: str = "dc1",
        now: dt.datetime | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
    ) -> tuple[bytes, bytes]:
        """A fresh key and leaf for *service*: ``(leaf + signing CA PEM, key PEM)``."""
        now = now or dt.datetime.now(dt.UTC)
        identity = SpiffeId(self.trust_domain, datacenter, service)
        key = pki.generate_key()
        leaf = pki.sign_leaf(self.signing, pki.build_csr(key, identity), identity, now=now, ttl=ttl)
        chain = b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (leaf, self.signing.cert, *self.signing.chain)
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return chain, key_pem


def make_mesh_ca(trust_domain: str = TRUST_DOMAIN, now: dt.datetime | None = None) -> MeshCa:
    """Build a root, a signing CA and a one-root bundle through :mod:`meshd.pki`."""
    now = now or dt.datetime.now(dt.UTC)
    root = pki.make_root(trust_domain, now=now, ttl=dt.timedelta(days=3650))
    signing = pki.make_signing_ca(root, now=now, ttl=dt.timedelta(days=365))
    bundle = TrustBundle(trust_domain, (BundleRoot(root.cert, RootState.ACTIVE),))
    return MeshCa(trust_domain, root, signing, bundle)


@pytest.fixture
def mesh_ca() -> MeshCa:
    """A fresh mesh CA for :data:`TRUST_DOMAIN`."""
    return make_mesh_ca()


@pytest.fixture
def issue_svid(mesh_ca: MeshCa) -> IssueSvid:
    """Factory: ``issue_svid("web") -> (cert_chain_pem, key_pem)`` signed by ``mesh_ca``."""
    return mesh_ca.issue
