"""``meshd-agent redirect apply|remove|status|verify``: the operator's handle on the rules.

Flags build one :class:`~meshd.redirect.RedirectSpec` (the agent's config file will feed the
same spec); everything else is :mod:`agent.redirect`.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable
from typing import Any

import click
import trio

from agent import redirect as driver
from meshd.redirect import AGENT_PORTS, CONSUL_PORTS, Family, RedirectSpec

_TOOL = {4: "iptables-restore", 6: "ip6tables-restore"}


def _uid(value: str) -> int:
    if value.isdigit():
        return int(value)
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise click.BadParameter(f"no such user: {value!r}") from None


def _target(value: str) -> tuple[Family, tuple[str, int]]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise click.BadParameter(f"{value!r} is not ADDRESS:PORT ([v6]:port for IPv6)")
    return (6 if ":" in host else 4), (host, int(port))


def spec_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Attach the flags that make up a :class:`RedirectSpec`."""
    options = [
        click.option("--proxy-uid", help="UID or user the agent and proxies run as."),
        click.option("--outbound-port", type=int, default=15001, show_default=True),
        click.option("--inbound-port", type=int, default=15006, show_default=True),
        click.option("--capture-port", type=int, multiple=True, help="Meshed service port."),
        click.option("--exclude-uid", multiple=True, help="UID or user left alone."),
        click.option("--exclude-inbound-port", type=int, multiple=True),
        click.option("--exclude-outbound-port", type=int, multiple=True),
        click.option(
            "--no-consul-excludes",
            is_flag=True,
            help=f"Do not exclude Consul's ports {list(CONSUL_PORTS)} by default.",
        ),
        click.option("--exclude-cidr", multiple=True, help="Destination network left alone."),
        click.option("--agent-port", type=int, multiple=True, help=f"Default {AGENT_PORTS}."),
        click.option(
            "--ipv6",
            type=click.Choice(["redirect", "refuse"]),
            default="redirect",
            show_default=True,
            help="Redirect IPv6 like IPv4, or refuse it with a TCP reset.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_spec(opts: dict[str, Any], *, required: bool = True) -> RedirectSpec | None:
    """Turn parsed flags into a spec (``None`` when optional and no ``--proxy-uid``)."""
    if opts["proxy_uid"] is None:
        if required:
            raise click.UsageError("--proxy-uid is required")
        return None
    consul = () if opts["no_consul_excludes"] else CONSUL_PORTS
    return RedirectSpec(
        proxy_uid=_uid(opts["proxy_uid"]),
        outbound_port=opts["outbound_port"],
        inbound_port=opts["inbound_port"],
        inbound_ports=tuple(opts["capture_port"]),
        exclude_uids=tuple(_uid(u) for u in opts["exclude_uid"]),
        exclude_inbound_ports=tuple(opts["exclude_inbound_port"]),
        exclude_outbound_ports=(*consul, *opts["exclude_outbound_port"]),
        exclude_outbound_cidrs=tuple(opts["exclude_cidr"]),
        agent_ports=tuple(opts["agent_port"]) or AGENT_PORTS,
        ipv6=opts["ipv6"],
    )


def _echo_changes(changes: tuple[driver.Change, ...], dry_run: bool, verb: str) -> None:
    for change in changes:
        if dry_run:
            click.echo(f"# IPv{change.family}: {_TOOL[change.family]} --noflush <<EOF")
            click.echo(change.payload, nl=False)
            click.echo("# EOF")
        else:
            state = verb if change.applied else "nothing to do"
            click.echo(f"IPv{change.family}: {state}")


@click.group("redirect")
def redirect_cli() -> None:
    """Install, remove and check the iptables rules that hand traffic to the proxies."""


@redirect_cli.command("apply")
@spec_options
@click.option("--dry-run", is_flag=True, help="Print the payloads; change nothing.")
def apply_cmd(dry_run: bool, **opts: Any) -> None:
    """Install the rules (atomically per family; re-applying changes nothing)."""
    spec = build_spec(opts)
    assert spec is not None
    _echo_changes(driver.apply(spec, dry_run=dry_run), dry_run, "applied")


@redirect_cli.command("remove")
@click.option("--dry-run", is_flag=True, help="Print the payloads; change nothing.")
def remove_cmd(dry_run: bool) -> None:
    """Delete meshd's tagged rules and MESHD_* chains, and nothing else."""
    _echo_changes(driver.remove(dry_run=dry_run), dry_run, "removed")


@redirect_cli.command("status")
@spec_options
def status_cmd(**opts: Any) -> None:
    """Show what is installed; with --proxy-uid, also compare it with that spec."""
    spec = build_spec(opts, required=False)
    found = driver.status(spec)
    for item in found:
        st = item.status
        click.echo(f"IPv{item.family}: {'installed' if st.installed else 'not installed'}")
        for table, chain in st.chains:
            click.echo(f"  chain {table}/{chain}")
        click.echo(f"  rules in meshd chains: {st.rule_count}")
        for jump in st.jumps:
            click.echo(
                f"  {jump.table}/{jump.chain} -> {', '.join(jump.targets)} "
                f"at positions {list(jump.positions)}"
            )
        for problem in item.problems:
            click.echo(f"  problem: {problem}")
    problems = [p for item in found for p in item.problems]
    if problems:
        raise driver.RedirectError(f"rules differ from the spec: {problems[0]}")


@redirect_cli.command("verify")
@spec_options
@click.option(
    "--probe",
    "probes",
    multiple=True,
    metavar="ADDRESS:PORT",
    help="Where to dial (must be captured and routable); default 192.0.2.1:80 and "
    "[2001:db8::1]:80.",
)
@click.option("--timeout", type=float, default=2.0, show_default=True)
def verify_cmd(probes: tuple[str, ...], timeout: float, **opts: Any) -> None:
    """Compare the rules with the spec and prove interception with a live probe."""
    spec = build_spec(opts)
    assert spec is not None
    targets = [_target(p) for p in probes] or list(driver.DEFAULT_PROBE_TARGETS.items())
    report = trio.run(lambda: driver.verify(spec, targets=targets, timeout=timeout))
    for result in report.probes:
        mark = "ok" if result.ok else "FAIL"
        click.echo(f"IPv{result.family}: {mark}: {result.outcome}: {result.detail}")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    if not report.ok:
        raise driver.RedirectError("verify failed: interception is not in place as specified")
