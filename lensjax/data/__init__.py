"""Input pipelines: simulated streams, the official DeepLense layouts (TFDS), one entry point.

- `lensjax.data.simulated`: on-device infinite streams from `lensjax.sim` presets.
- `lensjax.data.deeplense`: TFDS builders that read the official on-disk layouts from a
  manual dir (the only module here that imports TensorFlow).
- `lensjax.data.pipeline`: `config.data` -> iterators of global, sharded batches.

This package imports nothing itself, so `import lensjax.data` never pulls in TensorFlow.
"""
