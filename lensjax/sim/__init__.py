"""Batched, differentiable strong-lensing simulator in pure jax.numpy.

    from lensjax import sim
    preset = sim.get_preset("model_i")
    images, labels, params = preset.sample(jax.random.key(0), 64)
"""

from lensjax.sim.recipes import PRESET_NAMES, Preset, get_preset

__all__ = ["PRESET_NAMES", "Preset", "get_preset"]
