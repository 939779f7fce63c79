"""``meshctl ca`` against a real Consul agent: init, roots, and a rotation step by step."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives import serialization

from cli.ca import CaCommandError
from cli.main import meshctl
from meshd import cadir, pki
from meshd.identity import SpiffeId
from meshd.peer import verify_peer
from meshd.rotation import RotationError, retire_old_root
from meshd.trustbundle import RootState, TrustBundle, fingerprint
from tests.plugins.consul_agent import ConsulAgentProcess

pytestmark = pytest.mark.consul
Run = Callable[..., Result]
TD = "0a1b2c3d-0000-4000-8000-000000000001.consul"


@pytest.fixture
def run(consul_agent: ConsulAgentProcess, consul_kv_prefix: str) -> Run:
    env = {**consul_agent.env(), "MESHD_KV_PREFIX": consul_kv_prefix}

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(meshctl, ["ca", *args], env=env, catch_exceptions=True)

    return invoke


def roots_json(run: Run) -> dict[str, Any]:
    result = run("roots", "--format", "json")
    assert result.exit_code == 0, result.output
    doc: dict[str, Any] = json.loads(result.output)
    return doc


def kv_bundle(consul_agent: ConsulAgentProcess, prefix: str) -> TrustBundle:
    import urllib.request

    request = urllib.request.Request(
        f"{consul_agent.http_address}/v1/kv/{prefix}ca/bundle?raw",
        headers={"X-Consul-Token": consul_agent.token},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return TrustBundle.from_json(response.read())


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_writes_private_files_and_publishes_only_public(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    ca_dir = tmp_path / "ca"
    result = run("init", "--dir", str(ca_dir), "--trust-domain", TD)
    assert result.exit_code == 0, result.output
    assert "PRIVATE" not in result.output and TD in result.output
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root-ca.key") == mode(ca_dir / "signing-ca.key") == 0o600
    assert mode(ca_dir / "root-ca.pem") == 0o644
    bundle = kv_bundle(consul_agent, consul_kv_prefix)
    assert b"PRIVATE" not in bundle.to_json()
    root = cadir.load(ca_dir, cadir.ROOT)
    assert bundle.trust_domain == TD and bundle.active.cert == root.cert
    assert fingerprint(root.cert) in result.output

    # The signing CA in the directory issues leaves the published bundle accepts.
    signing = cadir.load(ca_dir, cadir.SIGNING)
    assert_issues_trusted_leaves(signing, bundle)
    # ...and the meshd server loads the directory as written.
    from meshd.server.ca import SigningAuthority

    authority = SigningAuthority.from_dir(ca_dir, ttl_s=3600, max_ttl_s=86400)
    assert authority.trust_domain == TD


def assert_issues_trusted_leaves(signing: pki.CertificateAuthority, bundle: TrustBundle) -> None:
    now = dt.datetime.now(dt.UTC)
    identity = SpiffeId(bundle.trust_domain, "dc1", "web")
    leaf = pki.sign_leaf(
        signing,
        pki.build_csr(pki.generate_key(), identity),
        identity,
        now=now,
        ttl=dt.timedelta(hours=1),
    )
    der = [c.public_bytes(serialization.Encoding.DER) for c in (leaf, signing.cert, *signing.chain)]
    peer = verify_peer(
        der,
        bundle,
        role="client",
        trust_domain=bundle.trust_domain,
        expected_service="web",
        now=now,
    )
    assert peer == identity


def test_init_refuses_to_overwrite_without_force(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    ca_dir = tmp_path / "ca"
    assert run("init", "--dir", str(ca_dir), "--trust-domain", TD).exit_code == 0
    key_before = (ca_dir / "root-ca.key").read_bytes()

    again = run("init", "--dir", str(ca_dir), "--trust-domain", TD)
    assert isinstance(again.exception, CaCommandError)
    assert "already holds a CA" in str(again.exception)
    assert (ca_dir / "root-ca.key").read_bytes() == key_before

    other_dir = tmp_path / "other"
    elsewhere = run("init", "--dir", str(other_dir), "--trust-domain", TD)
    assert "already has a trust bundle" in str(elsewhere.exception)
    assert not (other_dir / "root-ca.key").exists()

    forced = run("init", "--dir", str(ca_dir), "--trust-domain", TD, "--force")
    assert forced.exit_code == 0, forced.output
    assert (ca_dir / "root-ca.key").read_bytes() != key_before
    assert mode(ca_dir / "root-ca.key") == 0o600
    assert (
        kv_bundle(consul_agent, consul_kv_prefix).active.cert == cadir.load(ca_dir, "root-ca").cert
    )


def test_init_refuses_a_bad_trust_domain(run: Run, tmp_path: Path) -> None:
    result = run("init", "--dir", str(tmp_path / "ca"), "--trust-domain", "Bad_Domain")
    assert result.exit_code == 2 and "not a lower-case DNS name" in result.output
    assert not (tmp_path / "ca").exists()


def test_roots_shows_each_state(run: Run, tmp_path: Path) -> None:
    assert run("init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD).exit_code == 0
    doc = roots_json(run)
    assert doc["phase"] == "stable"
    assert [r["state"] for r in doc["roots"]] == ["active"]
    table = run("roots")
    assert table.exit_code == 0 and "active" in table.output and TD in table.output


def test_rotation_step_by_step(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    ca_dir = tmp_path / "ca"
    assert run("init", "--dir", str(ca_dir), "--trust-domain", TD).exit_code == 0
    stale = kv_bundle(consul_agent, consul_kv_prefix)  # a peer that never refreshes
    old_signing = cadir.load(ca_dir, cadir.SIGNING)

    steps = [
        "stable -> new-root-published",
        "new-root-published -> cross-signed",
        "cross-signed -> new-root-signing",
    ]
    for step in steps:
        result = run("rotate", "--dir", str(ca_dir))
        assert result.exit_code == 0, result.output
        assert step in result.output
        bundle = kv_bundle(consul_agent, consul_kv_prefix)
        if step.endswith("new-root-published"):
            # Published before anything signs with it: the signing CA is still the old one.
            assert [r.state for r in bundle.roots] == [RootState.ACTIVE, RootState.ROTATING_IN]
            assert cadir.load(ca_dir, cadir.SIGNING).cert == old_signing.cert
        # Old leaves stay trusted by every bundle generation.
        assert_issues_trusted_leaves(old_signing, bundle)

    new_signing = cadir.load(ca_dir, cadir.SIGNING)
    assert new_signing.cert != old_signing.cert
    assert mode(ca_dir / "signing-ca.key") == mode(ca_dir / "root-ca.key") == 0o600
    assert bundle.active.cert == cadir.load(ca_dir, cadir.ROOT).cert
    assert_issues_trusted_leaves(new_signing, bundle)
    assert_issues_trusted_leaves(new_signing, stale)  # via the cross certificate it presents

    early = run("rotate", "--dir", str(ca_dir))
    assert isinstance(early.exception, RotationError)
    assert "still has leaves valid until" in str(early.exception)
    assert [r["state"] for r in roots_json(run)["roots"]] == ["retiring", "active"]

    # The meshd leader retires the old root once its leaves have expired (simulated here by
    # retiring at a later "now"); the next rotate deletes the old hierarchy's keys.
    assert (ca_dir / "previous-root-ca.key").exists()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=26)
    consul_agent.kv_put(
        f"{consul_kv_prefix}ca/bundle", retire_old_root(bundle, now=later).to_json()
    )
    result = run("rotate", "--dir", str(ca_dir))
    assert result.exit_code == 0, result.output
    assert "stable -> new-root-published" in result.output
    assert not (ca_dir / "previous-root-ca.key").exists()
    assert not (ca_dir / "previous-signing-ca.key").exists()


def test_rotate_sets_retire_after_from_the_leaf_ttl_and_the_reload_grace(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    ca_dir = tmp_path / "ca"
    assert run("init", "--dir", str(ca_dir), "--trust-domain", TD).exit_code == 0
    for bad in ("0s", "-1h", "ten", "10", "99999999999h"):  # "10" is fine as --max-leaf-ttl
        result = run("rotate", "--dir", str(ca_dir), "--reload-grace", bad)
        assert result.exit_code == 2, (bad, result.output)
        assert "--reload-grace" in result.output
    assert roots_json(run)["phase"] == "stable"  # nothing happened
    for _ in range(2):
        assert run("rotate", "--dir", str(ca_dir)).exit_code == 0
    # A bare number is hours, as before; durations take a unit.
    result = run("rotate", "--dir", str(ca_dir), "--max-leaf-ttl", "2", "--reload-grace", "30m")
    assert result.exit_code == 0, result.output
    retiring = next(
        r for r in kv_bundle(consul_agent, consul_kv_prefix).roots if r.retire_after is not None
    )
    assert retiring.retire_after is not None
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2, minutes=30)
    assert abs((retiring.retire_after - expected).total_seconds()) < 60


def retire_after(consul_agent: ConsulAgentProcess, prefix: str) -> dt.datetime:
    retiring = next(r for r in kv_bundle(consul_agent, prefix).roots if r.retire_after)
    assert retiring.retire_after is not None
    return retiring.retire_after


def to_switch(run: Run, ca_dir: Path) -> None:
    """init, then the two rotate steps before the switch (which sets retire_after)."""
    assert run("init", "--dir", str(ca_dir), "--trust-domain", TD).exit_code == 0
    for _ in range(2):
        assert run("rotate", "--dir", str(ca_dir)).exit_code == 0
    assert roots_json(run)["phase"] == "cross-signed"


def test_rotate_keeps_the_old_root_as_long_as_the_longest_published_leaf_ttl(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    to_switch(run, tmp_path / "ca")
    # What two meshd servers published at start (meshd.server.duties.publish_leaf_ttl).
    consul_agent.kv_put(f"{consul_kv_prefix}ca/leaf-ttl/s1", b'{"leaf_ttl_s": 259200}')
    consul_agent.kv_put(f"{consul_kv_prefix}ca/leaf-ttl/s2", b'{"leaf_ttl_s": 3600}')
    result = run("rotate", "--dir", str(tmp_path / "ca"), "--reload-grace", "30m")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(hours=72, minutes=30)
    assert abs((retire_after(consul_agent, consul_kv_prefix) - expected).total_seconds()) < 60


def test_rotate_warns_when_told_a_shorter_leaf_ttl_than_a_server_issues(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    to_switch(run, tmp_path / "ca")
    consul_agent.kv_put(f"{consul_kv_prefix}ca/leaf-ttl/s1", b'{"leaf_ttl_s": 259200}')
    result = run("rotate", "--dir", str(tmp_path / "ca"), "--max-leaf-ttl", "1h")
    assert result.exit_code == 0, result.output
    assert "shorter than the leaves meshd server s1 issues (3 days" in result.output
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)  # 1h + the 1h default grace
    assert abs((retire_after(consul_agent, consul_kv_prefix) - expected).total_seconds()) < 60


def test_rotate_without_published_leaf_ttls_assumes_24h_and_says_so(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    to_switch(run, tmp_path / "ca")
    result = run("rotate", "--dir", str(tmp_path / "ca"), "--reload-grace", "1h")
    assert result.exit_code == 0, result.output
    assert "no meshd server has published its leaf lifetime" in result.output
    expected = dt.datetime.now(dt.UTC) + dt.timedelta(hours=25)
    assert abs((retire_after(consul_agent, consul_kv_prefix) - expected).total_seconds()) < 60


def test_rotate_refuses_a_malformed_published_leaf_ttl_and_changes_nothing(
    run: Run, tmp_path: Path, consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    to_switch(run, tmp_path / "ca")
    for bad in (
        b'{"leaf_ttl_s": "72h"}',
        b"not json",
        b'{"leaf_ttl_s": -5}',
        b"[1]",
        b'{"leaf_ttl_s": 1e300}',  # no server issues leaves beyond [ca]'s 720h
        b'{"leaf_ttl_s": NaN}',
    ):
        consul_agent.kv_put(f"{consul_kv_prefix}ca/leaf-ttl/s1", bad)
        result = run("rotate", "--dir", str(tmp_path / "ca"))
        # (meshctl's entry point prints a CaCommandError as one line; see the next test.)
        assert isinstance(result.exception, CaCommandError), (bad, result.output)
        assert f"{consul_kv_prefix}ca/leaf-ttl/s1: expected" in str(result.exception)
        assert roots_json(run)["phase"] == "cross-signed"


def test_rotate_refuses_a_directory_that_does_not_match(run: Run, tmp_path: Path) -> None:
    assert run("init", "--dir", str(tmp_path / "ca"), "--trust-domain", TD).exit_code == 0
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    cadir.save(
        other,
        cadir.ROOT,
        pki.make_root(TD, now=dt.datetime.now(dt.UTC), ttl=dt.timedelta(days=1)),
        overwrite=False,
    )
    result = run("rotate", "--dir", str(other))
    assert "does not hold the bundle's active root" in str(result.exception)


def test_meshctl_reports_a_missing_bundle_on_one_line(
    consul_agent: ConsulAgentProcess, consul_kv_prefix: str
) -> None:
    env = {**os.environ, **consul_agent.env(), "MESHD_KV_PREFIX": consul_kv_prefix}
    proc = subprocess.run(
        [sys.executable, "-c", "from cli.main import main; main()", "ca", "roots"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"meshctl: error: no trust bundle at {consul_kv_prefix}ca/bundle; "
        "run 'meshctl ca init' first"
    )


def test_cadir_keeps_the_chain_a_signing_ca_presents(tmp_path: Path) -> None:
    """cadir.save/load keep the chain a signing CA presents."""
    now = dt.datetime.now(dt.UTC)
    root = pki.make_root(TD, now=now, ttl=dt.timedelta(days=10))
    other = pki.make_root(TD, now=now, ttl=dt.timedelta(days=10))
    cross = pki.cross_sign(root, other, now=now)
    signing = pki.make_signing_ca(other, now=now, ttl=dt.timedelta(days=1))
    with_chain = pki.CertificateAuthority(TD, signing.cert, signing.key, (cross,))
    cadir.save(tmp_path, cadir.SIGNING, with_chain, overwrite=False)
    loaded = cadir.load(tmp_path, cadir.SIGNING)
    assert loaded.chain == (cross,) and loaded.trust_domain == TD
