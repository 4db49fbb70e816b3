"""Model families and the registry that finds one by `model.arch`.

`model.arch` is a built-in name ("gpt2", "llama") or "package.module:attribute" naming a
user's own ModelSpec (see examples/own_model and the README's "Models" section).

A "package.module" that does not import from sys.path as it stands is looked for in the
current working directory too, as `python -m` and uvicorn do: the directory is put on
sys.path (appended, so it never shadows an installed module) and the import retried. So
`model.arch = "examples.own_model:spec"` works from the repository root under the `hpcpipe`
console script or `python -m mpi4py script.py`, whose sys.path holds the script's folder
but not the working directory.

The returned spec's `name` is the `model.arch` that selected it, so messages quote what the
user wrote.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import sys

from hpcpipe.models.api import ModelSpec

BUILTIN = {"gpt2": "hpcpipe.models.gpt2:SPEC", "llama": "hpcpipe.models.llama:SPEC"}
DEFAULT_ARCH = "gpt2"

_TARGET = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class UnknownModelError(ValueError):
    """model.arch names no family."""


def _valid() -> str:
    return f"valid: {', '.join(BUILTIN)}, or 'package.module:spec' naming your own ModelSpec"


def _on_path(directory: str) -> bool:
    # '' on sys.path is the working directory (the interactive interpreter, `python -c`)
    return any(os.path.abspath(p or os.curdir) == directory for p in sys.path)


def _is_missing(module_name: str, exc: ImportError) -> bool:
    """True when `exc` says `module_name` itself (or a package above it) is not found."""
    missing = getattr(exc, "name", None) or ""
    found = not isinstance(exc, ModuleNotFoundError) or not missing
    return not found and (module_name == missing or module_name.startswith(missing + "."))


def _import(module_name: str, search_cwd: bool):
    """Import `module_name`, retrying with the working directory on sys.path if it is missing."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # only when the target itself is missing, not a module that the target imports
        if not search_cwd or not _is_missing(module_name, exc):
            raise
        cwd = os.getcwd()
        if _on_path(cwd):
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(module_name)


def get_spec(arch: str) -> ModelSpec:
    """The ModelSpec for `arch` (a built-in name or 'package.module:attribute')."""
    arch = arch or DEFAULT_ARCH
    target = BUILTIN.get(arch, arch if ":" in arch else None)
    if target is None:
        hint = f"; a module needs its attribute too, e.g. '{arch}:spec'" if "." in arch else ""
        raise UnknownModelError(f"unknown model.arch={arch!r}; {_valid()}{hint}")
    if not _TARGET.fullmatch(target):
        raise UnknownModelError(
            f"model.arch={arch!r} is not 'package.module:attribute' (e.g. "
            f"'examples.own_model:spec'); {_valid()}"
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = _import(module_name, search_cwd=arch not in BUILTIN)
    except ImportError as exc:
        if _is_missing(module_name, exc) and arch not in BUILTIN:
            why = (
                f"no module {exc.name!r} on sys.path or in the working directory {os.getcwd()}; "
                "run from the folder that holds the package, or install it"
            )
        else:
            why = f"importing {module_name} failed: {type(exc).__name__}: {exc}"
        raise UnknownModelError(f"model.arch={arch!r}: {why}; {_valid()}") from None
    if not hasattr(module, attribute):
        found = [n for n, v in vars(module).items() if isinstance(v, ModelSpec)]
        has = f"; its ModelSpecs: {', '.join(found)}" if found else "; it defines no ModelSpec"
        raise UnknownModelError(
            f"model.arch={arch!r}: module {module_name} has no attribute {attribute!r}{has}"
        )
    spec = getattr(module, attribute)
    if not isinstance(spec, ModelSpec):
        raise UnknownModelError(
            f"model.arch={arch!r} names a {type(spec).__name__}, not a ModelSpec"
        )
    return spec if spec.name == arch else dataclasses.replace(spec, name=arch)
