"""``preemptwatch watch``: the per-machine sidecar."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..notice import SOURCE_NAMES

if TYPE_CHECKING:
    from ..sidecar import SidecarConfig

log = logging.getLogger("preemptwatch.sidecar")

#: Sources that make no sense in the sidecar itself.
NOT_HERE = ("signal", "sidecar")

DESCRIPTION = """\
Watch this machine for preemption and act on the first notice that counts:
  * mark every running run of this instance preempting on the server
    (POST /api/v1/instances/{id}/preempting; retried, and spooled to disk so a mark
    is delivered once the server is back);
  * send a signal to PIDs, PID files or process groups;
  * run a hook with the notice in its environment (PREEMPTWATCH_NOTICE as JSON, and
    PREEMPTWATCH_NOTICE_{SOURCE,KIND,ID,DEADLINE,SECONDS_LEFT}, PREEMPTWATCH_INSTANCE_ID);
  * POST a webhook built from a JSON template.
Local processes (containers too) learn of the notice from
  GET http://HOST:PORT/v1/notice?wait=SECONDS
which answers as soon as a notice arrives (set PREEMPTWATCH_SIDECAR_URL=http://HOST:PORT
for start_watcher() to use it). /healthz and Prometheus /metrics are served alongside.
"""

EPILOG = """\
webhook templates are JSON; string values may use ${notice} ${source} ${kind} ${id}
${deadline} ${seconds_left} ${detected_at} ${instance_id} ${hostname}. A string that is
exactly one placeholder becomes its value ("${notice}" -> the notice object).

