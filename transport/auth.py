"""NATS authorization generated from the tenants config: nats-server enforces it, not kvrelay code.

Choice: **one account, one user per tenant and per service, with publish/subscribe permissions**
(not an account per tenant with exports/imports). kvrelay's JetStream streams (requests, the
prefilled work queue, KV events, discovery) live in one account that every service uses; tenants
only need to JetStream-publish their own request subject and receive their own token streams, which
user permissions express exactly, and nats-server reloads users and permissions on SIGHUP. Accounts
would isolate more (a tenant could not even see a subject name of another) but need service
imports for JetStream publish acks and a stream export per tenant, with subjects mapped between
accounts: more moving parts for the same guarantees here.

A tenant ``T`` (namespace ``ns``) may

- publish ``kvrelay.<ns>.req.T`` (its requests; JetStream publish is a request whose ack comes back
  to its inbox) and ``kvrelay.<ns>.cancel.T.*`` (cancels of its own requests);
- subscribe ``kvrelay.<ns>.client.T.>`` (its stream subjects: the router refuses others) and
  ``_INBOX_T.>`` (its inbox: connect with ``inbox_prefix="_INBOX_T"``);

and nothing else: a subscription or publish elsewhere is a "Permissions Violation" error the
server sends to the client. Services (router, prefill, decode) authenticate with their own users and
keep full permissions: they are trusted (see README "Tenants and security").
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from kvrelay.schemas.tenants import TenantsConfig
from kvrelay.transport.subjects import Subjects

SERVICES = ("router", "prefill", "decode")


def tenant_permissions(tenant: str, subjects: Subjects) -> dict[str, Any]:
    return {
        "publish": {"allow": [subjects.request(tenant), f"{subjects.root}.cancel.{tenant}.*"]},
        "subscribe": {"allow": [f"{subjects.client(tenant)}.>", f"{Subjects.inbox_prefix(tenant)}.>"]},
    }


def authorization(tenants: TenantsConfig, subjects: Subjects, service_passwords: dict[str, str]) -> dict[str, Any]:
    """The ``authorization`` block: a user per service (full permissions) and per tenant with NATS access."""
    users: list[dict[str, Any]] = [{"user": name, "password": pw} for name, pw in sorted(service_passwords.items())]
    for t in tenants.tenants:
        if t.nats_password:
            users.append({"user": t.name, "password": t.nats_password,
                          "permissions": tenant_permissions(t.name, subjects)})
    return {"users": users}


def render(block: dict[str, Any]) -> str:
    """The block as nats-server config text (its format takes JSON values)."""
    return "authorization " + json.dumps(block, indent=2) + "\n"


def make_service_secrets(folder: str | Path) -> dict[str, str]:
    """A random password per service, each written to ``<folder>/<service>.password`` (mode 0600)."""
    out = {}
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name in SERVICES:
        pw = secrets.token_urlsafe(32)
        path = root / f"{name}.password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pw)
        os.chmod(path, 0o600)
        out[name] = pw
    return out
