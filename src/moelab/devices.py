"""Accelerator datasheet figures: the one table for MFU (telemetry) and the planner's serving view.

Peaks are dense TFLOP/s (no 2:4 sparsity: NVIDIA's datasheets print the sparse figure, twice
the dense one, and mark it with an asterisk): "bf16"/"fp16" on the tensor cores, "fp32" plain
FP32 on the CUDA cores (PyTorch's default matmul precision), not TF32. Bandwidth is the memory
bandwidth of the variant named in `name`. Sources, NVIDIA's product pages and datasheets:

  H100 SXM / H100 NVL: nvidia.com/en-us/data-center/h100 (BF16 1,979* / 1,671*, FP32 67 / 60;
    3.35 / 3.9 TB/s; 80 / 94 GB). H100 PCIe (datasheet PB-11133-001): BF16 1,513*, FP32 51,
    2.0 TB/s. H800 SXM5 and H800 PCIe: the H100 SXM and H100 PCIe figures (same GH100 parts;
    NVLink and FP64 are what differ).
  H200 SXM / H200 NVL: nvidia.com/en-us/data-center/h200 (BF16 1,979* / 1,671*, FP32 67 / 60;
    4.8 TB/s; 141 GB).
  A100 and A800 (80GB SXM): nvidia.com/en-us/data-center/a100 datasheet (BF16 312 dense, 624*;
    FP32 19.5; 2,039 GB/s). The A800 is the A100 with narrower NVLink; PCIe and 40 GB
    variants have the same peaks and less bandwidth (1,935 / 1,555 GB/s).
  L40S: datasheet (BF16 362.05, 733*; FP32 91.6; 864 GB/s; 48 GB).
  L4: nvidia.com/en-us/data-center/l4 (BF16 242*; FP32 30.3; 300 GB/s; 24 GB).
  A10: datasheet (BF16 125, 250*; FP32 31.2; 600 GB/s; 24 GB).
  RTX A6000: datasheet (tensor 309.7* at 1,800 MHz boost; FP32 38.7; 768 GB/s; 48 GB).
  A40: datasheet (BF16 149.7, 299.4*; FP32 37.4; 696 GB/s; 48 GB).

No torch import: the planner reads this table on a machine without a GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator: dense peaks by precision, memory bandwidth and size."""

    name: str
    match: tuple[str, ...]
    """Tokens that all appear in its `torch.cuda.get_device_name()` string."""
    tflops: dict[str, float] = field(hash=False)
    hbm_tb_s: float
    memory_gb: float

    @property
    def peak_tflops(self) -> float:
        """Dense bf16 peak (the serving view's precision)."""
        return self.tflops["bf16"]

    @property
    def ridge_flops_per_byte(self) -> float:
        """FLOPs per byte read above which a kernel is compute-bound."""
        return self.peak_tflops / self.hbm_tb_s


def _peaks(half: float, fp32: float) -> dict[str, float]:
    return {"bf16": half, "fp16": half, "fp32": fp32}


DEVICES: dict[str, DeviceSpec] = {
    "h100": DeviceSpec("NVIDIA H100 SXM", ("H100",), _peaks(989.4, 66.9), 3.35, 80),
    "h100-pcie": DeviceSpec("NVIDIA H100 PCIe", ("H100", "PCIE"), _peaks(756.0, 51.2), 2.0, 80),
    "h100-nvl": DeviceSpec("NVIDIA H100 NVL", ("H100", "NVL"), _peaks(835.5, 60.0), 3.9, 94),
    "h200": DeviceSpec("NVIDIA H200 SXM", ("H200",), _peaks(989.4, 66.9), 4.8, 141),
    "h200-nvl": DeviceSpec("NVIDIA H200 NVL", ("H200", "NVL"), _peaks(835.5, 60.0), 4.8, 141),
    "h800": DeviceSpec("NVIDIA H800 SXM", ("H800",), _peaks(989.4, 66.9), 3.35, 80),
    "h800-pcie": DeviceSpec("NVIDIA H800 PCIe", ("H800", "PCIE"), _peaks(756.0, 51.2), 2.0, 80),
    "a100": DeviceSpec("NVIDIA A100 SXM 80GB", ("A100",), _peaks(312.0, 19.5), 2.039, 80),
    "a800": DeviceSpec("NVIDIA A800 SXM 80GB", ("A800",), _peaks(312.0, 19.5), 2.039, 80),
    "l40s": DeviceSpec("NVIDIA L40S", ("L40S",), _peaks(362.05, 91.6), 0.864, 48),
    "l4": DeviceSpec("NVIDIA L4", ("L4",), _peaks(121.0, 30.3), 0.3, 24),
    "a10": DeviceSpec("NVIDIA A10", ("A10",), _peaks(125.0, 31.2), 0.6, 24),
    "a6000": DeviceSpec("NVIDIA RTX A6000", ("A6000",), _peaks(154.8, 38.7), 0.768, 48),
    "a40": DeviceSpec("NVIDIA A40", ("A40",), _peaks(149.7, 37.4), 0.696, 48),
}


def device_key(device_name: str) -> str | None:
    """Table key of a `torch.cuda.get_device_name()` string, None if not in the table.

    Names are compared as tokens ("A10" is not "A100", "L4" is not "L40S") and the entry with
    the most matching tokens wins ("NVIDIA H100 NVL" is h100-nvl, not h100). A MIG slice
    ("... MIG 1g.10gb") has a fraction of the GPU's peak: not in the table.
    """
    tokens = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    if "MIG" in tokens:
        return None
    found = [key for key, spec in DEVICES.items() if tokens.issuperset(spec.match)]
    return max(found, key=lambda key: len(DEVICES[key].match), default=None)
