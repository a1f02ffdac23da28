"""The C kernels' build (``runtime.native``): cached per source, flags, compiler and CPU; a missing or failing
compiler, or ``LONGFIT_NATIVE=0``, leaves the torch path in charge instead of raising."""

from __future__ import annotations

import pytest
import torch

from longfit.models.paged_decode import paged_decode_attention
from longfit.runtime import native

needs_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache and an unloaded library; the cached library is restored afterwards."""
    monkeypatch.setenv("LONGFIT_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


@needs_cc
def test_builds_once_into_the_cache(fresh):
    assert native.library() is not None
    built = list((fresh / "kernels").glob("paged_decode-*.so"))
    assert len(built) == 1 and not list((fresh / "kernels").glob("*.so.*"))  # no partial files left
    stamp = built[0].stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_no_compiler_means_torch_path(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    q, pool = torch.zeros(1, 3, 8, dtype=torch.bfloat16), torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16)
    assert not native.paged_decode_supported(q, pool)
    with pytest.raises(RuntimeError, match="not available"):
        paged_decode_attention(q, pool, torch.ones(1, 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                               torch.ones(1, dtype=torch.int64), 1.0, native=True)


@needs_cc
def test_compiler_without_openmp_still_builds(fresh, monkeypatch, tmp_path):
    """A compiler that rejects -fopenmp (Apple's clang): the kernel is built without it and gives the same result."""
    real = native._compiler()
    picky = tmp_path / "cc"
    picky.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec {real} "$@"\n')
    picky.chmod(0o755)
    monkeypatch.setenv("CC", str(picky))
    assert native.library() is not None
    q = torch.randn(2, 6, 64).to(torch.bfloat16)
    pool = torch.randn(9, 2, 8, 2, 64).to(torch.bfloat16)
    args = (q, pool, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), torch.zeros(2, dtype=torch.int64),
            torch.tensor([30, 17]), 0.125, None)
    got = paged_decode_attention(*args, native=True)
    want = paged_decode_attention(*args, native=False)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


@needs_cc
def test_failing_compiler_is_logged_not_raised(fresh, monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'cc: internal error' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert native.library() is None
    assert "internal error" in caplog.text
    assert not list((fresh / "kernels").glob("*.so"))


@needs_cc
def test_env_var_turns_the_kernel_off(monkeypatch):
    q, pool = torch.zeros(1, 3, 8, dtype=torch.bfloat16), torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16)
    assert native.paged_decode_supported(q, pool)
    assert not native.paged_decode_supported(q, pool[:, :, :2])  # never a strided view
    assert not native.paged_decode_supported(q, pool.half())  # bf16 and fp32 pools only
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert not native.paged_decode_supported(q, pool)


def test_key_splits():
    assert native.key_splits(1, 128, 1) == 1  # one thread: no merge
    assert native.key_splits(1, 128, 2) == 8  # 4 items per thread
    assert native.key_splits(1, 8, 2) == 2  # at least 4 pages a split
    assert native.key_splits(16, 128, 2) == 1  # rows enough
