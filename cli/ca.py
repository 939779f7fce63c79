"""``meshctl ca``: create the mesh CA, show the trust bundle, rotate the root.

Private CA material stays in the CA directory (``--dir``) on the meshd server host; only
the public trust bundle goes to Consul KV (``<prefix>ca/bundle``), always written with
check-and-set so two operators can never overwrite each other. Nothing secret is printed.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import click
import trio
from cryptography import x509

from cli.intention import kv_prefix_param
from meshd import cadir, pki, rotation
from meshd.config import parse_duration
from meshd.config.server import MAX_LEAF_TTL
from meshd.consul import ConsulSettings, open_consul
from meshd.errors import MeshdError
from meshd.identity import IdentityError, check_trust_domain
from meshd.trustbundle import BundleRoot, RootState, TrustBundle, bundle_key, fingerprint

ROOT_TTL = dt.timedelta(days=3650)
SIGNING_TTL = dt.timedelta(days=365)
RELOAD_GRACE_DEFAULT = "1h"  # for meshd servers to load the new signing CA
NEXT_SIGNING = "next-signing-ca"
PREVIOUS_SIGNING = "previous-signing-ca"


DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
MAX_DURATION = dt.timedelta(days=3650)  # for --max-leaf-ttl and --reload-grace


class CaCommandError(MeshdError):
    """A ``meshctl ca`` command cannot proceed."""


kv_prefix_option = click.option(
    "--kv-prefix",
    default="meshd/",
    show_default=True,
    envvar="MESHD_KV_PREFIX",
    callback=kv_prefix_param,
    help="Consul KV prefix of the mesh's documents.",
)
dir_option = click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="CA directory on this meshd server host (created 0700).",
)


@click.group("ca")
def ca() -> None:
    """Manage the mesh certificate authority and its trust bundle."""


@ca.command("init")
@dir_option
@click.option("--trust-domain", help="Trust domain (default: a new <uuid>.consul).")
@click.option("--force", is_flag=True, help="Replace an existing CA and trust bundle.")
@kv_prefix_option
def init(directory: Path, trust_domain: str | None, force: bool, kv_prefix: str) -> None:
    """Create the root and signing CAs in DIR and publish the trust bundle."""
    td = trust_domain or f"{uuid.uuid4()}.consul"
    try:
        check_trust_domain(td)
    except IdentityError as exc:
        raise click.BadParameter(str(exc), param_hint="--trust-domain") from None
    summary = trio.run(_init, directory, td, force, bundle_key(kv_prefix))
    _echo_summary(summary)


async def _init(directory: Path, td: str, force: bool, key: str) -> dict[str, str]:
    cadir.ensure_dir(directory)
    if not force and (
        cadir.exists(directory, cadir.ROOT) or cadir.exists(directory, cadir.SIGNING)
    ):
        raise CaCommandError(f"{directory} already holds a CA; use --force to replace it")
    async with open_consul(ConsulSettings.from_env()) as consul:
        _, entry = await consul.kv_get(key)
        if entry is not None and not force:
            raise CaCommandError(f"Consul already has a trust bundle at {key}; use --force")
        now = dt.datetime.now(dt.UTC)
        root = pki.make_root(td, now=now, ttl=ROOT_TTL)
        signing = pki.make_signing_ca(root, now=now, ttl=SIGNING_TTL)
        cadir.save(directory, cadir.ROOT, root, overwrite=force)
        cadir.save(directory, cadir.SIGNING, signing, overwrite=force)
        bundle = TrustBundle(td, (BundleRoot(root.cert, RootState.ACTIVE),), (signing.cert,))
        cas = 0 if entry is None else entry.modify_index
        if not await consul.kv_put(key, bundle.to_json(), cas=cas):
            raise CaCommandError(
                f"the trust bundle at {key} changed while we wrote it; CA files are in "
                f"{directory} but nothing was published: rerun with --force"
            )
    return {
        "trust_domain": td,
        "root": fingerprint(root.cert),
        "root_not_after": root.cert.not_valid_after_utc.isoformat(),
        "signing_not_after": signing.cert.not_valid_after_utc.isoformat(),
        "bundle": key,
        "dir": str(directory),
    }


def _echo_summary(summary: dict[str, str]) -> None:
    for name, value in summary.items():
        click.echo(f"{name + ':':<20}{value}")


@ca.command("roots")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@kv_prefix_option
def roots(fmt: str, kv_prefix: str) -> None:
    """Show the trust bundle's roots and the state of each."""
    key = bundle_key(kv_prefix)
    bundle, _ = trio.run(_read_bundle, key)
    doc = _describe(bundle)
    if fmt == "json":
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"trust domain: {doc['trust_domain']}   rotation phase: {doc['phase']}")
    click.echo(f"{'ID':<18}{'STATE':<13}{'NOT AFTER':<27}{'RETIRE AFTER':<27}SUBJECT")
    for root in doc["roots"]:
        click.echo(
            f"{root['id'][:16]:<18}{root['state']:<13}{root['not_after']:<27}"
            f"{root['retire_after'] or '-':<27}{root['subject']}"
        )


