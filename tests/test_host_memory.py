"""Freed host arrays are reused without new page faults (distprop.host_memory)."""

import platform
import subprocess
import sys

import pytest

from distprop import host_memory

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="platform: the malloc tuning applies to glibc only")

# Allocates, touches and frees three 8 MiB arrays (a step's activations, say) once to
# warm up, then counts the minor page faults of doing it again. glibc's default
# gives the 24 MiB back to the kernel each time (more than twice its threshold, which
# has risen to 8 MiB, is free at the top of the heap).
_FAULTS_OF_A_REUSED_ARRAY = """
import resource, numpy as np
import distprop
from distprop import host_memory

def cycle():
    arrays = [np.empty(2 << 20, np.float32) for _ in range(3)]
    for a in arrays:
        a.fill(1.0)
    del arrays, a

cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(host_memory.retain_freed_memory(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value):
    env = {"DISTPROP_RETAIN_HOST_MEMORY": env_value, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_ARRAY], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_freed_arrays_are_reused_without_page_faults():
    applied, faults = _faults("1")
    assert applied
    assert faults < 500  # fresh pages would be 5 * 3 * 2048 faults


@glibc_only
def test_opting_out_leaves_malloc_alone():
    applied, faults = _faults("0")
    assert not applied
    if faults < 5000:
        pytest.skip(f"platform: this glibc kept the memory by itself ({faults} faults): nothing to compare")
    # glibc's default gave much of the 24 MiB back: fresh pages again on every cycle
    assert _faults("1")[1] < faults / 10


class _FakeMallopt:
    """Stands in for libc's mallopt: records the calls, accepts mmap thresholds up to `cap`."""

    def __init__(self, cap):
        self.cap, self.calls = cap, []

    def __call__(self, parameter, value):
        self.calls.append((parameter, value))
        return int(parameter != host_memory._M_MMAP_THRESHOLD or value <= self.cap)


@pytest.fixture
def fake_libc(monkeypatch):
    def install(cap):
        fake = _FakeMallopt(cap)
        monkeypatch.setattr(host_memory, "_applied", False)
        monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: type("Libc", (), {"mallopt": fake})())
        monkeypatch.setattr(host_memory.platform, "system", lambda: "Linux")
        monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.17"))
        monkeypatch.delenv("DISTPROP_RETAIN_HOST_MEMORY", raising=False)
        return fake
    return install


def test_an_older_glibc_gets_the_32_mib_mmap_threshold(fake_libc):
    fake = fake_libc(cap=32 << 20)
    assert host_memory.retain_freed_memory()
    mmap, trim = host_memory._M_MMAP_THRESHOLD, host_memory._M_TRIM_THRESHOLD
    assert fake.calls == [(mmap, 256 << 20), (mmap, 32 << 20), (trim, 1 << 30)]


def test_malloc_is_left_alone_when_no_mmap_threshold_is_accepted(fake_libc):
    fake = fake_libc(cap=0)
    assert not host_memory.retain_freed_memory()
    assert all(parameter == host_memory._M_MMAP_THRESHOLD for parameter, _ in fake.calls)  # no trim threshold
