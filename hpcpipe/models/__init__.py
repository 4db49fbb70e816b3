"""Model families and the registry that finds one by `model.arch`.

`model.arch` is a built-in name ("gpt2", "llama") or "package.module:attribute" naming a
user's own ModelSpec (see examples/own_model and the README's "Models" section).
"""

from __future__ import annotations

from hpcpipe.models.api import ModelSpec, resolve

BUILTIN = {"gpt2": "hpcpipe.models.gpt2:SPEC", "llama": "hpcpipe.models.llama:SPEC"}
DEFAULT_ARCH = "gpt2"


class UnknownModelError(ValueError):
    """model.arch names no family."""


def get_spec(arch: str) -> ModelSpec:
    """The ModelSpec for `arch` (a built-in name or 'package.module:attribute')."""
    arch = arch or DEFAULT_ARCH
    target = BUILTIN.get(arch, arch if ":" in arch else None)
    if target is None:
        raise UnknownModelError(
            f"unknown model.arch={arch!r}; valid: {', '.join(BUILTIN)}, or "
            "'package.module:spec' naming your own ModelSpec"
        )
    try:
        spec = resolve(target)
    except (ImportError, AttributeError) as exc:
        raise UnknownModelError(
            f"model.arch={arch!r}: cannot import {target} ({exc}); give 'package.module:spec' "
            f"of an importable ModelSpec, or one of {', '.join(BUILTIN)}"
        ) from None
    if not isinstance(spec, ModelSpec):
        raise UnknownModelError(
            f"model.arch={arch!r} names a {type(spec).__name__}, not a ModelSpec"
        )
    return spec
