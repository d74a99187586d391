"""Which runs train stacked: the one switch, the one table of measured thresholds, the one decision.

Every stage router (classic CNN groups, sparsified twins, ViT fine-tunes) asks :func:`least_stack` how
large a group must be to be stacked, and :func:`cpu_cap` how large a stack may grow on CPU. The figures
are measurements (benchmarks/RESULTS.md), keyed by device type and stack family; a family or device
not in the table is never stacked in ``auto`` (measure it first, e.g. with ``VITZOO_POPULATION=on``).

``VITZOO_POPULATION`` (:data:`ENV_SWITCH`): ``auto`` (default: stack where measured faster), ``on``
(stack every group a stack can reproduce, of any size, ResNet-18 included: for measuring new hardware),
``off`` (every run alone).
"""

from __future__ import annotations

import os

ENV_SWITCH = "VITZOO_POPULATION"

#: Smallest group ``auto`` stacks, per (device type, family); None: never (trained alone).
#:
#: - ``cnn`` (CNN-s/CNN-m at batch 10), CPU one thread: per-model step 3.4 ms at 2 models, 2.2 ms at 8 (no
#:   better than alone, 2.0-2.4 ms), 1.7 ms at 16, 1.4 ms at 32-128; GPUs gain from 2.
#: - ``resnet18``: not measured on a GPU; an 11M-parameter model at batch 128-256 is not launch-bound,
#:   so it trains alone until measured (``benchmarks/population.py --arch resnet18``).
#: - ``twin`` (CNN-s twins at batch 10), CPU: per twin 4.2-6.2 ms alone; stacked 3.7-4.3 ms at 4 (within
#:   the noise), 2.9-3.5 at 8, 2.5-3.3 at 16. CUDA not measured: 2, like the CNN stacks.
#: - ``vit-full`` (full fine-tunes): slower stacked on CPU (0.46-1.09x: compute bound, no fused attention
#:   under vmap), not measured on a GPU: alone. ``vit-linear`` (linear probes): 1.2-3.2x from 2 members
#:   (the frozen backbone runs once per distinct batch), on any device fewer FLOPs.
MIN_STACK: dict[tuple[str, str], int | None] = {
    ("cpu", "cnn"): 16, ("cuda", "cnn"): 2,
    ("cpu", "resnet18"): None, ("cuda", "resnet18"): None,
    ("cpu", "twin"): 8, ("cuda", "twin"): 2,
    ("cpu", "vit-full"): None, ("cuda", "vit-full"): None,
    ("cpu", "vit-linear"): 2, ("cuda", "vit-linear"): 2,
}

#: Largest stack on CPU per family: the step is memory-bandwidth bound there (CNN: per-model time flat from
#: ~32 to ~128 models, worse beyond; twins: no gain beyond 16; ViT linear probes: 16, the largest measured).
CPU_MAX_STACK = {"cnn": 64, "resnet18": 64, "twin": 16, "vit-full": 16, "vit-linear": 16}


def family(arch: str) -> str:
    """The stack family of a classic / phase architecture: ``resnet18`` for the ResNets (any width, ResNet-50
    too: batchnorm stacks, not measured on a GPU), ``cnn`` for CNN-s/CNN-m."""
    return "resnet18" if arch.startswith("resnet") else "cnn"


def switch() -> str:
    """``auto``, ``on`` or ``off`` from :data:`ENV_SWITCH` (an invalid value is an error naming it)."""
    v = os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"
    if v not in ("auto", "on", "off"):
        raise ValueError(f"{ENV_SWITCH}={v!r}; allowed: auto, on, off")
    return v


def least_stack(device_type: str, family: str, mode: str | None = None) -> int | None:
    """The smallest group of ``family`` stacked on ``device_type`` under ``mode`` (default: the switch):
    1 with ``on``, None (never) with ``off`` or where ``auto`` has no measurement."""
    mode = mode or switch()
    if mode == "on":
        return 1
    if mode == "off":
        return None
    return MIN_STACK.get((device_type, family))


def cpu_cap(device_type: str, family: str, cap: int) -> int:
    """``cap`` bounded by :data:`CPU_MAX_STACK` on CPU."""
    return min(cap, CPU_MAX_STACK.get(family, cap)) if device_type == "cpu" else cap
