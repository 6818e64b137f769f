"""One kit per registered provider: how tests (tests/providers/contract) and the demo start
its simulator, connect an account to it, and read back what landed on a ticket, in terms
every PSA shares. A new provider is done when it has a kit and passes the contract suite."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SimNote:
    id: str
    text: str
    customer_visible: bool


@dataclass(frozen=True)
class Kit:
    provider: str
    resolved: int  # the simulator tenant's ids: each PSA's differ on purpose
    escalated: int
    new: int
    resolved_name: str
    new_name: str
    # a refusal the PSA makes on a business rule: (HTTP status, body), and the text to expect
    refusal: tuple[int, Any]
    refusal_text: str

    def start(self) -> Any:
        return _server_cls(self.provider)().start()

    def connection(self, server: Any, **override: str) -> dict[str, str]:
        """add_connection keyword arguments (all but account_id) for this simulator."""
        st = server.state
        if self.provider == "connectwise":
            kw = dict(company_id=st.company_id, client_id=st.client_id, public_key=st.public_key,
                      private_key=st.private_key)
        elif self.provider == "autotask":
            kw = dict(company_id=st.zone_name, client_id=st.integration_code, public_key=st.username,
                      private_key=st.secret)
        else:
            kw = dict(company_id=st.tenant, client_id=st.client_id, public_key="", private_key=st.client_secret)
        return {"provider": self.provider, "base_url": server.base_url, **kw, **override}

    def make_provider(self, server: Any, options: dict[str, Any] | None = None, **override: str) -> Any:
        """This PSA's provider on the simulator's credentials, as the worker builds it after
        decrypting a connection (no database)."""
        from providers import provider_for
        from providers.base import Credentials

        kw = self.connection(server, **override)
        return provider_for(kw.pop("provider"), Credentials(**kw), options)

    def wrong_keys(self) -> dict[str, str]:
        return {"private_key": "revoked-fake-key"}

    def prefs(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_resolved_status_id": self.resolved, f"{prefix}_escalated_status_id": self.escalated}

    def notes(self, server: Any, ticket_id: int) -> list[SimNote]:
        raw = server.state.notes(ticket_id)
        if self.provider == "connectwise":
            return [SimNote(str(n["id"]), n["text"], not n["internalAnalysisFlag"]) for n in raw]
        if self.provider == "autotask":
            return [SimNote(str(n["id"]), n["description"], n["publish"] == 1) for n in raw]
        return [SimNote(str(n["id"]), n["note"], not n["hiddenfromuser"]) for n in raw]


def _server_cls(provider: str) -> Any:
    if provider == "connectwise":
        from providers.simulators.connectwise import SimulatorServer
        return SimulatorServer
    if provider == "autotask":
        from providers.simulators.autotask import AutotaskSimulator
        return AutotaskSimulator
    from providers.simulators.halo import HaloSimulator
    return HaloSimulator


_CW_RULE = "Service Status 11 cannot be set while the ticket has open tasks"
_AT_RULE = "The ticket cannot be completed while it has incomplete checklist items."
_HALO_RULE = "This ticket cannot be closed until all child tickets are closed."

KITS: dict[str, Kit] = {
    "connectwise": Kit("connectwise", resolved=9, escalated=7, new=1, resolved_name="Resolved", new_name="New",
                       refusal=(400, {"code": "InvalidObject", "message": "ticket object is invalid",
                                      "errors": [{"code": "Rule", "message": _CW_RULE, "field": "summary"}]}),
                       refusal_text=_CW_RULE),
    "autotask": Kit("autotask", resolved=5, escalated=13, new=1, resolved_name="Complete", new_name="New",
                    refusal=(500, {"errors": [_AT_RULE]}), refusal_text=_AT_RULE),
    "halo": Kit("halo", resolved=9, escalated=22, new=1, resolved_name="Closed", new_name="New",
                refusal=(400, _HALO_RULE), refusal_text=_HALO_RULE),
}


def kit_for(server: Any) -> Kit:
    """The kit of a running simulator (tests.factories.World takes any of them)."""
    for kit in KITS.values():
        if isinstance(server, _server_cls(kit.provider)):
            return kit
    raise TypeError(f"no simulator kit for {type(server).__name__}")
