"""The host allocator knob: parsed like every byte size, ``0`` leaves glibc alone, a bad value names the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longfit.runtime import host_memory


def test_keep_bytes_parses_units_and_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LONGFIT_MALLOC_KEEP", raising=False)
    assert host_memory.keep_bytes() == host_memory.DEFAULT_KEEP
    monkeypatch.setenv("LONGFIT_MALLOC_KEEP", "64MiB")
    assert host_memory.keep_bytes() == 64 << 20
    monkeypatch.setenv("LONGFIT_MALLOC_KEEP", "0")
    assert host_memory.keep_bytes() == 0


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LONGFIT_MALLOC_KEEP", "lots")
    with pytest.raises(ValueError, match="LONGFIT_MALLOC_KEEP"):
        host_memory.keep_bytes()


@pytest.mark.parametrize("keep, applied", [("0", False), ("", None)])
def test_configure_once_per_process(keep: str, applied: bool | None) -> None:
    """Run in a fresh interpreter: the setting is process-wide and cached. With ``0`` nothing is applied; with the
    default it is applied exactly where glibc is the C library."""
    code = ("import platform; from longfit.runtime.host_memory import configure_host_allocator as c; "
            "print(c(), c() is c(), platform.libc_ver()[0])")
    env = {"LONGFIT_MALLOC_KEEP": keep, "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    result, same, libc = out.split()
    assert same == "True"
    assert result == str(applied if applied is not None else libc == "glibc")
