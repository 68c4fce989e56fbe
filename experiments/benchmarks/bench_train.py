"""Training throughput: the lensjax train step vs a PyTorch reference of the same network.

For each case the real lensjax step (`lensjax.train.init_state`, `build_train_step`,
as the loop runs it: AdamW with warmup-cosine schedule, gradient clipping, weight
decay on kernels, donated state) and an eager PyTorch step of the same
architecture, batch, precision and optimiser (torch.optim.AdamW with the same
decay mask, clip_grad_norm_, the same schedule) train on one fixed batch.
After warm-up, timed rounds of `k` steps alternate between the two frameworks,
so load from other processes on a shared machine hits both alike; the median
round gives images/s and the ratio lensjax / PyTorch is printed. The PyTorch
networks live in experiments/benchmarks/torch_reference.py.

Cases (defaults sized for a 2-core CPU; --batch-size overrides):
  resnet18_64    ResNet-18, width 64, 64 px, stride-1 stem (stem="auto")
  resnet18_150   ResNet-18, width 64, 150 px, ImageNet stem (Common Test I)
  mae_vits_64    ViT-S/8 MAE, 64 px, mask ratio 0.75, decoder 128 x 2 blocks
  unet_150       diffusion UNet, 150 px, base width 32 (unet_150_w64: 64), mults 1-2-2-4, attention at 19 px

    python experiments/benchmarks/bench_train.py                       # the table (minutes)
    python experiments/benchmarks/bench_train.py --quick               # smoke run, < 1 minute
    python experiments/benchmarks/bench_train.py --models resnet18_64 --rounds 7
    LENSJAX_ONEDNN=0 python experiments/benchmarks/bench_train.py   # without oneDNN's kernels (default: on)
    python experiments/benchmarks/bench_train.py --dtype bfloat16 --batch-size 256   # GPU box:
        # bf16 compute vs PyTorch AMP (bf16 autocast) + channels_last; prints MFU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable


def _pin_to_one_core_if_asked(argv: list[str]) -> None:
    """--threads 1: run on one core (before JAX and PyTorch size their thread pools).

    Pinning the process, rather than only asking each library for one thread,
    also holds XLA's matmul thread pool (which ignores Eigen's thread setting) to
    one core, so both frameworks get exactly one core.
    """
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--threads" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--threads=") else None)
        if value == "1" and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
    from lensjax import hugepages  # noqa: E402  (huge pages, as lensjax's entry points run)
    hugepages.restart_with_hugepages()
    _pin_to_one_core_if_asked(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bench_machine import cpu_description  # noqa: E402  (names the CPU model)
from lensjax import configlib, diffusion, parallel, train  # noqa: E402
from lensjax.models import get_model, onednn  # noqa: E402
from lensjax.tasks import classification  # noqa: E402

# Dense bf16 peak (FLOP/s) per accelerator, for MFU. CPUs have no entry: only the
# achieved FLOP/s is printed there.
PEAK_BF16_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked network: the lensjax model and the matching PyTorch one."""

    kind: str                  # "classifier", "mae" or "diffusion"
    model: str                 # lensjax registry name
    image_size: int
    kwargs: dict[str, Any]     # lensjax model kwargs (the PyTorch builder reads the same)
    batch_size: int            # default batch on CPU
    quick_batch_size: int


_UNET = dict(channel_mults=(1, 2, 2, 4), num_res_blocks=2, attention_resolutions=(19,), num_heads=4)
CASES = {
    # ResNet-18 at full width; 64 px uses the stride-1 stem that stem="auto" picks there.
    "resnet18_64": Case("classifier", "resnet18", 64, dict(width=64, stem="auto"), 8, 2),
    # configs/common_resnet18.py (Common Test I): ImageNet stem.
    "resnet18_150": Case("classifier", "resnet18", 150, dict(width=64, stem="auto"), 16, 4),
    "mae_vits_64": Case("mae", "mae", 64, dict(variant="S", patch_size=8, mask_ratio=0.75,
                                               decoder_width=128, decoder_depth=2,
                                               decoder_heads=4), 32, 8),
    # Base width 32 keeps a step of the 150 px UNet to seconds on a 2-core CPU;
    # unet_150_w64 is the model's default width (4x the FLOPs, same code path).
    "unet_150": Case("diffusion", "unet", 150, dict(base_width=32, num_groups=32, **_UNET), 2, 1),
    # Not in the default set:
    "demo_resnet18_64": Case("classifier", "resnet18", 64, dict(width=16, stem="imagenet"), 64, 16),
    "unet_150_w64": Case("diffusion", "unet", 150, dict(base_width=64, num_groups=32, **_UNET), 2, 1),
}
DEFAULT_CASES = ("resnet18_64", "resnet18_150", "mae_vits_64", "unet_150")
QUICK_CASES = ("demo_resnet18_64",)
NUM_CLASSES = 3
DIFFUSION_STEPS = 1000


