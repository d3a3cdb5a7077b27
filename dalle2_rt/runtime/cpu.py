"""Whether this CPU has int8 dot-product instructions: where it does not, int8 variants stay off by default.

ONNX Runtime's int8 kernels (uint8 activations × int8 weights) multiply with AMX tiles or VNNI dot products
where the CPU has them, summing in 32 bits. Without them, on x86 with AVX2 or AVX-512 alone, they use pairwise
16-bit products (VPMADDUBSW) whose sums can saturate, and the variant's images can differ from the ones its
export validated. So a folder's int8 variants run by default only on a CPU that names one of the instruction
sets below; ``Pipeline.load(int8=True)`` (``dalle2-rt --int8``) runs them anyway, ``int8=False`` never.

``DALLE2_RT_INT8_DOT`` overrides the reading (a name such as "AVX-512 VNNI"; "", "0", "no", "none" or "false"
for none): for tests, and for a platform whose flags this does not read (Windows, Intel macOS: none is assumed).
"""
from __future__ import annotations

import os
import platform
import sys
from functools import lru_cache

ENV = "DALLE2_RT_INT8_DOT"
# /proc/cpuinfo flag -> name, best first
X86_FLAGS = (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI"))
ARM_FEATURE = ("asimddp", "Arm dot product")
NONE_WORDS = ("", "0", "no", "none", "false")


def flag_words(text: str) -> set[str]:
    """The CPU feature flags a /proc/cpuinfo text lists (x86 ``flags``, Arm ``Features``), every core's."""
    words: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            words.update(value.split())
    return words


def cpuinfo_flags() -> set[str]:
    """This machine's flags from /proc/cpuinfo; empty where there is none (Windows, macOS)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return flag_words(f.read(1 << 20))
    except OSError:
        return set()


def _best(words: set[str]) -> str | None:
    """The best int8 dot-product instruction set among these flags, or None."""
    for flag, name in X86_FLAGS:
        if flag in words:
            return name
    return ARM_FEATURE[1] if ARM_FEATURE[0] in words else None


def _from_cpuinfo(text: str) -> str | None:
    """The best int8 dot-product instruction set a /proc/cpuinfo text names, or None."""
    return _best(flag_words(text))


@lru_cache(maxsize=1)
def _detected() -> str | None:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return ARM_FEATURE[1]  # every Apple silicon CPU has it
    return _best(cpuinfo_flags())


def int8_dot_product() -> str | None:
    """The name of this CPU's int8 dot-product instruction set ("AMX", "AVX-512 VNNI", …), or None."""
    if ENV in os.environ:
        value = os.environ[ENV].strip()
        return None if value.lower() in NONE_WORDS else value
    return _detected()
