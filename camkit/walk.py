"""Walks over a model's modules that build no generators: they run on every call, on the
host's critical path (``nn.Module.named_modules`` costs a few microseconds per module)."""

from __future__ import annotations

from torch import nn

__all__ = ["any_training", "module_names"]


def module_names(model: nn.Module) -> dict[nn.Module, str]:
    """Map each module of ``model`` to its first dotted name (``""`` for the model): the first
    of ``model.named_modules(remove_duplicate=False)``, by a walk of the children's dicts that
    builds no generators (a call's layer resolution runs it, on the host's critical path)."""
    names: dict[nn.Module, str] = {}

    def visit(mod: nn.Module, prefix: str) -> None:
        names.setdefault(mod, prefix)
        for key, child in mod._modules.items():
            if child is not None:
                visit(child, f"{prefix}.{key}" if prefix else key)

    visit(model, "")
    return names


def any_training(model: nn.Module) -> bool:
    """Some module of ``model`` (itself included) is in training mode."""
    stack = [model]
    while stack:
        mod = stack.pop()
        if mod.training:
            return True
        stack.extend(child for child in mod._modules.values() if child is not None)
    return False
