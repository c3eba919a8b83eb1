"""Tests that need an external tool fail in CI when it is missing, and skip only on a laptop."""

from __future__ import annotations

import pytest

import tests.conftest as conftest


def test_missing_tool_fails_in_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        conftest.require_tool(False, "redis-server")


def test_missing_tool_skips_on_a_laptop(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_tool(False, "redis-server")
    conftest.require_tool(True, "redis-server")  # present: neither
