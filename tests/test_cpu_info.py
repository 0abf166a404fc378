"""/proc/cpuinfo read in one place (llmfast.cpu_info) for provenance, serve.machine, native and quant.w4."""

from llmfast import native, provenance
from llmfast.cpu_info import CPUINFO, cpu_info, parse_cpuinfo
from llmfast.quant.w4 import cpu_has_w4_kernel
from llmfast.serve import machine

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16
vmx flags\t: vnmi preemption_timer
bugs\t\t: spectre_v1

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes crc32 sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd4f

processor\t: 1
Features\t: fp asimd evtstrm aes crc32 sve sve2 bf16 i8mm
"""


def test_x86_model_name_and_flags_not_the_vmx_flags_or_bugs() -> None:
    info = parse_cpuinfo(X86)
    assert info.model == "Intel(R) Xeon(R) Platinum 8480+"
    assert info.flags == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}


def test_arm_features_are_the_flags_and_no_model_name() -> None:
    info = parse_cpuinfo(ARM)
    assert info.model is None and info.flags == {"fp", "asimd", "evtstrm", "aes", "crc32", "sve", "sve2", "bf16",
                                                 "i8mm"}
    assert parse_cpuinfo("") == parse_cpuinfo("processor\t: 0\n") and not parse_cpuinfo("").flags


def test_the_real_file_is_read_once_and_every_reader_takes_it() -> None:
    """The flags as the file's first `flags` (or `Features`) line lists them, one cached object for all callers;
    w4's check is an exact flag (it tested the raw text for ' avx512f'), native's key the sorted set."""
    line = next(x for x in CPUINFO.read_text().splitlines() if x.split(":")[0].strip() in ("flags", "Features"))
    info = cpu_info()
    assert info.flags == frozenset(line.split(":", 1)[1].split()) and info is cpu_info()
    assert machine.detect().cpu_flags is info.flags
    assert cpu_has_w4_kernel() == ("avx512f" in info.flags)
    assert native._cpu_flags() == " ".join(sorted(info.flags))
    assert provenance.cpu()["cpu_flags"] == [f for f in provenance.CPU_FLAGS if f in info.flags]
