"""Intentions: service-to-service authorization kept in Consul KV.

The document format and its strict parser live in :mod:`~meshd.intentions.document`, L7
permissions in :mod:`~meshd.intentions.permissions`, and compilation plus the pure
:func:`authorize` in :mod:`~meshd.intentions.policy`. ``meshctl intention check`` and the
agent's inbound proxy both call :func:`authorize` on a policy built by :func:`compile_policy`,
so what the CLI reports is what the data plane does. See ``docs/intentions.md``.
"""

from meshd.intentions.document import (
    DEFAULT_PREFIX,
    KIND,
    SCHEMA_VERSION,
    WILDCARD,
    IntentionsDocument,
    InvalidDocument,
    SourceIntention,
    document_to_json,
    documents_from_kv,
    documents_from_raw,
    intentions_key,
    intentions_prefix,
    is_service_name,
    parse_intentions_document,
    parse_or_invalid,
    render_document,
    source_to_json,
)
from meshd.intentions.permissions import HeaderMatch, HTTPMatch, Permission
from meshd.intentions.policy import (
    Barrier,
    Decision,
    MatchedIntention,
    Policy,
    Step,
    authorize,
    compile_policy,
    precedence,
)
from meshd.intentions.schema import Action, IntentionError

__all__ = [
    "DEFAULT_PREFIX",
    "KIND",
    "SCHEMA_VERSION",
    "WILDCARD",
    "Action",
    "Barrier",
    "Decision",
    "HTTPMatch",
    "HeaderMatch",
    "IntentionError",
    "IntentionsDocument",
    "InvalidDocument",
    "MatchedIntention",
    "Permission",
    "Policy",
    "SourceIntention",
    "Step",
    "authorize",
    "compile_policy",
    "document_to_json",
    "documents_from_kv",
    "documents_from_raw",
    "intentions_key",
    "intentions_prefix",
    "is_service_name",
    "parse_intentions_document",
    "parse_or_invalid",
    "precedence",
    "render_document",
    "source_to_json",
]
