"""``preemptwatch watch``: bad input is refused with a clear message before anything
starts; the help text explains the options."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from preemptwatch.cli import build_parser, main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sources", "ec2,nope"], "unknown source 'nope'"),
        (["--signal", "SIGFOO"], "unknown signal"),
        (["--sources", "ec2,signal"], "cannot watch 'signal'"),
        (["--pid", "1"], "above 1"),
        (["--interval", "0"], "--interval must be positive"),
        (["--port", "70000"], "--port"),
        (["--webhook-template", "{}"], "--webhook-template needs --webhook"),
        (["--webhook", "http://127.0.0.1:9/x", "--webhook-template", "{bad"], "not valid JSON"),
        (
            ["--webhook", "http://127.0.0.1:9/x", "--webhook-template", '{"a": "${x}"}'],
            "unknown placeholder",
        ),
        (["--webhook", "hooks.example.com"], "http://"),
        (["--server", "http://127.0.0.1:9"], "PREEMPTWATCH_API_KEY"),
        (
            ["--webhook", "http://127.0.0.1:9/x", "--webhook-template", "@/no/such/file"],
            "No such file",
        ),
    ],
)
def test_bad_input_is_refused(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PREEMPTWATCH_API_KEY", raising=False)
    monkeypatch.delenv("PREEMPTWATCH_SERVER", raising=False)
    monkeypatch.delenv("PREEMPTWATCH_SOURCES", raising=False)
    assert main(["watch", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("preemptwatch watch: ") and message in err


def test_help_lists_every_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["watch", "--help"])
    out = capsys.readouterr().out
    for option in ("--server", "--pid-file", "--pgid", "--exec", "--webhook-template", "--port"):
        assert option in out
    assert "/v1/notice?wait=SECONDS" in out and "PREEMPTWATCH_SIDECAR_URL" in out


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "preemptwatch",
                "watch",
                "--sources",
                "ec2",
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert "address already in use" in result.stderr and "Traceback" not in result.stderr


def test_sources_from_the_environment_skip_what_the_sidecar_cannot_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from preemptwatch.cli.watch import build_config

    monkeypatch.setenv("PREEMPTWATCH_SOURCES", "signal,ec2,sidecar")
    config = build_config(build_parser().parse_args(["watch"]))
    assert config.sources == ["ec2"]
    monkeypatch.setenv("PREEMPTWATCH_SOURCES", "signal")
    assert build_config(build_parser().parse_args(["watch"])).sources is None
