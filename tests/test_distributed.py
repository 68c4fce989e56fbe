"""Two jax.distributed processes on localhost (gloo CPU collectives, 4 devices each)
train 3 steps and match one process with 8 devices; only process 0 writes logs."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from flax import nnx

from lensjax import checkpointing, evaluate, tasks, train

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "common_resnet18.py"
FLAGS = [f"--config={CONFIG}:runlocal=True", "--config.data.preset=model_ii",
         "--config.model.kwargs.image_size=64", "--config.train.steps=3",
         "--config.train.eval_every=100"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _params(workdir):
    # read_raw restores onto this process's devices, whatever topology saved it.
    state, step = checkpointing.read_raw(workdir, prefer_best=False)
    assert step == 3
    return state["params"]


def test_two_processes_match_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    cmd = [sys.executable, "-m", "lensjax.main"]
    one = subprocess.run(cmd + [f"--workdir={single}"] + FLAGS, cwd=REPO, env=_env(8),
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    port = _free_port()
    procs = [subprocess.Popen(cmd + [f"--workdir={multi}"] + FLAGS, cwd=REPO,
                              env=_env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                                       JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    a, b = _params(single), _params(multi)
    # Gloo's all-reduce sums gradients in another order than one process does, and
    # Adam turns last-bit differences of near-zero gradients into visible ones
    # (its step is lr * g / (|g| + eps)): compare the whole 3-step update in norm.
    config = evaluate.load_config(single)
    _, state, _ = train.init_state(config, tasks.get_task(config.task))
    init = checkpointing._plain(jax.tree.map(np.asarray, nnx.to_pure_dict(state["params"])))
    diff = sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    update = sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(init)))
    assert update > 0
    assert np.sqrt(diff / update) < 1e-2, np.sqrt(diff / update)
    # Only process 0 writes TensorBoard events.
    events = list(multi.glob("events.out.tfevents.*"))
    assert len(events) == 1, events