# ----------------------------------------------------------------------------
# lensjax side: the real train step with a config built here
# ----------------------------------------------------------------------------

def bench_config(case: Case, batch_size: int, dtype: str):
    """A lensjax config for `case` with the library's optimiser defaults."""
    config = configlib.base_config()
    config.task = case.kind
    config.data.preset = "common_test"  # three classes, for the classifier's head
    kwargs = dict(case.kwargs, image_size=case.image_size)
    if dtype == "bfloat16":
        kwargs["dtype"] = jnp.bfloat16
    config.model = dict(name=case.model, kwargs=kwargs)
    config.train.batch_size = batch_size
    return config


def _mae_task():
    def create_model(config, rngs):
        return get_model(config.model.name, rngs=rngs, **config.model.kwargs)

    def loss_fn(model, batch, rng):
        return model(batch["image"], rng).loss, {}

    return SimpleNamespace(create_model=create_model, loss_fn=loss_fn, AUX_METRICS=())


def _diffusion_task():
    schedule = diffusion.make_schedule("linear", DIFFUSION_STEPS)

    def create_model(config, rngs):
        return get_model(config.model.name, rngs=rngs, **config.model.kwargs)

    def loss_fn(model, batch, rng):
        x0 = diffusion.to_model_space(batch["image"])
        return jnp.mean(diffusion.diffusion_loss(schedule, model, x0, rng)), {}

    return SimpleNamespace(create_model=create_model, loss_fn=loss_fn, AUX_METRICS=())


def lensjax_task(kind: str):
    """The task of a case: lensjax.tasks.classification, or the MAE / eps-diffusion loss."""
    if kind == "classifier":
        return classification
    return _mae_task() if kind == "mae" else _diffusion_task()


def fixed_batch(case: Case, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Images in [0, 1] (B, H, W, 1) float32 and labels (B,) int32, the same for both frameworks."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(batch_size, case.image_size, case.image_size, 1)).astype(np.float32)
    labels = (np.arange(batch_size) % NUM_CLASSES).astype(np.int32)
    return {"image": images, "label": labels}


def build_lensjax(case: Case, batch_size: int, dtype: str):
    """(run(k) -> None that trains k steps and blocks, parameter count, FLOPs per step)."""
    config = bench_config(case, batch_size, dtype)
    task = lensjax_task(case.kind)
    mesh = parallel.make_mesh(int(os.environ.get("BENCH_DEVICES", "1")))
    graphdef, state, tx = train.init_state(config, task)
    step_fn, shardings = train.build_train_step(graphdef, task, tx, config, state, mesh)
    state = jax.device_put(state, shardings)
    batch = jax.device_put(fixed_batch(case, batch_size), parallel.batch_sharding(mesh))
    root = jax.random.key(config.seed)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    compiled = step_fn.lower(state, batch, root).compile()
    flops = flops_per_step(lambda: train.build_train_step(graphdef, task, tx, config, state, mesh)[0]
                           .lower(state, batch, root))
    holder = {"state": state, "step": 0}

    def run(k: int) -> None:
        state, step = holder["state"], holder["step"]
        for _ in range(k):
            state, _ = compiled(state, batch, jax.random.fold_in(root, step))
            step += 1
        jax.block_until_ready(state)
        holder["state"], holder["step"] = state, step

    return run, num_params, flops


def flops_per_step(lower: Callable[[], Any]) -> float | None:
    """FLOPs of one step from XLA's cost analysis of the program `lower()` lowers, traced
    with lensjax's oneDNN kernels switched off: the same maths, but XLA's cost analysis
    does not see inside oneDNN's custom calls. None where unavailable."""
    try:
        with onednn.switch(False):
            cost = lower().cost_analysis()
    except Exception:  # best-effort on some backends
        return None
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0)) or None


# ----------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------