examples:
  preemptwatch watch --server https://pw.example.com --pid-file /run/train.pid
  preemptwatch watch --sources ec2 --host 0.0.0.0 --exec /usr/local/bin/drain.sh
  preemptwatch watch --webhook https://hooks.example.com/x --webhook-template '{"t": "${kind}"}'
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``watch``."""
    p = sub.add_parser(
        "watch",
        help="run the per-machine sidecar: mark runs, signal, hook, webhook, serve the notice",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to watch")
    usable = ", ".join(n for n in SOURCE_NAMES if n not in NOT_HERE)
    g.add_argument(
        "--sources",
        metavar="NAMES",
        help=f"comma-separated sources ({usable}); "
        "default: PREEMPTWATCH_SOURCES, else whichever cloud metadata service answers",
    )
    g.add_argument(
        "--interval",
        type=float,
        metavar="SECONDS",
        help="poll interval in seconds (source default)",
    )
    g.add_argument(
        "--count-rebalance", action="store_true", help="act on EC2 rebalance recommendations"
    )
    g.add_argument(
        "--maintenance-lead",
        type=float,
        metavar="SECONDS",
        default=600.0,
        help="act on maintenance events due within this many seconds (default: %(default)s)",
    )

    g = p.add_argument_group("local notice server")
    g.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s; 0.0.0.0 for pods on a host-network node)",
    )
    g.add_argument("--port", type=int, default=None, metavar="PORT", help="port (default: 8474)")

    g = p.add_argument_group("marking runs on the server")
    g.add_argument(
        "--server",
        default=os.environ.get("PREEMPTWATCH_SERVER"),
        metavar="URL",
        help="server URL (default: PREEMPTWATCH_SERVER); without it no run is marked",
    )
    g.add_argument(
        "--gcp-identity-audience",
        metavar="AUDIENCE",
        help="authenticate with this GCE VM's identity token for AUDIENCE instead of "
        "PREEMPTWATCH_API_KEY",
    )
    g.add_argument(
        "--instance-id",
        metavar="ID",
        help="this machine's instance ID (default: from the metadata service)",
    )
    g.add_argument(
        "--spool-dir",
        type=Path,
        metavar="DIR",
        help="where undelivered marks wait (default: $STATE_DIRECTORY/spool or "
        "~/.local/state/preemptwatch/spool)",
    )

    g = p.add_argument_group("signalling processes")
    g.add_argument(
        "--signal", default="TERM", metavar="SIG", help="signal to send (default: %(default)s)"
    )
    g.add_argument("--pid", type=int, action="append", default=[], help="a PID (repeatable)")
    g.add_argument(
        "--pid-file",
        type=Path,
        metavar="FILE",
        action="append",
        default=[],
        help="a file holding a PID, read at notice time (repeatable)",
    )
    g.add_argument(
        "--pgid", type=int, action="append", default=[], help="a process group (repeatable)"
    )

    g = p.add_argument_group("hook and webhook")
    g.add_argument(
        "--exec",
        dest="exec_cmd",
        metavar="COMMAND",
        help="command to run on a notice (shell words)",
    )
    g.add_argument(
        "--exec-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="kill the hook after this (seconds)",
    )
    g.add_argument("--webhook", metavar="URL", help="URL to POST the notice to")
    g.add_argument(
        "--webhook-template",
        metavar="JSON",
        help="JSON body template, inline or @FILE (default: a short text and the notice)",
    )
    g.add_argument(
        "--webhook-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="per attempt (default: %(default)s)",
    )
    g.add_argument(
        "--webhook-attempts",
        type=int,
        default=5,
        metavar="N",
        help="tries at most (default: %(default)s)",
    )
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> SidecarConfig:
    """A `SidecarConfig` from the arguments; ``ValueError`` on bad input."""
    from ..sidecar import (
        DEFAULT_PORT,
        ExecHook,
        GCPIdentityToken,
        SidecarConfig,
        SignalTargets,
        Webhook,
        load_template,
        parse_signal,
        static_token,
    )
    from ..sidecar.credentials import TokenSource
    from ..sidecar.service import default_spool_dir
    from ..sources import REGISTRY

    sources_text = args.sources or os.environ.get("PREEMPTWATCH_SOURCES", "")
    sources = [s.strip() for s in sources_text.split(",") if s.strip()] or None
    if sources and not args.sources:
        # PREEMPTWATCH_SOURCES is often set for the training processes too: keep what
        # applies to the sidecar.
        skipped = [n for n in sources if n in NOT_HERE]
        if skipped:
            log.warning("ignoring %s from PREEMPTWATCH_SOURCES in the sidecar", skipped)
        sources = [n for n in sources if n not in NOT_HERE] or None
    for name in sources or []:
        if name not in REGISTRY:
            raise ValueError(f"unknown source {name!r}; known: {', '.join(REGISTRY)}")
        if name in NOT_HERE:
            raise ValueError(
                f"the sidecar cannot watch {name!r}: its own SIGTERM means stop, and it "
                "would watch itself; use the cloud sources (ec2, gcp, azure) or slurm"
            )
    if args.interval is not None and args.interval <= 0:
        raise ValueError("--interval must be positive")
    port = DEFAULT_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise ValueError("--port must be between 0 and 65535")
    token: TokenSource | None = None
    if args.server:
        if args.gcp_identity_audience:
            token = GCPIdentityToken(args.gcp_identity_audience)
        else:
            key = os.environ.get("PREEMPTWATCH_API_KEY")
            if not key:
                raise ValueError(
                    "--server needs PREEMPTWATCH_API_KEY, or --gcp-identity-audience on GCE"
                )
            token = static_token(key)
    targets = SignalTargets(
        sig=parse_signal(args.signal),
        pids=args.pid,
        pid_files=args.pid_file,
        pgids=args.pgid,
    )
    hook = None
    if args.exec_cmd:
        hook = ExecHook(shlex.split(args.exec_cmd), timeout=args.exec_timeout)
    webhook = None
    if args.webhook:
        template_text = args.webhook_template
        if template_text and template_text.startswith("@"):
            template_text = Path(template_text[1:]).read_text()
        kwargs = {"template": load_template(template_text)} if template_text else {}
        webhook = Webhook(
            args.webhook, timeout=args.webhook_timeout, attempts=args.webhook_attempts, **kwargs
        )
    elif args.webhook_template:
        raise ValueError("--webhook-template needs --webhook")
    return SidecarConfig(
        sources=sources,
        interval=args.interval,
        count_rebalance=args.count_rebalance,
        maintenance_lead=args.maintenance_lead,
        host=args.host,
        port=port,
        server=args.server,
        token=token,
        instance_id=args.instance_id,
        spool_dir=args.spool_dir or default_spool_dir(),
        signals=targets if targets else None,
        exec_hook=hook,
        webhook=webhook,
    )


def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM or SIGINT."""
    from ..sidecar import Sidecar

    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        print(f"preemptwatch watch: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        sidecar = Sidecar(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        url = await sidecar.start()
        print(f"preemptwatch sidecar on {url}", flush=True)
        try:
            await stop.wait()
        finally:
            await sidecar.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"preemptwatch watch: {exc}", file=sys.stderr)
        return 1
    return 0
