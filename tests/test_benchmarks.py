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


# ResNet-18's stride-1 3 x 3 convolutions with more than one input channel: four of
# 64 channels in the first stage, three per later stage (the first of each is
# strided). resnet18_64 keeps 64 px in its stride-1 stem; resnet18_150's ImageNet stem
# and max pool bring 150 px to 38. The UNet's, as its program showed them (the last
# is the output convolution; upsampling layers on the 2x map).
EXPECTED_WEIGHT_GRAD_CONVS = {
    "resnet18_64": (8, ((4, 64, 64, 64, False), (3, 32, 128, 128, False),
                        (3, 16, 256, 256, False), (3, 8, 512, 512, False))),
    "resnet18_150": (16, ((4, 38, 64, 64, False), (3, 19, 128, 128, False),
                          (3, 10, 256, 256, False), (3, 5, 512, 512, False))),
    "unet_150": (2, ((7, 152, 32, 32, False), (2, 152, 64, 32, False), (1, 152, 64, 64, True),
                     (1, 152, 96, 32, False), (6, 76, 64, 64, False), (1, 76, 64, 64, True),
                     (2, 76, 128, 64, False), (1, 76, 32, 64, False), (1, 76, 96, 64, False),
                     (7, 38, 64, 64, False), (1, 38, 128, 128, True), (2, 38, 128, 64, False),
                     (1, 38, 192, 64, False), (10, 19, 128, 128, False),
                     (1, 19, 192, 128, False), (2, 19, 256, 128, False),
                     (1, 19, 64, 128, False), (1, 152, 32, 1, False))),
}


def test_bench_kernels_reads_the_weight_gradient_layers_from_the_models():
    # bench_kernels --weight-grads sums these layers' weight gradients per step.
    from bench_kernels import weight_grad_convs

    for case_name, (batch, convs) in EXPECTED_WEIGHT_GRAD_CONVS.items():
        recorded_batch, recorded = weight_grad_convs(case_name)
        assert recorded_batch == batch, case_name
        assert sorted(recorded) == sorted(convs), case_name
