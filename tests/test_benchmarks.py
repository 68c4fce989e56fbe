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


def _weight_grad_convs(case_name: str) -> tuple[int, tuple]:
    """(batch, layers) as bench_kernels.WEIGHT_GRAD_CONVS lists them, read from one
    abstract forward pass of the bench_train.py case's model: every convolution that
    the CPU rule with oneDNN on gives "onednn" (whose weight gradient is XLA's)."""
    import collections
    from unittest import mock

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench_train import CASES, NUM_CLASSES
    from lensjax.models import get_model, layers

    case = CASES[case_name]
    kwargs = dict(case.kwargs, image_size=case.image_size)
    if case.kind == "classifier":
        kwargs["num_classes"] = NUM_CLASSES
    graphdef, state = nnx.split(nnx.eval_shape(lambda: get_model(case.model, rngs=nnx.Rngs(0),
                                                                 **kwargs)))
    seen = collections.Counter()
    convolve = layers.Conv.convolve

    def recording(self, x, kernel):
        kh, kw, cin, cout = kernel.shape
        output = layers.conv_output_size(x.shape[1:3], self.strides)
        if layers.choose_conv_impl((kh, kw), cin, self.strides, output, backend="cpu",
                                   onednn_available=True) == "onednn":
            assert x.shape[1] == x.shape[2], x.shape
            if (kh, kw) == (2, 2):   # unet.upsample_conv: the 3 x 3 layer on the 2x map
                seen[(2 * (x.shape[1] - 1), cin, cout // 4, True)] += 1
            else:
                assert (kh, kw) == (3, 3), kernel.shape
                seen[(x.shape[1], cin, cout, False)] += 1
        return convolve(self, x, kernel)

    def forward(state, images):
        model = nnx.merge(graphdef, state)
        if case.kind == "diffusion":
            return model(images, jnp.zeros((images.shape[0],), jnp.int32))
        return model(images)

    images = jax.ShapeDtypeStruct((case.batch_size, case.image_size, case.image_size, 1),
                                  jnp.float32)
    with mock.patch.object(layers.Conv, "convolve", recording):
        jax.eval_shape(forward, state, images)
    return case.batch_size, tuple((count, *shape) for shape, count in seen.items())


def test_bench_kernels_weight_grad_layers_are_those_of_the_bench_train_steps():
    # bench_kernels --weight-grads times these layers' weight gradients per step, so a
    # model change that moves a layer must show up here, not in a silently wrong sum.
    from bench_kernels import WEIGHT_GRAD_CONVS

    for case_name, (batch, convs) in WEIGHT_GRAD_CONVS.items():
        expected_batch, recorded = _weight_grad_convs(case_name)
        assert batch == expected_batch, case_name
        assert sorted(convs) == sorted(recorded), case_name
