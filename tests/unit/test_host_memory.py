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


def test_release_free_heap_returns_freed_pages_to_the_os() -> None:
    """In a fresh interpreter with the retained-top policy on: 64 MiB freed in 4 MiB blocks (below the 32 MiB mmap
    threshold, so they stay in the heap) stay resident until ``release_free_heap`` runs, which then gives at least
    half of them back; a ``min_free`` above what the heap holds leaves them. Elsewhere than glibc: nothing runs."""
    code = """
import platform
from longfit.runtime import host_memory as h
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) << 10
if platform.libc_ver()[0] != 'glibc':
    print('skip', h.release_free_heap()); raise SystemExit
h.configure_host_allocator()
blocks = [bytearray(4 << 20) for _ in range(16)]  # zero-filled: every page touched
del blocks
before = rss()
kept = h.release_free_heap(min_free=1 << 40)
middle = rss()
trimmed = h.release_free_heap()
print(kept, trimmed, before - middle, before - rss(), hasattr(h._glibc(), 'mallinfo2'))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "skip":
        assert out[1] == "False"
        return
    kept, trimmed, dropped_early, dropped, counts_free = out
    assert trimmed == "True" and int(dropped) >= 32 << 20
    if counts_free == "True":  # glibc 2.33+: it knows the heap holds less than min_free, and leaves it
        assert kept == "False" and int(dropped_early) < 8 << 20
