"""Autotask PSA (Datto) over REST ATServicesRest/V1.0.

Vendor quirks that shaped this module (see shared/reference/psa-apis.md §2):
- auth is three headers on every call (ApiIntegrationCode, UserName, Secret); the base URL
  belongs to the API user's zone (looked up once with ZoneInformation, at set-up time);
- `noteType`, `publish` and the ticket `status` are picklists whose ids belong to one
  tenant: we resolve them by label from `.../entityInformation/fields` (cached per
  connection, providers.picklists) and let the account override them (`options`);
- customer visible = publish "All Autotask Users" (the outsourced/client-portal copy shows
  those); internal = "Internal Project Team" (or another "Internal ..." value);
- whether a note needs a title is a per-tenant category setting, so we always send one: a
  fixed title per visibility (it also tells a resolution from a discussion note on re-read,
  since both are published to all users);
- status changes are sparse `PATCH /Tickets {"id","status"}` (a full-entity update trips
  unrelated validations); the reply is only `{"itemId"}`, the re-read is `GET /Tickets/{id}`;
- business-rule refusals come back as HTTP 500 with an `errors` array: permanent, with the
  vendor's text (map_error below); a bare 500 stays transient;
- notes have no idempotency key and the query API cannot sort newest first, so both note
  listings page forward by id (`id gt N`, keyset: a deletion between reads skips nothing).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.enums import NoteVisibility
from providers import errors as E
from providers.base import BoardStatus, Credentials, PostedNote, Ticket
from providers.errors import PsaProtocolError
from providers.http import call, pooled_session
from providers.picklists import PICKLISTS, Picklist
from providers.text import STATUS_NAME_LIMIT, clean_line, clean_text
from providers.values import parse_iso, to_int, vendor_id

NOTE_PAGE_SIZE = 500  # Autotask's MaxRecords ceiling
NOTE_PAGES_MAX = 20
# Autotask statuses belong to the tenant, not to a board: tickets report this one "board".
TENANT_BOARD = 0

TITLES = {NoteVisibility.RESOLUTION: "Resolution", NoteVisibility.INTERNAL: "Escalation (internal)",
          NoteVisibility.DISCUSSION: "Update"}
# Labels tried in order; the first one the tenant has wins (options override by id).
PUBLISH_LABELS = {"customer": ("All Autotask Users",),
                  "internal": ("Internal Project Team", "Internal Users Only", "Internal & Co-Managed")}
NOTE_TYPE_LABELS = ("Task Notes", "Task Detail", "Task Summary")
CLOSED_LABELS = {"complete", "completed", "closed", "resolved"}


class AutotaskProvider:
    name = "autotask"
    # account_settings.preferences keys: autotask_resolved_status_id, autotask_escalated_status_id
    preference_prefix = "autotask"
    # account preferences that override tenant picklist look-ups (ids, as integers)
    # company_id holds the zone's name, for display only (the base URL is the zone's)
    optional_credentials = ("company_id",)
    option_keys = ("autotask_note_type_id", "autotask_publish_customer_id", "autotask_publish_internal_id")
    # Autotask refuses a 4th concurrent request per integration: the runner caps this
    # connection's jobs in flight (tasks.ratelimit.inflight_cap), across all workers.
    max_concurrent_requests = 3
    # 10,000 calls per rolling hour per Autotask database, shared by every integration: the
    # runner counts this connection's calls in Redis and slows down before the threshold
    # (tasks.ratelimit.hourly_limits; AUTOTASK_HOURLY_CALL_BUDGET, AUTOTASK_HOURLY_SLOWDOWN_AT).
    hourly_call_limit = 10_000

    def __init__(self, credentials: Credentials, options: Mapping[str, Any] | None = None) -> None:
        self._base = credentials.base_url.rstrip("/")
        self._headers = {"ApiIntegrationCode": credentials.client_id, "UserName": credentials.public_key,
                         "Secret": credentials.private_key, "Content-Type": "application/json",
                         "Accept": "application/json"}
        secret = f"{credentials.client_id}|{credentials.public_key}|{credentials.private_key}"
        self._session = pooled_session(f"autotask|{self._base}|{secret}", self._base)
        # Picklists are per tenant (base URL + API user), never per secret: a key rotation
        # keeps the cache, and no secret is part of a cache key that could be logged.
        self._cache_key = f"autotask|{self._base}|{credentials.public_key}"
        self._options = dict(options or {})

    def __repr__(self) -> str:
        return f"<AutotaskProvider {self._base}>"

    def _call(self, method: str, path: str, operation: str, **kwargs: Any) -> Any:
        return call(self._session, method, self._base + path, provider=self.name, operation=operation,
                    headers=self._headers, **kwargs)

    # --- picklists ------------------------------------------------------------------------
    def _picklist(self, entity: str, field: str) -> Picklist:
        def load() -> dict[str, Picklist]:
            body = self._call("GET", f"/{entity}/entityInformation/fields", "list_statuses")
            return _picklists(body, entity)
        return PICKLISTS.get(f"{self._cache_key}|{entity}", load, field)

    def _option(self, key: str) -> int | None:
        value = self._options.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def _publish(self, visibility: NoteVisibility) -> int:
        side = "internal" if visibility is NoteVisibility.INTERNAL else "customer"
        override = self._option(f"autotask_publish_{side}_id")
        if override is not None:
            return override
        return self._picklist("TicketNotes", "publish").first_of(PUBLISH_LABELS[side], what=f"{side} publish value")

    def _note_type(self) -> int:
        override = self._option("autotask_note_type_id")
        if override is not None:
            return override
        return self._picklist("TicketNotes", "noteType").first_of(NOTE_TYPE_LABELS, what="note type")

    # --- the Provider interface ---------------------------------------------------------------
    def get_ticket(self, ticket_id: int) -> Ticket:
        body = self._call("GET", f"/Tickets/{ticket_id}", "get_ticket")
        if not isinstance(body, dict) or "item" not in body:
            raise PsaProtocolError("ticket reply had no item", operation="get_ticket")
        item = body["item"]
        if not isinstance(item, dict) or item.get("id") is None:  # Autotask: 200 {"item": null}
            raise E.PsaNotFound(f"ticket {ticket_id} not found", operation="get_ticket")
        status = to_int(item.get("status"))
        label = self._status_label(status)
        return Ticket(id=vendor_id(item["id"], "ticket reply", "get_ticket"), status_id=status, status_name=label, board_id=TENANT_BOARD,
                      closed=_closed(label) if label is not None else None)

    def _status_label(self, status: int | None) -> str | None:
        if status is None:
            return None
        try:
            return self._picklist("Tickets", "status").label(status)
        except E.PsaRateLimited:
            raise  # the PSA asks us to slow down: the runner's cooldown, not another call soon
        except E.PsaError:
            return None  # the name is a courtesy; the id is what we verify

    def update_status(self, ticket_id: int, status_id: int) -> Ticket:
        self._call("PATCH", "/Tickets", "update_status", json={"id": ticket_id, "status": status_id})
        # The reply is only {"itemId"}: report what we asked for; the caller re-reads.
        return Ticket(id=ticket_id, status_id=status_id, status_name=None, board_id=TENANT_BOARD)

    def post_note(self, ticket_id: int, text: str, visibility: NoteVisibility) -> PostedNote:
        publish = self._publish(visibility)
        body = {"ticketID": ticket_id, "title": TITLES[visibility], "description": text,
                "noteType": self._note_type(), "publish": publish}
        reply = self._call("POST", f"/Tickets/{ticket_id}/Notes", "post_note", json=body)
        item_id = vendor_id(reply.get("itemId") if isinstance(reply, dict) else None, "note reply", "post_note")
        return PostedNote(id=str(item_id), text=text, visibility=visibility)

    def list_recent_notes(self, ticket_id: int, limit: int = 50) -> list[PostedNote]:
        # The query API has no "newest first": read forward and keep the tail.
        notes = self.list_notes_after(ticket_id, "0")
        return list(reversed(notes[-max(limit, 1):]))

    def list_notes_after(self, ticket_id: int, after_id: str) -> list[PostedNote]:
        if not after_id.isdigit():
            raise ValueError(f"Autotask note ids are integers, got {after_id!r:.40}")
        internal = self._publish(NoteVisibility.INTERNAL)
        notes: list[PostedNote] = []
        cursor = int(after_id)
        for _ in range(NOTE_PAGES_MAX):
            query = {"filter": [{"op": "and", "items": [{"op": "eq", "field": "ticketID", "value": ticket_id},
                                                         {"op": "gt", "field": "id", "value": cursor}]}],
                     "MaxRecords": NOTE_PAGE_SIZE}
            body = self._call("POST", "/TicketNotes/query", "list_notes", json=query)
            items = body.get("items") if isinstance(body, dict) else None
            if not isinstance(items, list):
                raise PsaProtocolError("notes reply had no items list", operation="list_notes")
            page = sorted((_note(n, internal) for n in items), key=lambda n: int(n.id))
            notes += page
            if len(page) < NOTE_PAGE_SIZE:
                return notes
            last = int(page[-1].id)
            if int(page[0].id) <= cursor:  # the filter was ignored: paging would never end
                raise PsaProtocolError(f"notes reply for ticket {ticket_id} did not honour id gt {cursor}",
                                       operation="list_notes")
            cursor = last
        raise PsaProtocolError(f"ticket {ticket_id} has more than {NOTE_PAGES_MAX * NOTE_PAGE_SIZE} notes newer "
                               f"than note {after_id}", operation="list_notes")

    def list_statuses(self, board_id: int = TENANT_BOARD) -> list[BoardStatus]:
        """The tenant's ticket status picklist (`board_id` is ignored: statuses are tenant-wide)."""
        picklist = self._picklist("Tickets", "status")
        return [BoardStatus(id=v, name=label, closed=_closed(label), inactive=not active)
                for v, (label, active) in picklist.values.items()]