def build_torch(case: Case, batch_size: int, dtype: str, channels_last: bool,
                threads: int | None):
    """(run(k) -> None, parameter count, device name) for the PyTorch reference of `case`."""
    import math

    import torch
    import torch_reference as ref

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = fixed_batch(case, batch_size)
    images_nhwc = torch.from_numpy(data["image"]).to(device)
    labels = torch.from_numpy(data["label"]).long().to(device)
    images = images_nhwc.permute(0, 3, 1, 2).contiguous()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    kw = case.kwargs
    if case.kind == "classifier":
        stem = "imagenet" if case.image_size >= 128 else "small"
        stem = stem if kw.get("stem", "auto") == "auto" else kw["stem"]
        model = ref.ResNet18(NUM_CLASSES, width=kw["width"], stem=stem)

        def loss_fn():
            logits = model(images)
            return torch.nn.functional.cross_entropy(logits.float(), labels)
    elif case.kind == "mae":
        from lensjax.models.vit import resolve_size
        size = resolve_size(kw["variant"], patch_size=kw["patch_size"])
        model = ref.MAE(image_size=case.image_size, patch_size=size.patch_size, width=size.width,
                        depth=size.depth, heads=size.num_heads, mask_ratio=kw["mask_ratio"],
                        decoder_width=kw["decoder_width"], decoder_depth=kw["decoder_depth"],
                        decoder_heads=kw["decoder_heads"])

        def loss_fn():
            return model(images_nhwc)
    else:
        from lensjax.models.unet import attention_levels
        levels = attention_levels(kw["attention_resolutions"], case.image_size,
                                  len(kw["channel_mults"]))
        model = ref.UNet(base_width=kw["base_width"], channel_mults=tuple(kw["channel_mults"]),
                         num_res_blocks=kw["num_res_blocks"], attention_levels=levels,
                         heads=kw["num_heads"], groups=kw["num_groups"])
        schedule = diffusion.make_schedule("linear", DIFFUSION_STEPS)
        sqrt_ac = torch.tensor(np.asarray(schedule.sqrt_alphas_cumprod), device=device)
        sqrt_1mac = torch.tensor(np.asarray(schedule.sqrt_one_minus_alphas_cumprod), device=device)
        x0 = 2.0 * images - 1.0

        def loss_fn():
            t = torch.randint(0, DIFFUSION_STEPS, (batch_size,), device=device)
            noise = torch.randn_like(x0)
            x_t = sqrt_ac[t][:, None, None, None] * x0 + sqrt_1mac[t][:, None, None, None] * noise
            return ((model(x_t, t).float() - noise) ** 2).mean()

    model = model.to(device)
    if case.kind != "mae":
        model = model.to(memory_format=memory_format)
        images = images.contiguous(memory_format=memory_format)
        if case.kind == "diffusion":
            x0 = x0.contiguous(memory_format=memory_format)
    model.train()
    config = bench_config(case, batch_size, dtype).train
    optimizer = ref.adamw(model, config.learning_rate, config.weight_decay)
    warmup, total = config.warmup_steps, config.steps

    def lr_factor(step: int) -> float:  # optax.warmup_cosine_decay_schedule, end value 0
        if step < warmup:
            return step / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / (total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    params = list(model.parameters())
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16"
                else torch.autocast(device.type, enabled=False))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
        optimizer.step()
        scheduler.step()

    def run(k: int) -> None:
        for _ in range(k):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    num_params = sum(p.numel() for p in params)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return run, num_params, name


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

def time_alternating(runs: dict[str, Callable[[int], None]], rounds: int,
                     round_seconds: float, warmup_steps: int = 2) -> dict[str, float]:
    """Median seconds per step of each run, timed in alternating rounds.

    Each run first trains `warmup_steps` steps (compilation, allocator warm-up);
    one more step sizes its rounds to about `round_seconds`. Then, with the objects
    alive by then frozen for the garbage collector as lensjax's loop does, `rounds` times
    in turn, every run trains its k steps; alternating spreads outside load on
    a shared machine over both sides instead of biasing one.
    """
    steps_per_round = {}
    for name, run in runs.items():
        run(warmup_steps)
        start = time.perf_counter()
        run(1)
        steps_per_round[name] = max(1, round(round_seconds / (time.perf_counter() - start)))
    per_step: dict[str, list[float]] = {name: [] for name in runs}
    # As lensjax's loop does after its first step (and for PyTorch alike, same
    # process): full garbage collections skip the objects of the setup.
    with train.LongLivedObjectsFrozen() as frozen:
        frozen.freeze()
        for _ in range(rounds):
            for name, run in runs.items():
                k = steps_per_round[name]
                start = time.perf_counter()
                run(k)
                per_step[name].append((time.perf_counter() - start) / k)
    return {name: statistics.median(times) for name, times in per_step.items()}


