"""Settings: run-ID normalisation, resume modes, environment defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from preemptwatch.client.settings import (
    DEFAULT_SERVER,
    Settings,
    normalize_resume,
    normalize_run_id,
    normalize_server,
    spool_dir,
)
from preemptwatch.errors import ConfigError


def test_run_id_non_word_characters_become_dashes() -> None:
    assert normalize_run_id("my run/v1.2") == "my-run-v1-2"
    assert normalize_run_id("ok_id-7") == "ok_id-7"


def test_run_id_of_64_characters_is_kept_65_refused() -> None:
    assert normalize_run_id("a" * 64) == "a" * 64
    with pytest.raises(ConfigError, match="at most 64"):
        normalize_run_id("a" * 65)


def test_empty_run_id_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        normalize_run_id("")


@pytest.mark.parametrize(
    ("given", "mode"),
    [(None, "never"), (False, "never"), (True, "auto"), ("MUST", "must"), ("allow", "allow")],
)
def test_resume_modes(given: str | bool | None, mode: str) -> None:
    assert normalize_resume(given) == mode


def test_unknown_resume_mode_is_refused() -> None:
    with pytest.raises(ConfigError, match="resume must be one of"):
        normalize_resume("sometimes")


def test_server_url_must_be_http() -> None:
    assert normalize_server("http://h:1/") == "http://h:1"
    with pytest.raises(ConfigError):
        normalize_server("h:1")


def test_environment_fills_what_arguments_leave_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SERVER", "http://srv:9")
    monkeypatch.setenv("PREEMPTWATCH_API_KEY", "k")
    monkeypatch.setenv("PREEMPTWATCH_PROJECT", "p")
    monkeypatch.setenv("PREEMPTWATCH_RUN_ID", "run one")
    monkeypatch.setenv("PREEMPTWATCH_RESUME", "allow")
    monkeypatch.setenv("PREEMPTWATCH_SWEEP_ID", "sw")
    settings = Settings.resolve()
    assert settings == Settings("http://srv:9", "k", "p", "run-one", "allow", "sw")
    assert Settings.resolve(run_id="x", resume="must").run_id == "x"
    assert Settings.resolve(resume="must").resume == "must"


def test_defaults_without_environment() -> None:
    settings = Settings.resolve()
    assert settings.server == DEFAULT_SERVER
    assert settings.resume == "never"
    assert settings.run_id is None


def test_spool_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREEMPTWATCH_SPOOL_DIR", str(tmp_path / "s"))
    assert spool_dir() == tmp_path / "s"
    monkeypatch.delenv("PREEMPTWATCH_SPOOL_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert spool_dir() == tmp_path / "state" / "preemptwatch" / "spool"
