"""Freed host arrays are reused without new page faults (distprop.host_memory)."""

import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="the malloc tuning applies to glibc only")

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
        pytest.skip(f"this glibc kept the memory by itself ({faults} faults): nothing to compare")
    # glibc's default gave much of the 24 MiB back: fresh pages again on every cycle
    assert _faults("1")[1] < faults / 10
