"""``kvrelay tenants add`` and ``kvrelay nats-config``: make tenants' secrets, and a nats-server
config that enforces them (for deployments on a NATS server of their own: ``--nats-url``).

    kvrelay tenants add NAME --file tenants.json [--weight W] [--max-inflight N] [--tokens-per-minute T]
        prints a new API key and NATS password once; stores only their hashes in the file
    kvrelay nats-config --tenants tenants.json --secrets-dir DIR [--namespace NS]
        prints the nats-server "authorization" block; writes the services' passwords to DIR (0600)
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

from kvrelay.schemas.tenants import TenantsConfig, TenantsError, TenantSpec, hash_api_key, load_tenants, read_tenants
from kvrelay.transport.auth import authorization, make_service_secrets, render
from kvrelay.transport.subjects import Subjects


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tenants = sub.add_parser("tenants", help="manage the tenants file")
    tsub = tenants.add_subparsers(dest="tenants_command", required=True)
    add = tsub.add_parser("add", help="add a tenant: prints its API key and NATS password once")
    add.add_argument("name")
    add.add_argument("--file", required=True, help="the tenants file (JSON; created if missing)")
    add.add_argument("--weight", type=float, default=1.0)
    add.add_argument("--max-inflight", type=int, default=0)
    add.add_argument("--tokens-per-minute", type=int, default=0)
    add.add_argument("--no-nats", action="store_true", help="HTTP only: no NATS password")
    conf = sub.add_parser("nats-config", help="the nats-server authorization for a tenants file")
    conf.add_argument("--tenants", required=True)
    conf.add_argument("--secrets-dir", required=True, help="where the services' passwords are written (0600)")
    conf.add_argument("--namespace", default="default")


def bcrypt_hash(password: str) -> str:
    import bcrypt

    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=11, prefix=b"2a")).decode()


def add_tenant(path: str | Path, name: str, *, weight: float = 1.0, max_inflight: int = 0,
               tokens_per_minute: int = 0, nats: bool = True) -> tuple[str, str]:
    """Add ``name`` to the tenants file; returns (API key, NATS password or "")."""
    p = Path(path)
    data = read_tenants(p) if p.exists() else {"tenants": []}
    key = "kvr-" + secrets.token_urlsafe(32)
    password = secrets.token_urlsafe(24) if nats else ""
    spec = TenantSpec(name=name, api_keys=[hash_api_key(key)], nats_password=bcrypt_hash(password) if nats else "",
                      weight=weight, max_inflight=max_inflight, tokens_per_minute=tokens_per_minute)
    config = TenantsConfig.from_mapping({"tenants": [*data.get("tenants", []), spec.to_mapping()]})
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(config.to_mapping(), indent=2) + "\n")
    tmp.replace(p)  # atomic: a router reloading it never reads half a file
    return key, password


def main(args: argparse.Namespace) -> int:
    try:
        if args.command == "tenants":
            key, password = add_tenant(args.file, args.name, weight=args.weight, max_inflight=args.max_inflight,
                                       tokens_per_minute=args.tokens_per_minute, nats=not args.no_nats)
            print(f"tenant {args.name} added to {args.file}; these are shown once:")
            print(f"  API key:       {key}")
            if password:
                print(f"  NATS user:     {args.name}\n  NATS password: {password}")
            return 0
        tenants = load_tenants(args.tenants)
        services = make_service_secrets(args.secrets_dir)
        print(render(authorization(tenants, Subjects(args.namespace), services)), end="")
        print(f"# services connect with bus.user=<router|prefill|decode> and "
              f"bus.password_file={Path(args.secrets_dir).absolute()}/<service>.password", file=sys.stderr)
        return 0
    except (TenantsError, ValueError) as exc:
        print(f"kvrelay: {exc}", file=sys.stderr)
        return 2