def machine_line(torch_device: str) -> str:
    import torch
    device = jax.devices()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    xla_threads = "" if device.platform != "cpu" else f", {cores} of {os.cpu_count()} cores"
    return (f"jax {jax.__version__} ({device.platform}: {device.device_kind}{xla_threads}) | torch "
            f"{torch.__version__} ({torch_device}, {torch.get_num_threads()} threads) | "
            f"{cpu_description()}, {os.cpu_count()} cores | "
            f"load average {os.getloadavg()[0]:.2f} | "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} (both frameworks) | "
            f"jax async CPU dispatch {jax.config.values['jax_cpu_enable_async_dispatch']} | "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | "
            f"{onednn.describe_setting()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None,
                        help=f"comma list of cases (default {','.join(DEFAULT_CASES)}; "
                             f"--quick: {','.join(QUICK_CASES)}); all: {','.join(CASES)}")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step for every case (default: per case, see docstring)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--round-seconds", type=float, default=3.0,
                        help="target length of one timed round per framework")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype (bfloat16: lensjax dtype=bf16, PyTorch autocast)")
    parser.add_argument("--torch-channels-last", default=None, action=argparse.BooleanOptionalAction,
                        help="PyTorch conv nets in channels_last (default: on GPU only)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both frameworks (default: every core). --threads 1 "
                             "pins the process to one core: single-core kernels, which a busy "
                             "machine distorts less")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 minute): small batches, 2 short rounds")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch
    names = (args.models.split(",") if args.models
             else list(QUICK_CASES if args.quick else DEFAULT_CASES))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; valid: {', '.join(CASES)}")
    rounds, round_seconds = (2, 0.5) if args.quick else (args.rounds, args.round_seconds)
    on_gpu = torch.cuda.is_available()
    channels_last = on_gpu if args.torch_channels_last is None else args.torch_channels_last
    threads = args.threads or (None if on_gpu else os.cpu_count())
    if args.threads not in (None, 1, os.cpu_count()) and not on_gpu:
        parser.error("--threads must be 1 (one pinned core) or the core count")

    rows = []
    header = (f"{'case':<16} {'batch':>5} {'params':>11} {'lensjax img/s':>14} "
              f"{'torch img/s':>12} {'ratio':>6} {'TFLOP/s':>8} {'MFU':>6}")
    printed_header = False
    for name in names:
        case = CASES[name]
        batch = args.batch_size or (case.quick_batch_size if args.quick else case.batch_size)
        ours, ours_params, flops = build_lensjax(case, batch, args.dtype)
        theirs, theirs_params, torch_device = build_torch(case, batch, args.dtype, channels_last,
                                                          threads)
        if not printed_header:
            print(f"lensjax train step vs PyTorch | {args.dtype} | "
                  f"torch {'channels_last' if channels_last else 'NCHW'} | {machine_line(torch_device)}")
            print(header)
            print("-" * len(header), flush=True)
            printed_header = True
        if ours_params != theirs_params:
            raise AssertionError(f"{name}: lensjax has {ours_params} parameters, the PyTorch "
                                 f"reference {theirs_params}: the architectures differ")
        seconds = time_alternating({"lensjax": ours, "torch": theirs}, rounds, round_seconds)
        ours_ips, theirs_ips = batch / seconds["lensjax"], batch / seconds["torch"]
        achieved = None if flops is None else flops / seconds["lensjax"]
        peak = PEAK_BF16_FLOPS.get(jax.devices()[0].device_kind)
        mfu = None if achieved is None or peak is None or args.dtype != "bfloat16" else achieved / peak
        rows.append(dict(case=name, batch_size=batch, dtype=args.dtype, params=ours_params,
                         lensjax_img_per_s=ours_ips, torch_img_per_s=theirs_ips,
                         ratio=ours_ips / theirs_ips, flops_per_step=flops,
                         achieved_flops=achieved, mfu=mfu, load_average=os.getloadavg()[0]))
        print(f"{name:<16} {batch:5d} {ours_params:11,d} {ours_ips:14.2f} {theirs_ips:12.2f} "
              f"{ours_ips / theirs_ips:5.2f}x "
              f"{'-' if achieved is None else f'{achieved / 1e12:.3f}':>8} "
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>6}", flush=True)
    load = os.getloadavg()[0]
    print(f"load average after: {load:.2f}")
    if not on_gpu and threads != 1 and load > 1.5 * os.cpu_count():
        print(f"WARNING: the machine is busy (load {load:.1f} on {os.cpu_count()} cores). PyTorch's "
              "OpenMP threads wait for each other at every operation and slow down far more than "
              "XLA's under such load, so these ratios favour lensjax; rerun on a quiet machine, "
              "or compare single-threaded kernels with --threads 1.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
