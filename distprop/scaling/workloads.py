"""What a rank computes per step, for the cost model: reference models of published
sizes, or a model measured on this machine (distprop.scaling.calibrate).

A workload holds the per-rank batch, the compute time of forward and backward, the
optimizer's time, and its gradients in the order backward finishes them, each with
the fraction of backward done at that moment (`ready`). For the reference models
the gradients are a continuum produced at an even rate over backward -- the
measured workloads show where that assumption is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distprop.errors import UserError


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    batch: int  # samples (or tokens) per rank per step
    unit: str  # what batch counts: 'samples', 'images', 'tokens'
    forward_s: float
    backward_s: float
    optimizer_s: float = 0.0
    data_s: float = 0.0
    # (bytes, fraction of backward done when the gradient is final), in backward's order
    gradients: tuple = field(default=())
    source: str = ""
    # Buckets as DataParallel lays them out, (bytes, ready), where measured.
    buckets: tuple | None = None
    # A rank's step alone on the machine, where measured (else compute_s): efficiency's base.
    single_rank_s: float | None = None

    @property
    def gradient_bytes(self) -> int:
        return int(sum(size for size, _ in self.gradients))

    @property
    def compute_s(self) -> float:
        return self.data_s + self.forward_s + self.backward_s + self.optimizer_s


def even_gradients(total_bytes: int, pieces: int = 200) -> tuple:
    """A model's gradients as `pieces` equal parts finished at an even rate over backward."""
    size = total_bytes / pieces
    return tuple((size, (i + 1) / pieces) for i in range(pieces))


def _reference(name, description, params, batch, unit, seconds_per_unit, source, optimizer_bytes_per_param=16,
               memory_bandwidth=1.55e12):
    """Training is about 3x the forward: one third forward, two thirds backward. The
    optimizer reads and writes parameters, gradients and momentum: about 16 bytes a
    parameter at the device's memory bandwidth (A100: 1.55 TB/s)."""
    compute = batch * seconds_per_unit
    return Workload(name=name, description=description, batch=batch, unit=unit, forward_s=compute / 3,
                    backward_s=compute * 2 / 3, optimizer_s=params * optimizer_bytes_per_param / memory_bandwidth,
                    gradients=even_gradients(params * 4), source=source)


REFERENCES = {
    "resnet50": _reference(
        "resnet50", "ResNet-50 (25.6M parameters, 102 MB fp32 gradients), A100 AMP, batch 256 per GPU",
        25_557_032, 256, "images", 1 / 2470,
        "2470 img/s per A100 with AMP (NVIDIA DeepLearningExamples, ResNet-50 v1.5)"),
    "gpt2-small": _reference(
        "gpt2-small", "GPT-2 small (124M parameters, 498 MB fp32 gradients), A100, 8 x 1024 tokens per GPU",
        124_439_808, 8 * 1024, "tokens", 1 / 108_000,
        "about 108k tokens/s per A100 (derived from nanoGPT's 4 days for 300B tokens on 8 A100s)"),
}

# Published scaling figures, with their setups (reference notes on scaling models).
PUBLISHED = (
    ("Horovod", "ResNet-101 / Inception V3: 90%, VGG-16: 68% at 512 GPUs",
     "128 servers x 4 Pascal GPUs, RoCE 25 Gb/s, batch 64 per GPU, synthetic data", "eth-25", 512, 0.90),
    ("Goyal et al. 2017", "ResNet-50: ~90% from 8 to 256 GPUs",
     "Caffe2, 32 x 8 P100, commodity Ethernet", "eth-25", 256, 0.90),
    ("ChainerMN", "ResNet-50: 90% at 128 GPUs", "P100 cluster", "ib-100", 128, 0.90),
    ("NVIDIA DeepLearningExamples", "ResNet-50 AMP: 6.72x on 8 A100 (84%)",
     "one DGX A100, NVLink, DALI input, batch 256 per GPU", "nvlink", 8, 0.84),
    ("NVIDIA DeepLearningExamples", "BERT-large seq128 AMP: 30.37x from 1 to 32 DGX A100 nodes (95%)",
     "fixed global batch, 8 A100 per node, InfiniBand", "ib-200", 256, 0.95),
    ("Zhang et al. 2020", "Horovod 56-76% at 64 GPUs", "AWS 8-GPU nodes, 100 Gb/s", "eth-100", 64, 0.66),
)


def reference(name: str) -> Workload:
    if name not in REFERENCES:
        raise UserError(f"--model: unknown reference model {name!r}; choose from {', '.join(REFERENCES)} "
                        "or give --calibration FILE for the model measured here")
    return REFERENCES[name]


def from_calibration(calibration: dict) -> Workload:
    """The workload measured on this machine (per rank, no communication, cores full)."""
    w = calibration["workload"]
    return Workload(name=w["name"], description=w["description"], batch=w["batch"], unit="samples",
                    forward_s=w["forward_s"], backward_s=w["backward_s"], optimizer_s=w["optimizer_s"],
                    gradients=tuple((g["bytes"], g["ready"]) for g in w["gradients"]),
                    buckets=tuple((b["bytes"], b["ready"]) for b in w["buckets"]),
                    single_rank_s=calibration.get("single_rank_step_s"),
                    source=f"measured at {calibration['ranks']} ranks with no communication")