ZONE_LOOKUP_URL = "https://webservices2.autotask.net/ATServicesRest/V1.0"


def lookup_zone(username: str, lookup_url: str = ZONE_LOOKUP_URL) -> tuple[str, str]:
    """The API user's zone: (base URL ending in /V1.0, zone name). ZoneInformation needs no
    auth and is exempt from thread limits; done once, when the connection is added."""
    lookup_url = lookup_url.rstrip("/")
    session = pooled_session(f"autotask-zone|{lookup_url}", lookup_url)
    body = call(session, "GET", lookup_url + "/ZoneInformation", provider="autotask", operation="zone_lookup",
                headers={"Accept": "application/json"}, params={"user": username})
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise PsaProtocolError(f"ZoneInformation for {username!r:.80} had no zone URL", operation="zone_lookup")
    return url.rstrip("/") + "/V1.0", str(body.get("zoneName") or "")


def map_error(status: int, body: Any, operation: str | None = None) -> E.PsaError | None:
    """Autotask answers a business-rule refusal with HTTP 500 and {"errors": [...]}: the
    same request will fail the same way, so it is permanent. A bare 500 stays transient.
    The message is read (cleaned, cut) as every vendor message is (errors.vendor_message)."""
    if status != 500 or not isinstance(body, dict) or not body.get("errors"):
        return None
    message, code, _ = E.vendor_message(body)
    return E.PsaBusinessRuleError(message, status_code=status, vendor_code=code) if message else None


