"""``preemptwatch run [options] -- CMD``: run a command under supervision."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..sources.signals import parse_signal


def _signal(value: str) -> object:
    try:
        return parse_signal(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run``."""
    parser = sub.add_parser(
        "run",
        help="run a command, forward preemption signals to it, requeue SLURM jobs",
        description="Run CMD in its own process group, watch for preemption (SLURM's "
        "--signal warning and SIGTERM inside a job, signals elsewhere), forward signals to "
        "it, report its exit code to the run server and exit with that code. Inside a "
        "SLURM job the command gets a run ID that survives requeues, and the job is "
        "requeued after a time-limit warning or an early exit after preemption.",
        usage="preemptwatch run [options] -- CMD [ARGS...]",
    )
    parser.add_argument(
        "--signal",
        dest="warning_signal",
        type=_signal,
        default="SIGUSR1",
        metavar="SIG",
        help="the job's --signal warning signal (default: %(default)s)",
    )
    parser.add_argument(
        "--forward-signal",
        type=_signal,
        default=None,
        metavar="SIG",
        help="signal the command gets for a warning or SIGTERM (default: the one received)",
    )
    parser.add_argument(
        "--no-forward", action="store_true", help="do not pass signals on to the command"
    )
    parser.add_argument(
        "--no-requeue",
        action="store_true",
        help="never requeue the SLURM job from the wrapper",
    )
    parser.add_argument(
        "--requeue-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="give up on `scontrol requeue` after this long (default: %(default)s)",
    )
    parser.add_argument(
        "--requeue-margin",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after a time-limit warning, requeue this long before the limit if the "
        "command still runs (default: %(default)s)",
    )
    parser.add_argument("--server", help="run server URL (default: $PREEMPTWATCH_SERVER)")
    parser.add_argument("--api-key", help="API key (default: $PREEMPTWATCH_API_KEY)")
    parser.add_argument("--project", help="project (default: $PREEMPTWATCH_PROJECT)")
    parser.add_argument(
        "--id",
        dest="run_id",
        help="run ID (default: $PREEMPTWATCH_RUN_ID; in SLURM, cluster name + job ID)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Supervise the command; return its exit code."""
    from ..wrapper import Wrapper, WrapperConfig

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        config = WrapperConfig(
            command=command,
            warning_signal=args.warning_signal,
            forward_signal=args.forward_signal,
            forward=not args.no_forward,
            requeue=not args.no_requeue,
            requeue_timeout=args.requeue_timeout,
            requeue_margin=args.requeue_margin,
            server=args.server,
            api_key=args.api_key,
            project=args.project,
            run_id=args.run_id,
        )
        wrapper = Wrapper(config)
    except (ValueError, ConfigError) as exc:
        raise SystemExit(f"preemptwatch run: {exc}") from None
    return wrapper.run()
