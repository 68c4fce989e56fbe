"""lensjax.checkpointing: replicated arrays are saved without per-device slicing, and
restore to the same values and shardings."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lensjax import checkpointing

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _replicated_state():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Shapes no other test compiles a slice of.
    return {f"w{i}": jax.device_put(jnp.full((5 + i, 37), float(i)), replicated)
            for i in range(6)}


def _compiles_during(fn) -> int:
    events = []

    def listener(name, duration, **kwargs):
        if name == BACKEND_COMPILE_EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def test_replicated_state_is_saved_without_compiling_slices_and_restores(tmp_path):
    assert jax.device_count() == 8
    state = _replicated_state()
    manager = checkpointing.latest_manager(tmp_path)

    def save():
        manager.save(1, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()

    assert _compiles_during(save) == 0
    restored = checkpointing.restore(manager, state)
    for name, array in state.items():
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(array))
        assert restored[name].sharding == array.sharding
    # orbax's default handler slices each replicated array per device, one compiled
    # slice per new shape: the reason for StateHandler (if this starts failing, orbax
    # changed its default and StateHandler may no longer be needed).
    default = ocp.CheckpointManager(tmp_path / "default")

    def save_default():
        default.save(1, args=ocp.args.StandardSave(state), force=True)
        default.wait_until_finished()

    assert _compiles_during(save_default) > 0
    # The files are orbax's standard layout: a plain manager restores them without
    # being told the handler, and so does read_raw (evaluate, warm starts).
    plain = ocp.CheckpointManager(tmp_path / checkpointing.LATEST_DIR,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
    np.testing.assert_array_equal(np.asarray(plain.restore(1)["w5"]), np.asarray(state["w5"]))
    raw, step = checkpointing.read_raw(tmp_path, prefer_best=False)
    assert step == 1 and sorted(raw) == sorted(state)
