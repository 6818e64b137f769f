"""`psa-writeback add-connection | check-connection | simulator`, for every provider.

Secrets never go on the command line (where `ps` and shell history keep them): keys are
read from the environment variables named by --public-key-env / --private-key-env (and
--integration-code-env for Autotask). What goes in which stored column, per provider:

| provider    | company_id         | client_id        | public_key (enc.) | private_key (enc.) |
|-------------|--------------------|------------------|-------------------|--------------------|
| connectwise | company id         | clientId (GUID)  | public key        | private key        |
| autotask    | zone name (info)   | integration code | API user name     | API secret         |
| halo        | tenant ("" if none)| client id        | "" (unused)       | client secret      |
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from providers import REGISTRY
from providers.text import clean_line
from tasks.errors import RequestError
from worker.safetext import one_line


def add_parsers(sub: Any) -> None:
    c = sub.add_parser("add-connection", help="store a PSA connection (keys encrypted at rest)")
    c.add_argument("--account", type=int, required=True)
    c.add_argument("--provider", default="connectwise", choices=sorted(REGISTRY))
    c.add_argument("--base-url", help="ConnectWise: https://api-na.myconnectwise.net/v4_6_release/apis/3.0; "
                                      "Halo: https://yourco.halopsa.com; Autotask: looked up when omitted")
    c.add_argument("--company", default="", help="ConnectWise company id")
    c.add_argument("--client-id", default="", help="ConnectWise clientId, or Halo client id")
    c.add_argument("--username", default="", help="Autotask API user name (also finds its zone)")
    c.add_argument("--tenant", default="", help="Halo tenant (hosted instances)")
    c.add_argument("--zone-lookup-url", default=None, help="Autotask ZoneInformation endpoint (default: "
                                                           "webservices2.autotask.net)")
    c.add_argument("--public-key-env", default="PSA_PUBLIC_KEY", help="env var holding the ConnectWise public key")
    c.add_argument("--private-key-env", default="PSA_PRIVATE_KEY",
                   help="env var holding the private key / Autotask secret / Halo client secret")
    c.add_argument("--integration-code-env", default="AUTOTASK_INTEGRATION_CODE",
                   help="env var holding the Autotask integration code (tracking identifier)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_add_connection)

    k = sub.add_parser("check-connection", help="prove a connection's keys with read-only calls and list its statuses")
    k.add_argument("connection", type=int)
    k.add_argument("--ticket", type=int, help="read this ticket (ConnectWise: list its board's statuses)")
    k.add_argument("--board", type=int, help="ConnectWise board whose statuses to list")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_check_connection)

    sim = sub.add_parser("simulator", help="run a PSA simulator on loopback")
    sim.add_argument("--provider", default="connectwise", choices=sorted(REGISTRY))
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--latency", type=float, default=0.0)
    sim.set_defaults(func=cmd_simulator)


def cmd_simulator(args: argparse.Namespace) -> int:
    import importlib

    main = importlib.import_module(f"providers.simulators.{args.provider}").main
    # stderr: stdout's first line is the simulator's JSON address, which scripts read.
    print("note: the simulator listens on loopback, which workers refuse for a PSA unless allowed: run them "
          "with PSA_ALLOWED_HOSTS=127.0.0.1,localhost,::1 (README \"Security model\")", file=sys.stderr, flush=True)
    main(["--port", str(args.port), "--latency", str(args.latency)])
    return 0


def _env(name: str, what: str, field: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise RequestError(f"{what} not given: set the environment variable {name}", field=field)
    return value


def _required(value: str, option: str, provider: str) -> str:
    if not value.strip():
        raise RequestError(f"{option} is required for {provider}", field=option.lstrip("-").replace("-", "_"))
    return value


def connection_fields(args: argparse.Namespace) -> dict[str, str]:
    """The add_connection keywords for this provider, from arguments and the environment."""
    p = args.provider
    if p == "autotask":
        username = _required(args.username, "--username", p)
        code = _env(args.integration_code_env, "integration code", "client_id")
        secret = _env(args.private_key_env, "secret", "private_key")
        base_url, zone = args.base_url, ""
        if not base_url:  # before add_connection, so the stored (and vetted) base URL is final
            base_url, zone = _zone(username, args.zone_lookup_url)
        return dict(base_url=base_url, company_id=zone, client_id=code, public_key=username, private_key=secret)
    if p == "halo":
        return dict(base_url=_required(args.base_url or "", "--base-url", p), company_id=args.tenant,
                    client_id=_required(args.client_id, "--client-id", p), public_key="",
                    private_key=_env(args.private_key_env, "client secret", "private_key"))
    return dict(base_url=_required(args.base_url or "", "--base-url", p), company_id=_required(args.company,
                "--company", p), client_id=_required(args.client_id, "--client-id", p),
                public_key=_env(args.public_key_env, "public key", "public_key"),
                private_key=_env(args.private_key_env, "private key", "private_key"))


def _zone(username: str, lookup_url: str | None) -> tuple[str, str]:
    from providers import autotask
    from providers.errors import PsaError

    try:
        return autotask.lookup_zone(username, lookup_url or autotask.ZONE_LOOKUP_URL)
    except PsaError as err:
        raise RequestError(f"could not find the Autotask zone of API user {username!r}: {err}; check the user name "
                           "or pass --base-url", field="base_url") from None


def cmd_add_connection(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from tasks import admin

    fields = connection_fields(args)
    with session_scope() as db:
        conn = admin.add_connection(db, account_id=args.account, provider=args.provider, **fields)
        cid, base_url = conn.id, conn.base_url
    data = {"connection_id": cid, "provider": args.provider, "base_url": base_url}
    human = f"connection {cid} ({args.provider}, {base_url}) added for account {args.account}"
    print(json.dumps(data) if args.json else human)
    return 0


def cmd_check_connection(args: argparse.Namespace) -> int:
    from tasks.connection_check import check_connection

    report = check_connection(args.connection, args.ticket, args.board)
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report))
    return 0 if report["ok"] else 1


def render(r: dict[str, Any]) -> str:
    """The report for a terminal. Status names, URLs and the PSA's message are the tenant's:
    each is shown on one line with control characters escaped (worker.safetext)."""
    head = f"connection {r['connection_id']} ({r['provider']}, {one_line(r['base_url'])})"
    if not r["active"]:
        head += " [inactive]"
    if not r["ok"]:
        return f"{head}: FAILED ({r['cause']}): {one_line(r['message'])}"
    lines = [f"{head}: OK, the keys work"]
    if r["ticket"]:
        t = r["ticket"]
        lines.append(f"ticket {t['id']}: status {t['status_id']} ({one_line(t['status_name'])})")
    lines.append("statuses (id, name, closed):")
    lines += [f"  {s['id']:>6}  {one_line(s['name'])}{'  [closed]' if s['closed'] else ''}"
              f"{'  [inactive]' if s['inactive'] else ''}" for s in r["statuses"]]
    for t in r["targets"]:
        # the account's stored value, whatever was stored: cut like a PSA's strings
        lines.append(f"{t['key']} = {one_line(clean_line(str(t['value']), 60))}: "
                     + (f"exists ({one_line(t['name'])})" if t["reason"] is None else one_line(t["reason"])))
    return "\n".join(lines)
