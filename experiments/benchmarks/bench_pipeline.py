"""Input pipeline cost: training steps/s with the simulated stream vs with one constant batch.

Runs the demo classifier's real training step (configs/demo_classifier.py:
ResNet-18 width 16, 64 x 64 simulated Model II lenses, batch 64; built with
lensjax.train.init_state and build_train_step, metrics merged
every step as in the loop) fed two ways, in alternating timed rounds:

  stream    `lensjax.data.pipeline.train_iterator`, a fresh simulated batch per step
            (generated on device in its own jit, two batches ahead on a background
            thread on this one-device mesh: `pipeline.prefetch_in_background`);
  constant  the first batch of that stream, reused every step.

It also times the stream alone (batches/s without training), which says how much
generation work the stream adds. Generation and the step run on the same
devices: on a GPU the simulator's batch is a small fraction of a step and
overlaps with it; on a CPU both share the same cores, so the stream can only be
free if the step leaves cores idle. The timed rounds run with the setup's objects
frozen for the garbage collector, as the training loop runs after its first step
(`train.LongLivedObjectsFrozen`). It prints the ratio of the two feeds' medians and
the median of each round's own stream / constant ratio.

    python experiments/benchmarks/bench_pipeline.py               # ~1 minute on 2 cores
    python experiments/benchmarks/bench_pipeline.py --quick       # < 1 minute
    python experiments/benchmarks/bench_pipeline.py --config configs/common_resnet18.py
    python experiments/benchmarks/bench_pipeline.py --batch-size 256 --json pipeline.json  # GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bench_machine import cpu_description  # noqa: E402  (names the CPU model)

from lensjax import parallel, tasks, train  # noqa: E402
from lensjax.data import pipeline  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                              "demo_classifier.py")


def load_config(path: str, arg: str | None = None):
    """config = get_config(arg) of a configs/*.py file."""
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def build(config):
    """(step(state, batch, step_index) -> state, initial state, mesh) of the real loop."""
    task = tasks.get_task(config.task)
    mesh = parallel.make_mesh(config.get("num_devices") or None)
    graphdef, state, tx = train.init_state(config, task)
    step_fn, shardings = train.build_train_step(graphdef, task, tx, config, state, mesh)
    state = jax.device_put(state, shardings)
    root = jax.random.key(config.seed)
    metrics_holder = {"metrics": None}

    def step(state, batch, index: int):
        state, step_metrics = step_fn(state, batch, jax.random.fold_in(root, index))
        merged = metrics_holder["metrics"]
        metrics_holder["metrics"] = step_metrics if merged is None else merged.merge(step_metrics)
        return state

    return step, state, mesh


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="a configs/*.py file")
    parser.add_argument("--config-arg", default=None, help="its get_config argument")
    parser.add_argument("--rounds", type=int, default=9, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 4 steps")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch (default: the config's; a GPU takes 256 and more)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    rounds, steps = (3, 4) if args.quick else (args.rounds, args.steps)
    if rounds < 1 or steps < 1 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--rounds, --steps and --batch-size must be >= 1")

    config = load_config(args.config, args.config_arg)
    if args.batch_size is not None:
        config.train.batch_size = args.batch_size
    step, state, mesh = build(config)
    stream = pipeline.train_iterator(config, mesh, 0)
    constant = jax.block_until_ready(next(stream))
    holder = {"state": state, "index": 0}

    def train_round(feed) -> float:
        """Seconds per step over `steps` steps fed by `feed()`."""
        state, index = holder["state"], holder["index"]
        start = time.perf_counter()
        for _ in range(steps):
            state = step(state, feed(), index)
            index += 1
        jax.block_until_ready(state)
        holder["state"], holder["index"] = state, index
        return (time.perf_counter() - start) / steps

    def generate_round() -> float:
        """Seconds per batch of the stream alone."""
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(stream)
        jax.block_until_ready(batch)
        return (time.perf_counter() - start) / steps

    feeds = {"stream": lambda: next(stream), "constant": lambda: constant}
    for feed in feeds.values():  # compile and warm up both paths
        train_round(feed)
    generate_round()
    times = {"stream": [], "constant": [], "generate": []}
    # As the loop does after its first step: full garbage collections skip the setup's
    # objects (a collection of all of them stalls one round by ~0.3 s).
    with train.LongLivedObjectsFrozen() as frozen:
        frozen.freeze()
        for _ in range(rounds):
            for name, feed in feeds.items():
                times[name].append(train_round(feed))
            times["generate"].append(generate_round())
    median = {name: statistics.median(values) for name, values in times.items()}

    device = jax.devices()[0]
    batch = config.train.batch_size
    machine = (f"input pipeline benchmark | {os.path.basename(args.config)} ({config.model.name}, "
               f"{config.data.source}:{config.data.get('preset', '')}, batch {batch}) | jax "
               f"{jax.__version__} | {device.platform}: {device.device_kind} x{mesh.size} | "
               f"{cpu_description()}, {os.cpu_count()} cores | "
               f"{rounds} rounds of {steps} steps, medians | load average {os.getloadavg()[0]:.2f}")
    print(machine)
    header = f"{'feed':<26} {'ms/step':>9} {'steps/s':>9} {'images/s':>9}"
    print(header)
    print("-" * len(header))
    for name, label in (("constant", "constant batch"), ("stream", "simulated stream"),
                        ("generate", "stream alone (no training)")):
        seconds = median[name]
        print(f"{label:<26} {1e3 * seconds:9.1f} {1 / seconds:9.2f} {batch / seconds:9.1f}")
    ratio = median["constant"] / median["stream"]
    # Each round's stream steps run right after its constant ones, so their ratio
    # cancels the slow drift of a shared machine's speed between rounds.
    rounds_ratio = [c / s for c, s in zip(times["constant"], times["stream"])]
    paired_median = statistics.median(rounds_ratio)
    print(f"stream / constant steps/s: {ratio:.3f} ({100 * (1 - ratio):+.1f}% cost of the stream); "
          f"generation alone is {100 * median['generate'] / median['constant']:.1f}% of a step")
    print(f"per-round pairs, stream / constant: median {paired_median:.3f} "
          f"({100 * (1 - paired_median):+.1f}% cost), range {min(rounds_ratio):.3f}-{max(rounds_ratio):.3f} "
          f"over {rounds} rounds ({', '.join(f'{r:.3f}' for r in rounds_ratio)})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "batch_size": batch,
                       "ms_per_step": {name: 1e3 * value for name, value in median.items()},
                       "stream_over_constant": ratio, "per_round_pairs": rounds_ratio,
                       "per_round_pairs_median": paired_median}, f, indent=2)
    return 0


if __name__ == "__main__":
    from lensjax import hugepages
    hugepages.restart_with_hugepages()
    sys.exit(main())
