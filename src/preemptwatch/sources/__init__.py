"""Sources of notices, one module each, loaded lazily by name."""

from __future__ import annotations

import importlib
from typing import Any

from .base import PollingSource, Sink, Source, SourceContext, SourceError

#: Source name -> "module:Class". A new source is one module and one line here.
REGISTRY: dict[str, str] = {
    "ec2": "preemptwatch.sources.ec2:EC2Source",
    "gcp": "preemptwatch.sources.gcp:GCPSource",
    "azure": "preemptwatch.sources.azure:AzureSource",
    "signal": "preemptwatch.sources.signals:SignalSource",
    "slurm": "preemptwatch.sources.slurm:SlurmSource",
    "sidecar": "preemptwatch.sources.sidecar:SidecarSource",
}

#: Sources that are probed over the network when none are named.
CLOUD_SOURCES = ("ec2", "gcp", "azure")


def source_class(name: str) -> type[Source]:
    """The class of the source called ``name``; ``ValueError`` for an unknown name."""
    try:
        target = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown source {name!r}; known sources: {', '.join(REGISTRY)}") from None
    module, _, attr = target.partition(":")
    cls: type[Source] = getattr(importlib.import_module(module), attr)
    return cls


def make_source(name: str, **options: Any) -> Source:
    """An instance of the source called ``name``."""
    return source_class(name)(**options)


__all__ = [
    "CLOUD_SOURCES",
    "REGISTRY",
    "PollingSource",
    "Sink",
    "Source",
    "SourceContext",
    "SourceError",
    "make_source",
    "source_class",
]