E.register_mapping("autotask", map_error)


def _picklists(body: Any, entity: str) -> dict[str, Picklist]:
    fields = body.get("fields") if isinstance(body, dict) else None
    if not isinstance(fields, list):
        raise PsaProtocolError(f"{entity} field information had no fields list", operation="list_statuses")
    out: dict[str, Picklist] = {}
    for f in fields:
        if not isinstance(f, dict) or not f.get("isPickList"):
            continue
        values: dict[int, tuple[str, bool]] = {}
        for v in f.get("picklistValues") or []:
            value = to_int(v.get("value")) if isinstance(v, dict) else None
            if value is not None:
                values[value] = (clean_line(v.get("label") or "", STATUS_NAME_LIMIT), bool(v.get("isActive", True)))
        out[str(f.get("name"))] = Picklist(f"{entity}.{f.get('name')}", values)
    return out


def _note(item: Any, internal_publish: int) -> PostedNote:
    if not isinstance(item, dict):
        raise PsaProtocolError("note was not an object", operation="list_notes")
    note_id = vendor_id(item.get("id"), "note", "list_notes")
    if to_int(item.get("publish")) == internal_publish:
        vis = NoteVisibility.INTERNAL
    elif item.get("title") == TITLES[NoteVisibility.DISCUSSION]:
        vis = NoteVisibility.DISCUSSION
    else:
        vis = NoteVisibility.RESOLUTION
    created = item.get("createDateTime")
    return PostedNote(id=str(note_id), text=clean_text(item.get("description") or ""), visibility=vis,
                      created_at=parse_iso(created) if isinstance(created, str) else None)


def _closed(label: str) -> bool:
    return label.strip().lower() in CLOSED_LABELS
