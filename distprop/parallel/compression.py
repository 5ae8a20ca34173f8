"""Gradient compression on the wire: fp16 or bf16 instead of the gradient's dtype.

Each rank divides by the number of ranks *before* casting (a sum of N large
gradients could overflow fp16's range where their mean does not), reduces the
narrow values, and widens the result back into the gradient buffer.
"""

from __future__ import annotations

import numpy as np

from distprop.backend import get_array_module


class NoCompression:
    """Reduce the gradient buffer itself; divide by the rank count afterwards."""

    name = "none"
    wire_dtype = None
    reduce_op = "sum"

    def compress(self, buffer, wire, size):
        pass  # the wire is the buffer

    def decompress(self, wire, buffer, size):
        buffer *= buffer.dtype.type(1.0 / size)


class FP16Compression:
    name = "fp16"
    wire_dtype = np.dtype(np.float16)
    reduce_op = "sum"

    def compress(self, buffer, wire, size):
        get_array_module(buffer).multiply(buffer, 1.0 / size, out=wire, casting="same_kind")

    def decompress(self, wire, buffer, size):
        buffer[...] = wire


class BF16Compression:
    """bfloat16 kept as its 16 raw bits in uint16 arrays (numpy has no bfloat16):
    the top half of a float32, rounded to nearest even."""

    name = "bf16"
    wire_dtype = np.dtype(np.uint16)
    reduce_op = "bf16_sum"  # a sum of the bfloat16 values the bits encode

    def compress(self, buffer, wire, size):
        scaled = (buffer * (1.0 / size)).astype(np.float32, copy=False)
        wire[...] = float32_to_bf16_bits(scaled)

    def decompress(self, wire, buffer, size):
        buffer[...] = bf16_bits_to_float32(wire)


def float32_to_bf16_bits(values):
    bits = values.view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def bf16_bits_to_float32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def mpi_bf16_sum_op():
    """An MPI reduction op that adds uint16 buffers holding bfloat16 bits (MPI has no
    bfloat16 type). Created once per process."""
    global _BF16_SUM
    if _BF16_SUM is None:
        from mpi4py import MPI

        def add(inbuf, inoutbuf, datatype):
            a = np.frombuffer(inbuf, dtype=np.uint16)
            b = np.frombuffer(inoutbuf, dtype=np.uint16)
            b[...] = float32_to_bf16_bits(bf16_bits_to_float32(a) + bf16_bits_to_float32(b))

        _BF16_SUM = MPI.Op.Create(add, commute=True)
    return _BF16_SUM


_BF16_SUM = None

COMPRESSIONS = {"none": NoCompression, "fp16": FP16Compression, "bf16": BF16Compression}


def get_compression(name):
    if name is None:
        name = "none"
    if name not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {name!r}")
    return COMPRESSIONS[name]()
