"""Optional features name the extra to install when its packages are missing."""

from __future__ import annotations

import pytest

from preemptwatch.errors import ConfigError
from preemptwatch.extras import import_extra


def test_a_missing_extra_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match=r"--sqs-queue needs the 'aws' extra: pip install "):
        import_extra("preemptwatch_no_such_module", "aws", "--sqs-queue")


def test_an_installed_extra_is_imported() -> None:
    assert import_extra("json", "aws", "anything").dumps([1]) == "[1]"
