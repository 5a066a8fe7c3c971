"""Devices, precisions and memory layouts: where tensors live and in which format they compute.

Everything here is tensor plumbing shared by the engine, the augmentation and the bench, so none of
them reaches into another for it. The one place that says what a requested precision becomes on a
device (``resolve_precision``), which memory layout runs (``resolve_channels_last``), which math
flags are set (``set_math_flags``) and how a CPU process keeps its memory (``keep_cpu_memory``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import torch

CPU_HALF = ("auto", "fp32", "bf16")  # what fp16 and fp16_bn32 become on a CPU (precision.cpu_half)


@dataclass(frozen=True)
class Precision:
    """How a requested precision runs on this device."""

    name: str  # what actually runs (recorded as precision_used)
    param_dtype: torch.dtype  # model weights and inputs
    norm_fp32: bool  # keep normalisation layers in fp32
    autocast: torch.dtype | None  # autocast dtype, if any


_PRECISIONS = {
    "fp32": Precision("fp32", torch.float32, False, None),
    "fp16": Precision("fp16", torch.float16, False, None),
    "fp16_bn32": Precision("fp16_bn32", torch.float16, True, None),
    "bf16": Precision("bf16", torch.float32, False, torch.bfloat16),
}
PRECISIONS = tuple(_PRECISIONS)  # precision.name


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's name as the system gives it (Linux: /proc/cpuinfo), else what ``platform`` knows.
    A virtual machine often shows a generic name ("Intel(R) Xeon(R) Processor"): ``cpu_facts`` adds
    the instruction sets that tell such machines apart."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_native_bf16() -> str | None:
    """How this CPU computes bf16 natively: "amx" (AMX-BF16 tiles), "avx512_bf16", or None when
    oneDNN has to emulate it (then bf16 autocast runs far slower than fp32)."""
    try:
        caps = torch._C._cpu._get_cpu_capability()  # private, but it is what oneDNN dispatches on
    except (AttributeError, RuntimeError):
        caps = {}
    for flag, name in (("amx_bf16", "amx"), ("avx512_bf16", "avx512_bf16")):
        if caps.get(flag):
            return name
    return None


def cpu_facts() -> dict:
    """What a CPU run's record keeps about the processor, so that seconds measured on different
    machines are never compared as if they were one: its name, the vector instruction set torch
    dispatches to, and its native bf16 (none when emulated)."""
    return dict(cpu_model=cpu_model(), cpu_isa=torch.backends.cpu.get_cpu_capability(),
                cpu_bf16=cpu_native_bf16() or "none")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; any other name is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_problem(name: str) -> str | None:
    """Why ``device=<name>`` cannot run here (a string torch does not parse, a backend with no device
    on this machine, a GPU index beyond the GPUs present), or None when it can."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        return (f"device={name!r} is not a device ({str(err).splitlines()[0][:80]}...); use auto, cpu, "
                "cuda or cuda:<index>")
    if device.type == "cpu":
        return None
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        return f"device={name!r}, but this machine has no {device.type} device; use device=auto or device=cpu"
    count = getattr(backend, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        return f"device={name!r}, but this machine has {count()} {device.type} device(s) (indices from 0)"
    return None


def cuda_has_fast_bf16(device: torch.device) -> bool:
    """bf16 tensor cores arrived with compute capability 8 (A100, RTX 30xx). ``is_bf16_supported``
    says True on a V100 or T4 too, where bf16 runs without them, slower than fp16."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(name: str, device: torch.device, cpu_half: str = "fp32") -> Precision:
    """Map a requested precision to what the device runs natively (design.md: say which ran).

    CPUs have no fast fp16 convolutions (they are emulated, far slower), so fp16 and fp16_bn32 run
    as ``cpu_half`` there: fp32, bf16 autocast, or ``auto``: bf16 where the CPU computes it natively
    (AMX or AVX512-BF16, ``cpu_native_bf16``), fp32 where bf16 would be emulated. bf16 on a GPU
    without bf16 tensor cores runs as fp16 with fp32 batch norm, the nearest precision it runs fast.
    """
    if name in ("fp16", "fp16_bn32") and device.type == "cpu":
        name = cpu_half if cpu_half != "auto" else "bf16" if cpu_native_bf16() else "fp32"
    if name == "bf16" and device.type == "cuda" and not cuda_has_fast_bf16(device):
        name = "fp16_bn32"
    return _PRECISIONS[name]


def resolve_channels_last(value: Optional[bool], device: torch.device) -> bool:
    """``precision.channels_last``: None picks the device's fast layout. On a CPU that is channels_last
    (oneDNN's convolutions run NHWC natively; results agree with NCHW up to floating-point rounding);
    on CUDA the published recipes' NCHW."""
    return device.type == "cpu" if value is None else bool(value)


def set_math_flags(device: torch.device, tf32: bool) -> dict:
    """Set TF32 for matmuls and cuDNN convolutions explicitly (PyTorch's defaults differ between the
    two and between versions), so that "fp32" means fp32 unless ``tf32`` asks otherwise. Returns the
    facts a record keeps: the flags, and the CUDA and cuDNN versions."""
    if device.type != "cuda":
        return {}
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    return dict(tf32_matmul=tf32, tf32_cudnn=tf32, cuda_version=torch.version.cuda,
                cudnn_version=torch.backends.cudnn.version(),
                cuda_capability=".".join(map(str, torch.cuda.get_device_capability(device))))


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREED_BYTES = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB of freed heap


def keep_cpu_memory() -> dict:
    """Stop glibc from handing the training step's big blocks back to the kernel after every step.

    By default glibc serves blocks above a threshold with mmap and unmaps them on free, and trims the
    top of the heap, so each step's activations and gradients are faulted in afresh: about 146,000
    minor page faults per step of step 8 at scale=cpu, a third of its time in the kernel. With mmap
    off and trimming out of reach, freed blocks stay in the heap and are reused. This is process-wide,
    set once on a CPU run; the memory a run reaches at its peak stays with the process until it ends.
    ``ABLATE_MALLOC=default`` leaves glibc as it is (the bench compares both). Returns what was set,
    for the run's summary.
    """
    if os.environ.get("ABLATE_MALLOC", "") == "default":
        return dict(malloc="glibc defaults (ABLATE_MALLOC=default)")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl): nothing to tune
        return dict(malloc="not glibc: unchanged")
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES) == 1
    if not ok:
        return dict(malloc="mallopt refused: unchanged")
    return dict(malloc=f"glibc mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD={_KEEP_FREED_BYTES}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or a no-op context when the precision uses none."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last tensor (not also contiguous), else contiguous_format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in the memory format the model runs in (``precision.channels_last`` resolved)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def process_usage() -> tuple[float, int]:
    """CPU seconds used so far by this process and its finished children (DataLoader workers), and
    the minor page faults taken; compared across an epoch they show a contended or faulting run."""
    try:
        import resource
    except ImportError:  # not a Unix: CPU seconds only
        return time.process_time(), 0
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime), me.ru_minflt + kids.ru_minflt


def load_average() -> float | None:
    """The machine's 1-minute load average, where the system reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
