"""PSA providers behind one interface, and the registry that names them."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from providers.autotask import AutotaskProvider
from providers.base import BoardStatus, Credentials, PostedNote, Provider, Ticket
from providers.connectwise import ConnectWiseProvider
from providers.errors import PsaError
from providers.halo import HaloProvider

REGISTRY: dict[str, type] = {"connectwise": ConnectWiseProvider, "autotask": AutotaskProvider,
                             "halo": HaloProvider}


class UnknownProviderError(ValueError):
    pass


def provider_for(name: str, credentials: Credentials, options: Mapping[str, Any] | None = None) -> Provider:
    """`options`: the account's preferences named in the provider's `option_keys` (tenant
    picklist overrides, email on notes...: tasks.admin.options_from); every provider takes
    the argument, one without option_keys ignores it."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise UnknownProviderError(f"unknown PSA provider {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return cls(credentials, options)


__all__ = ["BoardStatus", "Credentials", "PostedNote", "Provider", "PsaError", "REGISTRY", "Ticket",
           "UnknownProviderError", "provider_for"]
