"""The sidecar (``preemptwatch watch``): one watcher per machine that marks every run
of the instance preempting, signals processes, runs a hook, posts a webhook, and serves
the notice to local processes over HTTP (``GET /v1/notice``, long-polling)."""

from __future__ import annotations

from .actions import ExecHook, SignalTargets, parse_signal
from .board import NoticeBoard
from .credentials import GCPIdentityToken, static_token
from .mark import InstanceMarker
from .service import DEFAULT_PORT, Sidecar, SidecarConfig
from .webhook import Webhook, load_template

__all__ = [
    "DEFAULT_PORT",
    "ExecHook",
    "GCPIdentityToken",
    "InstanceMarker",
    "NoticeBoard",
    "Sidecar",
    "SidecarConfig",
    "SignalTargets",
    "Webhook",
    "load_template",
    "parse_signal",
    "static_token",
]
