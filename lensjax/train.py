"""The one training loop: mesh, sharded jit step, orbax checkpoints, clu metrics.

    from lensjax import train
    train.train_and_evaluate(config, workdir)

A task (lensjax.tasks.<name>, protocol in lensjax/tasks/__init__.py) supplies
`create_model(config, rngs)`, `loss_fn(model, batch, rng) -> (loss, aux)` and
`selection_metrics(config, trained, mesh) -> dict`; this module is written once
and serves every task.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from flax import nnx

from lensjax import checkpointing, compilation, parallel, tasks, writers
from lensjax.data import pipeline, transforms

TrainState = dict[str, Any]

# Test hook: SIGKILL the process right after the checkpoint of this step is written.
_KILL_AFTER_STEP = int(os.environ.get("LENSJAX_TEST_KILL_AFTER_STEP", "-1"))


def _train_metrics_class(aux_names: tuple[str, ...]):
    fields = {"loss": metrics.Average.from_output("loss")}
    fields.update({name: metrics.Average.from_output(name) for name in aux_names})
    return metrics.Collection.create(**fields)


# ----------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------

def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0, then cosine decay to `final_lr_fraction` of the peak."""
    warmup = min(train.warmup_steps, max(train.steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train.learning_rate, warmup_steps=warmup,
        decay_steps=max(train.steps, warmup + 1),
        end_value=train.learning_rate * train.get("final_lr_fraction", 0.0))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` as one scalar factor per step: each update t becomes
    t * (1 if ||g|| < max_norm else max_norm / ||g||).

    optax writes the clip as select(||g|| < max_norm, t, t / ||g|| * max_norm), which
    XLA:CPU computes by materialising the scaled gradient and reading it beside the
    raw one in each of AdamW's loops; a scalar factor lets each loop read the raw
    gradient once: the ResNet-18 step at 64 px reads and writes 2.40 GB instead of
    2.62 (XLA's cost analysis) and runs 1.01x faster on CPU, at 150 px 1.005x (the
    ViT-S MAE 2.88 GB instead of 3.23, in the same time). The same values where no
    clipping happens; where it does, the product differs from optax's by rounding
    (tested). State: optax's EmptyState, so checkpoints are interchangeable.
    """
    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        factor = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * factor.astype(t.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def _path_name(path) -> str:
    """"blocks/0/conv1/kernel" for a pytree path into an nnx.State of parameters."""
    parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return "/".join(p for p in parts if p != ".value")


def parameter_groups(params, train: ml_collections.ConfigDict, model: nnx.Module | None
                     ) -> tuple[Any, dict[str, float]]:
    """Label every parameter with its optimiser group; returns (labels, group -> LR scale).

    Groups: "frozen" (paths matching `train.frozen`, a regex: never updated, as in a
    linear probe), and with `train.layer_decay` = d in (0, 1) one group per layer
    `layer<i>` scaled by d ** (num_layers - i) (layer ids from `model.layer_id(path)`,
    which models supporting it define; the head is the last layer, so it keeps the
    full rate). Everything else is "default" (scale 1).
    """
    pattern = re.compile(train.frozen) if train.get("frozen") else None
    decay = float(train.get("layer_decay") or 0.0)
    if decay and not hasattr(model, "layer_id"):
        raise ValueError(f"config.train.layer_decay={decay} needs a model with layer ids "
                         f"(e.g. a ViT); {type(model).__name__} has none. Set it to 0.")
    if decay and not 0.0 < decay < 1.0:
        raise ValueError(f"config.train.layer_decay must be in (0, 1), got {decay}")
    scales = {"default": 1.0, "frozen": 0.0}

    def label(path, _):
        name = _path_name(path)
        if pattern is not None and pattern.search(name):
            return "frozen"
        if decay:
            layer = int(model.layer_id(name))
            scales[f"layer{layer}"] = decay ** (model.num_layers - layer)
            return f"layer{layer}"
        return "default"

    labels = jax.tree_util.tree_map_with_path(label, params)
    if pattern is not None and "frozen" not in jax.tree.leaves(labels):
        raise ValueError(f"config.train.frozen={train.frozen!r} matches no parameter; "
                         f"paths look like {_path_name(jax.tree_util.tree_flatten_with_path(params)[0][0][0])!r}")
    return labels, scales


def make_optimizer(train: ml_collections.ConfigDict, params=None,
                   model: nnx.Module | None = None) -> optax.GradientTransformation:
    """AdamW with warmup + cosine decay, gradient clipping, per-group LR scales.

    Weight decay applies to matrices and kernels only (ndim >= 2), not to biases,
    norms or embeddings of rank 1, as is standard for both ResNets and ViTs.
    """
    schedule = learning_rate_schedule(train)

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(lambda step: scale * schedule(step), weight_decay=train.weight_decay,
                           mask=lambda tree: jax.tree.map(lambda x: np.ndim(x) >= 2, tree))

    if params is None or (not train.get("frozen") and not train.get("layer_decay")):
        inner = adamw(1.0)
    else:
        labels, scales = parameter_groups(params, train, model)
        transforms = {name: optax.set_to_zero() if scale == 0.0 else adamw(scale)
                      for name, scale in scales.items()}
        inner = optax.multi_transform(transforms, labels)
    parts = []
    if train.get("grad_clip_norm"):
        parts.append(clip_by_global_norm(train.grad_clip_norm))
    parts.append(inner)
    return optax.chain(*parts)


# ----------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------

def init_state(config: ml_collections.ConfigDict, task, tx=None, *, abstract: bool = False
               ) -> tuple[nnx.GraphDef, TrainState, optax.GradientTransformation]:
    """Model graph definition, the initial train state and the optimiser (built from the
    config unless `tx` is given).

    The state is initialised inside one jit: built eagerly, every parameter's
    initialiser would compile on its own (tens of seconds on a CPU for a UNet). That
    jit is `compilation.jit_once`: it runs once, so it is compiled for a short compile.
    abstract=True returns jax.ShapeDtypeStructs instead (a restore target, no compute).
    """
    def build() -> nnx.Module:
        return task.create_model(config, nnx.Rngs(config.seed))

    abstract_model = nnx.eval_shape(build)
    graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    if tx is None:
        tx = make_optimizer(config.train, abstract_params, abstract_model)
    keep_ema = bool(config.train.get("ema_decay", 0.0))

    def initial_state() -> TrainState:
        _, params, model_state = nnx.split(build(), nnx.Param, ...)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": model_state,
                 "opt_state": tx.init(params)}
        if keep_ema:
            state["ema_params"] = jax.tree.map(jnp.copy, params)
        return state

    state = jax.eval_shape(initial_state) if abstract else compilation.jit_once(initial_state)()
    return graphdef, state, tx


def make_train_step(graphdef, task, tx, config, metrics_class) -> Callable:
    """The pure step: (state, batch, rng) -> (state, metrics)."""
    ema_decay = float(config.train.get("ema_decay", 0.0))

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        model = nnx.merge(graphdef, state["params"], state["model_state"])
        model.train()

        def loss(model):
            return task.loss_fn(model, batch, rng)

        (loss_value, aux), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        params = nnx.state(model, nnx.Param)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {"step": state["step"] + 1, "params": params,
                     "model_state": nnx.state(model, nnx.Not(nnx.Param)),
                     "opt_state": opt_state}
        if "ema_params" in state:
            new_state["ema_params"] = optax.incremental_update(params, state["ema_params"],
                                                               1.0 - ema_decay)
        step_metrics = metrics_class.single_from_model_output(
            loss=loss_value, **{k: aux[k] for k in task.AUX_METRICS})
        return new_state, step_metrics

    return train_step


def state_shardings(state: TrainState, mesh, fsdp_min_size: int | None) -> TrainState:
    """Shardings of a train state: replicated, or with FSDP (`fsdp_min_size`) every large
    array of the parameters, their EMA and the optimiser state (AdamW's moments have the
    shapes of the parameters, so they are split the same way) sharded over `data`."""
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    for name in ("params", "ema_params", "opt_state"):
        if name in state:
            shardings[name] = parallel.param_shardings(state[name], mesh, fsdp_min_size)
    return shardings


def jit_train_step(train_step, state, mesh, config):
    shardings = state_shardings(state, mesh, config.mesh.get("fsdp_min_size") or None)
    return compilation.jit(train_step,
                           in_shardings=(shardings, parallel.batch_sharding(mesh),
                                         parallel.replicated(mesh)),
                           out_shardings=(shardings, parallel.replicated(mesh)),
                           donate_argnums=(0,)), shardings


def build_train_step(graphdef, task, tx, config, state, mesh):
    """The jitted step of `task` as the training loop runs it (clu metrics of the loss and
    the task's AUX_METRICS, explicit shardings, donated state): (step_fn, state shardings)."""
    metrics_class = _train_metrics_class(tuple(task.AUX_METRICS))
    return jit_train_step(make_train_step(graphdef, task, tx, config, metrics_class),
                          state, mesh, config)


def eval_model(graphdef: nnx.GraphDef, state: TrainState, use_ema: bool = True) -> nnx.Module:
    """The model of a train state in eval mode, with its EMA parameters when it has them."""
    params = state["ema_params"] if use_ema and "ema_params" in state else state["params"]
    model = nnx.merge(graphdef, params, state["model_state"])
    model.eval()
    return model


def make_predict(graphdef, task, mesh, use_ema: bool):
    """jitted (state, batch) -> task.predict output, in eval mode."""
    def predict(state, batch):
        return task.predict(eval_model(graphdef, state, use_ema), batch)
    return compilation.jit(predict, out_shardings=parallel.batch_sharding(mesh))


class TrainedModel:
    """A trained (restored or in-training) model as evaluators see it: eval mode, EMA
    parameters when the run keeps them.

    predict(batch): the task's `predict`, jitted with batch-sharded outputs.
    jit(fn): fn(model, *args) -> a jitted callable(*args) over this model, for
    evaluators that need more than per-batch predictions (e.g. diffusion sampling).
    """

    def __init__(self, graphdef: nnx.GraphDef, state: TrainState, task, mesh: jax.sharding.Mesh,
                 use_ema: bool = True):
        self.graphdef, self.state, self.task, self.mesh = graphdef, state, task, mesh
        self.use_ema = use_ema
        self._predict = make_predict(graphdef, task, mesh, use_ema)

    def predict(self, batch: dict) -> dict:
        return self._predict(self.state, batch)

    def jit(self, fn: Callable, **jit_kwargs) -> Callable:
        graphdef, use_ema = self.graphdef, self.use_ema
        jitted = compilation.jit(
            lambda state, *args: fn(eval_model(graphdef, state, use_ema), *args), **jit_kwargs)
        return lambda *args: jitted(self.state, *args)

    def model(self) -> nnx.Module:
        """The model itself (eval mode), outside jit: for small host-side work."""
        return eval_model(self.graphdef, self.state, self.use_ema)


# ----------------------------------------------------------------------------
# Start-up: restore order
# ----------------------------------------------------------------------------

def check_same_normalization(config: ml_collections.ConfigDict, source_workdir: str | Path) -> None:
    """A warm start must see images scaled exactly as the source run saw them.

    Compared: `transforms.effective_normalization` of both runs (data.normalization,
    or with "none" the scaling the data were stored with, e.g. "minmax" for the VI.B
    pairs, stored in [0, 1]).
    """
    path = Path(source_workdir) / "config.json"
    if not path.is_file():
        return  # a bare checkpoint folder: nothing recorded to compare
    source = json.loads(path.read_text()).get("data", {})
    theirs = transforms.effective_normalization(source)
    ours = transforms.effective_normalization(config.data)
    if theirs != ours:
        raise ValueError(
            f"config.model_init={source_workdir} saw images scaled by {theirs!r} "
            f"(data.normalization, or the stored scaling of its data) but this run feeds "
            f"{ours!r}; fine-tuning must scale images as pretraining did. Fix: set "
            f"--config.data.normalization so that both agree (for data stored unscaled: "
            f"--config.data.normalization={theirs}).")


def restore_or_init(config, workdir: Path, state: TrainState, shardings, latest) -> tuple[TrainState, str]:
    """Apply DESIGN.md's restore order; returns the state and where it came from."""
    place = lambda tree: jax.device_put(tree, shardings)  # noqa: E731
    if latest.latest_step() is not None:
        return checkpointing.restore(latest, place(state)), f"resumed {workdir} step {latest.latest_step()}"
    if config.get("resume"):
        manager, step = checkpointing.find_checkpoint(config.resume, prefer_best=False)
        return checkpointing.restore(manager, place(state), step), f"resumed from {config.resume} step {step}"
    state = place(state)
    if config.get("model_init"):
        check_same_normalization(config, config.model_init)
        source, step = checkpointing.read_raw(config.model_init, prefer_best=True)
        src_params = source.get("ema_params", source["params"]) if "params" in source else source
        pure, copied = checkpointing.warm_start_params(nnx.to_pure_dict(state["params"]), src_params)
        if not copied:
            raise ValueError(f"config.model_init={config.model_init}: no parameter matched by "
                             "name and shape; is it a checkpoint of a compatible model?")
        nnx.replace_by_pure_dict(state["params"], pure)
        state = place(state)
        return state, f"warm start from {config.model_init} step {step} ({len(copied)} arrays)"
    return state, "from scratch"


# ----------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------

class LongLivedObjectsFrozen:
    """While active, objects alive at `freeze()` are out of Python's garbage collector's reach.

    A full (generation-2) collection walks every tracked object. Once JAX, Flax,
    TensorFlow and a compiled train step are loaded, that is about 600,000 objects
    and 240-300 ms per collection on the 2-core development CPU: a stall of several
    demo steps, every time the young objects' churn triggers one. The setup's objects
    live for the whole run anyway; frozen (`gc.freeze`), a full collection takes
    about 13 ms. On exit they are unfrozen, so a process that trains several times
    (a test session) can still collect the cycles of a finished run. Where something
    else froze objects first, it leaves the freeze as it was.
    """

    def __enter__(self):
        self._ours = gc.get_freeze_count() == 0
        return self

    def freeze(self) -> None:
        """Collect once, then freeze every object alive now."""
        if self._ours:
            gc.collect()
            gc.freeze()

    def __exit__(self, *exc):
        if self._ours:
            gc.unfreeze()


class _Preemption:
    """SIGTERM (SLURM preemption, a cluster's shutdown notice) -> save and exit cleanly.

    One process: a Python SIGTERM handler sets a flag. Several processes: every
    process must take the same decision at the same step (the save is collective),
    so JAX's preemption sync point, which jax.distributed installs, decides.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        if self._multiprocess:
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def _handler(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping")
        self.requested = True

    def check(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every process)."""
        if self._multiprocess and not self.requested:
            from jax.experimental import multihost_utils
            self.requested = bool(multihost_utils.reached_preemption_sync_point(step))
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def write_config(config: ml_collections.ConfigDict, workdir: Path) -> None:
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train `config.task` for config.train.steps steps in `workdir`; returns final metrics."""
    workdir = Path(workdir)
    write_config(config, workdir)
    if jax.process_index() == 0:
        pipeline.record_split(config, workdir)
    task = tasks.get_task(config.task)
    mesh = parallel.make_mesh(config.get("num_devices") or None)
    parallel.check_global_batch(config.train.batch_size, mesh)
    parallel.check_global_batch(config.eval.batch_size, mesh)
    # TensorBoard through clu where TensorFlow is installed, else workdir/metrics.jsonl.
    writer = writers.create_writer(workdir, just_logging=jax.process_index() > 0)

    # --- model, optimiser, state ---------------------------------------------------
    graphdef, state, tx = init_state(config, task)
    step_fn, shardings = build_train_step(graphdef, task, tx, config, state, mesh)
    latest = checkpointing.latest_manager(workdir, keep=config.train.keep_checkpoints)
    metric_name, metric_mode = task.SELECTION_METRIC
    best = checkpointing.best_manager(workdir, metric_name, metric_mode)
    state, origin = restore_or_init(config, workdir, state, shardings, latest)
    start_step = int(state["step"])
    logging.info("train state: %s; %d parameters", origin, sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"])))
    trained = TrainedModel(graphdef, state, task, mesh)

    # --- data and hooks ---------------------------------------------------------------
    batches = pipeline.train_iterator(config, mesh, start_step)
    root_rng = jax.random.key(config.seed)
    total = config.train.steps
    progress = writers.ProgressReport(total, config.train.log_every, writer)
    train_metrics = None
    final: dict = {}

    def save(step: int, selection: dict | None = None):
        # The two managers must not save at once: across processes, orbax names its
        # barriers by step and by fixed keys, which two concurrent saves would share.
        best.wait_until_finished()
        latest.save(step, args=checkpointing.ocp.args.StandardSave(state), force=True)
        if selection is not None:
            latest.wait_until_finished()
            best.save(step, args=checkpointing.ocp.args.StandardSave(state),
                      metrics={k: float(v) for k, v in selection.items()}, force=True)

    def check_finite(computed: dict, step: int):
        bad = {k: v for k, v in computed.items() if not np.isfinite(v)}
        if bad:
            latest.wait_until_finished()
            raise FloatingPointError(
                f"non-finite training metrics {bad} by step {step}; stopped without saving, the "
                f"last good checkpoint is step {latest.latest_step()} in {workdir / 'checkpoints'}. "
                "Lower --config.train.learning_rate or set --config.train.grad_clip_norm.")

    params_finite = jax.jit(lambda tree: jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])))

    with _Preemption() as preemption, LongLivedObjectsFrozen() as frozen:
        step = start_step
        while step < total:
            # --- one training step ----------------------------------------------------
            batch = next(batches)
            rng = jax.random.fold_in(root_rng, step)
            state, step_metrics = step_fn(state, batch, rng)
            train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
            step += 1
            if step == start_step + 1:   # the state, the data stream and the compiled step exist
                frozen.freeze()
            progress(step)
            preemption.check(step)

            # --- logging, selection, checkpoints -------------------------------------------
            is_last = step == total
            if step % config.train.log_every == 0 or is_last or preemption.requested:
                computed = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
                check_finite(computed, step)
                writer.write_scalars(step, computed)
                final.update(computed)
                train_metrics = None
            selection = None
            will_save = (step % config.train.eval_every == 0 or is_last or preemption.requested
                         or step % config.train.checkpoint_every == 0)
            if will_save and not bool(params_finite(state["params"])):
                check_finite({"parameters": float("nan")}, step)
            if step % config.train.eval_every == 0 or is_last:
                with jax.profiler.TraceAnnotation("selection"):
                    trained.state = state
                    selection = task.selection_metrics(config, trained, mesh)
                writer.write_scalars(step, {f"selection_{k}": v for k, v in selection.items()})
                final.update({f"selection_{k}": v for k, v in selection.items()})
            if (selection is not None or step % config.train.checkpoint_every == 0 or is_last
                    or preemption.requested):
                if train_metrics is not None:  # never save over an unchecked NaN
                    check_finite({k: float(v) for k, v in train_metrics.compute().items()}, step)
                save(step, selection)
            if step == _KILL_AFTER_STEP:  # tests: a hard kill once this step is on disk
                latest.wait_until_finished()
                os.kill(os.getpid(), signal.SIGKILL)
            if preemption.requested:
                logging.warning("stopped at step %d after SIGTERM; rerun the same command to resume",
                                step)
                break
    latest.wait_until_finished()
    best.wait_until_finished()
    writer.close()
    final["step"] = step
    return final