async def _read_bundle(key: str) -> tuple[TrustBundle, int]:
    async with open_consul(ConsulSettings.from_env()) as consul:
        _, entry = await consul.kv_get(key)
    if entry is None:
        raise CaCommandError(f"no trust bundle at {key}; run 'meshctl ca init' first")
    return TrustBundle.from_json(entry.value), entry.modify_index


def _describe(bundle: TrustBundle) -> dict[str, Any]:
    return {
        "trust_domain": bundle.trust_domain,
        "phase": rotation.phase_of(bundle).value,
        "roots": [
            {
                "id": r.id,
                "state": r.state.value,
                "subject": r.cert.subject.rfc4514_string(),
                "not_before": r.cert.not_valid_before_utc.isoformat(),
                "not_after": r.cert.not_valid_after_utc.isoformat(),
                "retire_after": None if r.retire_after is None else r.retire_after.isoformat(),
            }
            for r in bundle.roots
        ],
        "intermediates": len(bundle.intermediates),
    }


class _Duration(click.ParamType[dt.timedelta, Any]):
    """A positive duration (``"24h"``, ``"90s"``); with *bare_hours*, a bare integer is hours
    (what ``--max-leaf-ttl`` took before it took durations)."""

    name = "duration"

    def __init__(self, *, bare_hours: bool = False) -> None:
        self._bare_hours = bare_hours

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> dt.timedelta:
        if isinstance(value, dt.timedelta):
            return value
        text = str(value).strip()
        try:
            bare = self._bare_hours and text.isdigit()
            seconds = float(int(text) * 3600) if bare else parse_duration(text)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if seconds <= 0:
            self.fail("must be positive", param, ctx)
        if seconds > MAX_DURATION.total_seconds():
            self.fail(f"must be at most {MAX_DURATION.days} days", param, ctx)
        return dt.timedelta(seconds=seconds)


@ca.command("rotate")
@dir_option
@click.option(
    "--max-leaf-ttl",
    type=_Duration(bare_hours=True),
    default=None,
    help="Longest leaf lifetime meshd servers issue (bounds retirement); e.g. 24h, 72h. "
    "A bare number is hours. Default: the longest any meshd server published under "
    "<kv-prefix>ca/leaf-ttl/, else 24h.",
)
@click.option(
    "--reload-grace",
    type=_Duration(),
    default=RELOAD_GRACE_DEFAULT,
    show_default=True,
    help="Time the meshd servers have to load the new signing CA after the switch "
    "(added to --max-leaf-ttl for retire_after).",
)
@kv_prefix_option
def rotate(
    directory: Path, max_leaf_ttl: dt.timedelta | None, reload_grace: dt.timedelta, kv_prefix: str
) -> None:
    """Advance a root rotation by one step; run again for the next.

    stable -> new root published -> cross-signed -> signing with the new root -> stable
    (the old root retires only after every leaf it signed has expired).
    """
    key = bundle_key(kv_prefix)
    ttls_at = f"{kv_prefix.rstrip('/')}/{rotation.LEAF_TTL_KEY}"
    before, after = trio.run(_rotate, directory, (max_leaf_ttl, reload_grace, ttls_at), key)
    click.echo(f"rotation: {before} -> {after}")
    bundle, _ = trio.run(_read_bundle, key)
    for root in bundle.roots:
        click.echo(f"  {root.id[:16]}  {root.state.value}")


async def _rotate(
    directory: Path,
    leaf_bounds: tuple[dt.timedelta | None, dt.timedelta, str],
    key: str,
) -> tuple[str, str]:
    bundle, index = await _read_bundle(key)
    phase = rotation.phase_of(bundle)
    now = dt.datetime.now(dt.UTC)
    if phase is rotation.Phase.NEW_ROOT_SIGNING:
        _finish_switch_files(directory)  # idempotent: completes an interrupted switch
    elif phase is rotation.Phase.STABLE:
        _remove_retired_keys(directory, bundle)  # the meshd leader may have retired it
    active = cadir.load(directory, cadir.ROOT)
    if active.cert != bundle.active.cert:
        raise CaCommandError(f"{directory} does not hold the bundle's active root")
    if phase is rotation.Phase.STABLE:
        new_root = pki.make_root(bundle.trust_domain, now=now, ttl=ROOT_TTL)
        cadir.save(directory, cadir.NEXT_ROOT, new_root, overwrite=True)  # unpublished yet
        updated = rotation.publish_new_root(bundle, new_root.cert, now=now)
    elif phase is rotation.Phase.NEW_ROOT_PUBLISHED:
        new_root = cadir.load(directory, cadir.NEXT_ROOT)
        updated = rotation.add_cross_signatures(bundle, active, new_root, now=now)
    elif phase is rotation.Phase.CROSS_SIGNED:
        given, reload_grace, ttls_at = leaf_bounds
        leaf_ttl = _leaf_ttl_bound(given, await _published_leaf_ttls(ttls_at), ttls_at)
        updated = _switch(directory, bundle, active, now, leaf_ttl + reload_grace)
    else:
        updated = rotation.retire_old_root(bundle, now=now)
    await _publish(key, updated, index)
    if phase is rotation.Phase.CROSS_SIGNED:
        _finish_switch_files(directory)
    elif phase is rotation.Phase.NEW_ROOT_SIGNING:
        _remove_retired_keys(directory, updated)
    return phase.value, rotation.phase_of(updated).value


