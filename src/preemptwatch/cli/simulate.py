"""``preemptwatch simulate {ec2,gcp,azure}``: a local metadata service to rehearse with."""

from __future__ import annotations

import argparse
import asyncio
import logging

from ..simulate import PROVIDERS, serve, simulator_module

log = logging.getLogger("preemptwatch.simulate")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``simulate`` and one sub-subcommand per provider."""
    parser = sub.add_parser(
        "simulate",
        help="serve a local EC2, GCP or Azure metadata service that can schedule notices",
        description="Serve a metadata service faithful to the provider's, on loopback. "
        "Schedule a notice with the flags below or over HTTP under /_control/.",
    )
    providers = parser.add_subparsers(dest="provider", metavar="PROVIDER", required=True)
    for name in PROVIDERS:
        module = simulator_module(name)
        p = providers.add_parser(name, help=module.__doc__.strip().splitlines()[0])
        p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
        p.add_argument("--port", type=int, default=8111, help="port (default: %(default)s)")
        module.add_arguments(p)
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted."""
    module = simulator_module(args.provider)
    simulator = module.from_args(args)

    async def main() -> None:
        runner = await serve(simulator.app(), args.host, args.port)
        host, port = runner.addresses[0][:2]
        print(f"{args.provider} metadata simulator on http://{host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return 0
