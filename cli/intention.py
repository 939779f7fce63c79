"""``meshctl intention``: create, delete, get, list, check and match intentions in Consul KV.

Writes are check-and-set read-modify-writes (:mod:`cli.intention_kv`), so two operators never
overwrite each other. ``check`` and ``match`` compile the live documents with the same
:func:`meshd.intentions.compile_policy` and :func:`meshd.intentions.authorize` the agent runs.
"""

from __future__ import annotations

import json
from typing import Any

import click
import trio

from cli.intention_kv import load_policy, read_document, update_document
from cli.output import table
from meshd.consul import ConsulSettings, open_consul
from meshd.consul.model import kv_folder
from meshd.intentions import (
    DEFAULT_PREFIX,
    WILDCARD,
    Action,
    Barrier,
    Decision,
    IntentionError,
    IntentionsDocument,
    InvalidDocument,
    MatchedIntention,
    Policy,
    SourceIntention,
    authorize,
    documents_from_kv,
    intentions_key,
    intentions_prefix,
    is_service_name,
    precedence,
    source_to_json,
)

EXIT_DENIED = 2


def kv_prefix_param(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Click callback: *value* as a KV folder (``meshd/``), or a usage error naming it."""
    try:
        return kv_folder(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


prefix_option = click.option(
    "--prefix",
    default=DEFAULT_PREFIX,
    envvar="MESHD_KV_PREFIX",
    show_default=True,
    callback=kv_prefix_param,
    help="KV prefix meshd keeps its documents under (env MESHD_KV_PREFIX).",
)
format_option = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for scripts.",
)


def _name(value: str, what: str, *, wildcard: bool = True) -> str:
    if (wildcard and value == WILDCARD) or is_service_name(value):
        return value
    allowed = "a service name or '*'" if wildcard else "a service name"
    raise IntentionError(f"{what} {value!r} is not {allowed} (a-z, 0-9 and inner '-')")


def _settings() -> ConsulSettings:
    return ConsulSettings.from_env()


# -- output ------------------------------------------------------------------------------------


def _action_text(rule: MatchedIntention) -> str:
    if rule.permissions:
        return f"l7 ({len(rule.permissions)} permissions; deny at L4)"
    return rule.l4_action.value


def _rule_json(rule: MatchedIntention) -> dict[str, Any]:
    source = SourceIntention(rule.source, rule.action, rule.permissions, rule.description)
    return {
        "Destination": rule.destination,
        "Precedence": rule.precedence,
        **source_to_json(source),
    }


def _invalid_json(doc: InvalidDocument) -> dict[str, str]:
    return {"Destination": doc.destination, "Key": doc.key, "Error": doc.reason}


def _doc_rules(destination: str, doc: IntentionsDocument) -> list[MatchedIntention]:
    rules = [
        MatchedIntention(
            source=s.name,
            destination=destination,
            precedence=precedence(s.name, destination),
            action=s.action,
            permissions=s.permissions,
            description=s.description,
        )
        for s in doc.sources
    ]
    return sorted(rules, key=lambda r: (-r.precedence, r.l4_action != Action.DENY, r.source))


def _step_json(step: MatchedIntention | Barrier) -> dict[str, Any]:
    if isinstance(step, MatchedIntention):
        return _rule_json(step)
    return {"Invalid": {"Destination": step.destination, "Key": step.key, "Error": step.reason}}


def _step_row(step: MatchedIntention | Barrier) -> list[str]:
    if isinstance(step, MatchedIntention):
        return [str(step.precedence), step.source, step.destination, _action_text(step)]
    return ["-", "*", step.destination, "INVALID: deny"]


def _decision_lines(decision: Decision) -> list[str]:
    lines = ["Allowed" if decision.allowed else "Denied", f"  reason: {decision.reason}"]
    rule = decision.intention
    if rule is not None:
        text = f"{rule.source} -> {rule.destination} {_action_text(rule)}"
        lines.append(f"  intention: {text} (precedence {rule.precedence})")
        if rule.description:
            lines.append(f"  description: {rule.description}")
    return lines


# -- commands ----------------------------------------------------------------------------------


@click.group("intention")
def intention() -> None:
    """Manage intentions: which services may connect to which."""


@intention.command("create")
@click.argument("source")
@click.argument("destination")
@click.option("--allow", is_flag=True, help="Allow SOURCE to connect.")
@click.option("--deny", is_flag=True, help="Deny SOURCE.")
@click.option("--description", default="", help="Why this intention exists.")
@click.option("--replace", is_flag=True, help="Replace an existing intention for the pair.")
@prefix_option
def create(
    source: str,
    destination: str,
    allow: bool,
    deny: bool,
    description: str,
    replace: bool,
    prefix: str,
) -> None:
    """Create an intention from SOURCE to DESTINATION (either may be '*')."""
    if allow == deny:
        raise click.UsageError("exactly one of --allow or --deny is required")
    action = "allow" if allow else "deny"
    _name(source, "source")
    _name(destination, "destination")
    key = intentions_key(destination, prefix)
    entry = SourceIntention(name=source, action=Action(action), description=description)

    def change(doc: IntentionsDocument | None) -> IntentionsDocument:
        doc = doc or IntentionsDocument(name=destination)
        existing = doc.source(source)
        if existing is not None and not replace:
            what = "l7" if existing.is_l7 else existing.action
            raise IntentionError(
                f"intention {source} -> {destination} already exists ({what}) in {key}; "
                "use --replace to change it"
            )
        return doc.with_source(entry)

    async def run() -> None:
        async with open_consul(_settings()) as consul:
            await update_document(consul, key, destination, change)

    trio.run(run)
    click.echo(f"Created: {source} -> {destination} ({action})")


@intention.command("delete")
@click.argument("source")
@click.argument("destination")
@prefix_option
def delete(source: str, destination: str, prefix: str) -> None:
    """Delete the intention from SOURCE to DESTINATION."""
    _name(source, "source")
    _name(destination, "destination")
    key = intentions_key(destination, prefix)

    def change(doc: IntentionsDocument | None) -> IntentionsDocument:
        if doc is None or doc.source(source) is None:
            raise IntentionError(f"no intention {source} -> {destination} in {key}")
        return doc.without_source(source)

    async def run() -> None:
        async with open_consul(_settings()) as consul:
            await update_document(consul, key, destination, change)

    trio.run(run)
    click.echo(f"Deleted: {source} -> {destination}")


@intention.command("get")
@click.argument("source")
@click.argument("destination")
@prefix_option
@format_option
def get(source: str, destination: str, prefix: str, fmt: str) -> None:
    """Show the intention from SOURCE to DESTINATION."""
    _name(source, "source")
    _name(destination, "destination")
    key = intentions_key(destination, prefix)

    async def run() -> IntentionsDocument | None:
        async with open_consul(_settings()) as consul:
            return (await read_document(consul, key, destination))[0]

    doc = trio.run(run)
    found = None if doc is None else doc.source(source)
    if doc is None or found is None:
        raise IntentionError(f"no intention {source} -> {destination} in {key}")
    (rule,) = (r for r in _doc_rules(destination, doc) if r.source == source)
    if fmt == "json":
        click.echo(json.dumps(_rule_json(rule), indent=2))
        return
    rows = [
        ("Source", source),
        ("Destination", destination),
        ("Action", _action_text(rule)),
        ("Precedence", str(rule.precedence)),
        ("Description", rule.description),
        *((f"Meta.{k}", v) for k, v in found.meta),
        ("Key", key),
    ]
    click.echo("\n".join(f"{k + ':':<13}{v}" for k, v in rows))


@intention.command("list")
@click.argument("destination", required=False)
@prefix_option
@format_option
def list_(destination: str | None, prefix: str, fmt: str) -> None:
    """List intentions (all, or DESTINATION's document), flagging invalid documents."""
    if destination is not None:
        _name(destination, "destination")

    async def run() -> dict[str, IntentionsDocument | InvalidDocument]:
        async with open_consul(_settings()) as consul:
            _, entries = await consul.kv_list(intentions_prefix(prefix))
        return documents_from_kv(((e.key, e.value) for e in entries), prefix)

    documents = trio.run(run)
    chosen = sorted(d for d in documents if destination in (None, d))
    rules: list[MatchedIntention] = []
    invalid: list[InvalidDocument] = []
    for name in chosen:
        doc = documents[name]
        if isinstance(doc, InvalidDocument):
            invalid.append(doc)
        else:
            rules.extend(_doc_rules(name, doc))
    if fmt == "json":
        out = {
            "Intentions": [_rule_json(r) for r in rules],
            "Invalid": [_invalid_json(d) for d in invalid],
        }
        click.echo(json.dumps(out, indent=2))
        return
    rows = [
        [r.source, r.destination, _action_text(r), str(r.precedence), r.description] for r in rules
    ]
    click.echo(table(["SOURCE", "DESTINATION", "ACTION", "PRECEDENCE", "DESCRIPTION"], rows))
    for doc in invalid:
        click.echo(f"INVALID {doc.destination}: denies every source: {doc.reason}")


@intention.command("check")
@click.argument("source")
@click.argument("destination")
@prefix_option
def check(source: str, destination: str, prefix: str) -> None:
    """Would SOURCE be allowed to connect to DESTINATION? Exit 0 allowed, 2 denied.

    Runs the agent's own authorize() on the live intentions and mesh config.
    """
    _name(source, "source", wildcard=False)
    _name(destination, "destination", wildcard=False)

    async def run() -> tuple[Policy, str | None]:
        async with open_consul(_settings()) as consul:
            return await load_policy(consul, prefix)

    policy, config_error = trio.run(run)
    if config_error is not None:
        click.echo(f"warning: {config_error}; using default action deny", err=True)
    decision = authorize(policy, source, destination)
    click.echo("\n".join(_decision_lines(decision)))
    if not decision.allowed:
        raise SystemExit(EXIT_DENIED)  # not ctx.exit: run_cli drops non-standalone exit codes


@intention.command("match")
@click.argument("destination")
@prefix_option
@format_option
def match(destination: str, prefix: str, fmt: str) -> None:
    """List the intentions consulted for DESTINATION, in evaluation order."""
    _name(destination, "destination", wildcard=False)

    async def run() -> tuple[Policy, str | None]:
        async with open_consul(_settings()) as consul:
            return await load_policy(consul, prefix)

    policy, config_error = trio.run(run)
    steps = policy.evaluation_order(destination)
    default = policy.default_action.value
    if fmt == "json":
        out = [_step_json(s) for s in steps]
        click.echo(json.dumps({"Steps": out, "DefaultAction": default}, indent=2))
        return
    rows = [_step_row(s) for s in steps]
    barriers = [s for s in steps if isinstance(s, Barrier)]
    if not barriers:  # an invalid document ends evaluation: the default is never reached
        rows.append(["-", "*", destination, f"{default} (mesh default)"])
    click.echo(table(["PRECEDENCE", "SOURCE", "DESTINATION", "ACTION"], rows))
    for barrier in barriers:
        click.echo(f"INVALID {barrier.reason}")
    if config_error is not None:
        click.echo(f"warning: {config_error}; using default action deny", err=True)