async def _published_leaf_ttls(prefix: str) -> dict[str, float]:
    """Each meshd server's leaf lifetime (seconds) as it published it at start."""
    async with open_consul(ConsulSettings.from_env()) as consul:
        _, entries = await consul.kv_list(prefix)
    found = {}
    for entry in entries:
        value = _leaf_ttl_of(entry.value)
        if value is None:
            raise CaCommandError(
                f'{entry.key}: expected {{"leaf_ttl_s": <seconds, at most {MAX_LEAF_TTL:.0f}>}}; '
                "fix or delete it, or pass --max-leaf-ttl"
            )
        found[entry.key.removeprefix(prefix)] = value
    return found


def _leaf_ttl_of(raw: bytes) -> float | None:
    try:
        value = json.loads(raw)["leaf_ttl_s"]
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 < value <= MAX_LEAF_TTL:  # what [ca] leaf_ttl allows; NaN fails too
        return None
    return float(value)


def _leaf_ttl_bound(
    given: dt.timedelta | None, published: dict[str, float], prefix: str
) -> dt.timedelta:
    """How long leaves signed under the old root may live: what the operator said, else the
    longest a server published, else 24 h; with a warning where that looks wrong."""
    longest = max(published.items(), key=lambda kv: kv[1], default=None)
    if given is not None:
        if longest is not None and given.total_seconds() < longest[1]:
            click.echo(
                f"warning: --max-leaf-ttl {given} is shorter than the leaves meshd server "
                f"{longest[0]} issues ({dt.timedelta(seconds=longest[1])}): those signed "
                "under the old root stop verifying when it retires",
                err=True,
            )
        return given
    if longest is None:
        click.echo(
            f"warning: no meshd server has published its leaf lifetime under {prefix}; "
            "assuming 24h (pass --max-leaf-ttl if the servers issue longer leaves)",
            err=True,
        )
        return DEFAULT_LEAF_TTL
    return dt.timedelta(seconds=longest[1])


def _switch(
    directory: Path,
    bundle: TrustBundle,
    old_root: pki.CertificateAuthority,
    now: dt.datetime,
    old_leaves_for: dt.timedelta,
) -> TrustBundle:
    new_root = cadir.load(directory, cadir.NEXT_ROOT)
    old_signing = cadir.load(directory, cadir.SIGNING)
    fresh = pki.make_signing_ca(new_root, now=now, ttl=SIGNING_TTL)
    # Present the new root cross-signed by the old one, for peers with a stale bundle.
    cross = tuple(
        c
        for c in bundle.intermediates
        if c.subject == new_root.cert.subject and c.issuer == old_root.cert.subject
    )
    signing = pki.CertificateAuthority(fresh.trust_domain, fresh.cert, fresh.key, cross)
    cadir.save(directory, NEXT_SIGNING, signing, overwrite=True)
    # Leaves signed under the old hierarchy: before the switch, and by servers that have
    # not loaded the new signing CA yet (the reload grace), each for at most max_leaf_ttl.
    valid_until = min(now + old_leaves_for, old_signing.cert.not_valid_after_utc)
    return rotation.switch_signing(
        bundle, now=now, old_leaves_valid_until=valid_until, new_signing_ca=signing.cert
    )


def _finish_switch_files(directory: Path) -> None:
    if cadir.exists(directory, cadir.NEXT_ROOT):
        cadir.rename(directory, cadir.ROOT, cadir.PREVIOUS_ROOT)
        cadir.rename(directory, cadir.NEXT_ROOT, cadir.ROOT)
    if cadir.exists(directory, NEXT_SIGNING):
        cadir.rename(directory, cadir.SIGNING, PREVIOUS_SIGNING)
        cadir.rename(directory, NEXT_SIGNING, cadir.SIGNING)


def _remove_retired_keys(directory: Path, bundle: TrustBundle) -> None:
    """Delete the previous hierarchy's keys once the bundle no longer trusts its root."""
    previous = directory / f"{cadir.PREVIOUS_ROOT}.pem"
    if not previous.exists():
        return
    certs = x509.load_pem_x509_certificates(previous.read_bytes())
    if certs[0] in bundle.trusted_roots():
        return
    for name in (cadir.PREVIOUS_ROOT, PREVIOUS_SIGNING):
        for suffix in (".key", ".pem"):
            (directory / f"{name}{suffix}").unlink(missing_ok=True)


async def _publish(key: str, bundle: TrustBundle, index: int) -> None:
    async with open_consul(ConsulSettings.from_env()) as consul:
        if not await consul.kv_put(key, bundle.to_json(), cas=index):
            raise CaCommandError(f"the trust bundle at {key} changed meanwhile; run again")
