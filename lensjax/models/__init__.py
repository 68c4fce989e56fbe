"""Model registry: build any lensjax network by name.

    model = get_model("resnet18", num_classes=3, rngs=nnx.Rngs(0), width=16)

A builder is any callable ``builder(*, rngs, **kwargs) -> nnx.Module`` registered
with ``@register(name)``; classifiers take ``num_classes``, other models (UNet,
MAE) take what they need. Model modules register themselves on import;
the imports at the bottom of this file make every built-in model available.
This package never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

Builder = Callable[..., nnx.Module]

MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(*, rngs, **kwargs)` under `name`."""

    def decorator(builder: Builder) -> Builder:
        if name in MODELS and MODELS[name] is not builder:
            raise ValueError(f"model name {name!r} is already registered by {MODELS[name]!r}")
        MODELS[name] = builder
        return builder

    return decorator


def get_model(name: str, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """Build the registered model `name` with `kwargs` (e.g. num_classes), initialised from `rngs`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
    return MODELS[name](rngs=rngs, **kwargs)


# Built-in models register themselves on import; keep these imports last, since
# they import `register` from this module.
from lensjax.models import resnet  # noqa: E402,F401
from lensjax.models import unet  # noqa: E402,F401
from lensjax.models import vit  # noqa: E402,F401
from lensjax.models import mae  # noqa: E402,F401
from lensjax.models import superres  # noqa: E402,F401
