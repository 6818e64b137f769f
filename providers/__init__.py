"""PSA providers behind one interface, and the registry that names them."""
from __future__ import annotations

from providers.autotask import AutotaskProvider
from providers.base import BoardStatus, Credentials, PostedNote, Provider, Ticket
from providers.connectwise import ConnectWiseProvider
from providers.errors import PsaError
from providers.halo import HaloProvider

REGISTRY: dict[str, type] = {"connectwise": ConnectWiseProvider, "autotask": AutotaskProvider,
                             "halo": HaloProvider}


class UnknownProviderError(ValueError):
    pass


def provider_for(name: str, credentials: Credentials) -> Provider:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise UnknownProviderError(f"unknown PSA provider {name!r}; known: {', '.join(sorted(REGISTRY))}") from None
    return cls(credentials)


__all__ = ["BoardStatus", "Credentials", "PostedNote", "Provider", "PsaError", "REGISTRY", "Ticket",
           "UnknownProviderError", "provider_for"]
