"""The benchmarks' description of the machine they ran on."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "benchmarks"))

from bench_machine import cpu_description  # noqa: E402

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse4_2 avx fma avx2 bmi2

processor\t: 1
model name\t: Another CPU
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm
CPU implementer\t: 0x41

Model\t\t: Raspberry Pi 4 Model B
"""


def test_cpu_description_names_model_family_and_widest_vector_extension():
    assert cpu_description(ZEN3) == "AMD EPYC (family 25, model 1, avx2)"
    assert cpu_description(ZEN3.replace("bmi2", "bmi2 avx512f avx512bw")) == (
        "AMD EPYC (family 25, model 1, avx512f)")


def test_cpu_description_reads_the_first_processor_only_and_other_layouts():
    # The second block's model name is ignored; an ARM board names itself in "Model".
    assert "Another" not in cpu_description(ZEN3)
    assert cpu_description(ARM) == "Raspberry Pi 4 Model B (asimd)"


def test_cpu_description_falls_back_to_the_platform_without_cpuinfo():
    import platform
    assert cpu_description("") == (platform.processor() or platform.machine())
    assert cpu_description() != ""
