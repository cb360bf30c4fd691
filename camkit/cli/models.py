"""Models from a spec (``torchvision:NAME``, ``timm:NAME``, ``module.path:factory``) with their
weights, categories and preprocessing when they are known.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from ..errors import CheckpointError, ModelSpecError, did_you_mean
from .checkpoints import is_checkpoint_path, load_checkpoint
from .preprocess import Preprocess, preprocess_from_timm, preprocess_from_torchvision
from .support import first_line, require

__all__ = [
    "LoadedModel",
    "load_model",
]


@dataclass
class LoadedModel:
    """A model built from a spec, in eval mode, on the CPU.

    Attributes:
        model: the model.
        spec: the spec it was built from.
        weights: the weights loaded, in words (``None`` when none were).
        categories: class names by index, when the weights carry them.
        preprocess: the preprocessing the weights were trained with, when known.
        random_init: the model has the random weights of its constructor.
    """

    model: nn.Module
    spec: str
    weights: str | None = None
    categories: list[str] | None = None
    preprocess: Preprocess | None = None
    random_init: bool = False


def load_model(
    spec: str, weights: str | None = None, num_classes: int | None = None
) -> LoadedModel:
    """Build the model ``spec`` names and load ``weights`` into it.

    Args:
        spec: ``torchvision:NAME`` (an image classification model of ``torchvision.models``),
            ``timm:NAME`` (needs timm), ``hf:PATH`` (a Hugging Face model saved in a local
            folder with ``save_pretrained``, and its image processor when saved; needs
            transformers) or ``module.path:factory`` (``path/to/file.py:factory``
            works too): the module is imported with the current directory on ``sys.path`` and
            the factory (a function or class, dotted attributes allowed) is called with no
            arguments.
        weights: for torchvision, a weights name (``DEFAULT``, ``IMAGENET1K_V1``,
            ``ResNet18_Weights.IMAGENET1K_V1``) or a checkpoint path; for timm, ``pretrained``
            or a checkpoint path; for a factory, a checkpoint path. A path that exists is always
            read as a checkpoint.
        num_classes: the classifier size, for torchvision and timm models.

    Returns:
        A :class:`LoadedModel` in eval mode.

    Raises:
        ModelSpecError, CheckpointError, MissingDependencyError: with what to do.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise ModelSpecError(
            f"model spec {spec!r} is not one of torchvision:NAME, timm:NAME, hf:PATH or "
            "module.path:factory (for example torchvision:resnet50 or mypkg.models:build)."
        )
    if kind == "torchvision":
        loaded = _torchvision(spec, rest, weights, num_classes)
    elif kind == "timm":
        loaded = _timm(spec, rest, weights, num_classes)
    elif kind == "hf":
        loaded = _hf(spec, rest, weights, num_classes)
    else:
        if num_classes is not None:
            raise ModelSpecError(
                "--num-classes applies to torchvision and timm specs; a factory builds its "
                f"own model, so build {spec!r} with the right number of classes."
            )
        loaded = _factory(spec, weights)
    loaded.model.eval()
    return loaded


def _torchvision(spec: str, name: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    models = require("torchvision.models", "torchvision", f"model spec {spec!r}")
    available = list(models.list_models(module=models))
    if name not in available:
        if name in models.list_models():
            raise ModelSpecError(
                f"torchvision model {name!r} is not an image classification model; camkit "
                "explain takes the models of torchvision.models.list_models(module="
                "torchvision.models)."
            )
        hint = did_you_mean(name.lower(), available)
        raise ModelSpecError(
            f"unknown torchvision model {name!r}.{hint} The image classification models are "
            "listed by torchvision.models.list_models(module=torchvision.models)."
        )
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights is None or is_checkpoint_path(weights):
        model = models.get_model(name, weights=None, **kwargs)
        if weights is None:
            return LoadedModel(model, spec, random_init=True)
        load_checkpoint(model, weights, spec, num_classes_hint=True)
        return LoadedModel(model, spec, weights=str(weights))
    w = _torchvision_weights(models, spec, name, weights)
    try:
        model = models.get_model(name, weights=w, **kwargs)
    except ValueError as exc:
        raise ModelSpecError(f"{spec} with weights {w}: {first_line(exc)}") from exc
    except Exception as exc:
        raise CheckpointError(
            f"cannot load the torchvision weights {w} ({w.url}): {type(exc).__name__}: "
            f"{first_line(exc)}. Check the network connection, or put the file in torch's "
            "cache ($TORCH_HOME/hub/checkpoints), or pass a checkpoint path to --weights."
        ) from exc
    categories = w.meta.get("categories")
    return LoadedModel(
        model,
        spec,
        weights=str(w),
        categories=list(categories) if categories else None,
        preprocess=preprocess_from_torchvision(w),
    )


def _torchvision_weights(models: ModuleType, spec: str, name: str, text: str) -> Any:
    enum = models.get_model_weights(name)
    valid = ["DEFAULT", *(m.name for m in enum)]
    cls, dot, member = text.rpartition(".")
    if dot and cls != enum.__name__:
        raise ModelSpecError(
            f"weights {text!r} are not weights of {spec} ({enum.__name__}); valid names: "
            f"{', '.join(valid)}, or the path of a checkpoint file."
        )
    try:
        return enum[member.upper()]
    except KeyError:
        raise ModelSpecError(
            f"unknown weights {text!r} for {spec}, and no such file; valid names: "
            f"{', '.join(valid)}, or the path of a checkpoint file."
        ) from None


def _timm(spec: str, name: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    timm = require("timm", "timm", f"model spec {spec!r}")
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and not is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ModelSpecError(
            f"unknown timm model {name!r}.{hint} List them with timm.list_models()."
        )
    pretrained = weights is not None and weights.lower() in ("pretrained", "default")
    if weights is not None and not pretrained and not is_checkpoint_path(weights):
        raise CheckpointError(
            f"--weights {weights!r} for {spec}: no such file; pass 'pretrained' for timm's "
            "pretrained weights or the path of a checkpoint file."
        )
    kwargs: dict[str, Any] = {"pretrained": pretrained}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as exc:
        raise CheckpointError(
            f"timm could not build {name!r}{' with pretrained weights' if pretrained else ''}: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
    if weights is not None and not pretrained:
        load_checkpoint(model, weights, spec, num_classes_hint=True)
    try:
        data = getattr(timm, "data", None) or importlib.import_module("timm.data")
        config = data.resolve_data_config({}, model=model)
    except Exception:  # an old or unusual timm: the defaults apply
        config = None
    categories = _timm_labels(timm, model) if pretrained else None
    return LoadedModel(
        model,
        spec,
        weights="timm pretrained" if pretrained else weights,
        categories=categories,
        preprocess=preprocess_from_timm(config, name) if config else None,
        random_init=weights is None,
    )


#: transformers auto classes by the end of the saved architecture's name, tried in order
_HF_AUTO = (
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForImageClassificationWithTeacher", "AutoModelForImageClassification"),
    ("ForObjectDetection", "AutoModelForObjectDetection"),
    ("ForSemanticSegmentation", "AutoModelForSemanticSegmentation"),
)


def _hf(spec: str, path: str, weights: str | None, num_classes: int | None) -> LoadedModel:
    """A transformers model from a local folder (``save_pretrained``), nothing downloaded."""
    transformers = require("transformers", "transformers", f"model spec {spec!r}")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelSpecError(
            f"model spec {spec!r}: {folder} is not a folder holding a saved Hugging Face model "
            "(no config.json); save one with model.save_pretrained(folder)."
        )
    if weights is not None or num_classes is not None:
        raise ModelSpecError(
            f"--weights and --num-classes do not apply to {spec!r}: the folder holds the "
            "model's weights and configuration."
        )
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [""])[0]
        auto = next((a for end, a in _HF_AUTO if arch.endswith(end)), "AutoModel")
        model = getattr(transformers, auto).from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"transformers could not load {folder}: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    labels = getattr(config, "id2label", None) or {}
    names = [str(labels[i]) for i in sorted(labels)] if labels else None
    if names and all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = None  # transformers' placeholder names
    return LoadedModel(
        model,
        spec,
        weights=f"saved in {folder}",
        categories=names,
        preprocess=_hf_preprocess(transformers, folder),
    )


def _hf_preprocess(transformers: ModuleType, folder: Path) -> Preprocess | None:
    """The saved image processor's resize and normalisation, when one was saved."""
    if not (folder / "preprocessor_config.json").is_file():
        return None
    try:
        proc = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception:  # an unusual processor: the defaults apply, and the summary says so
        return None
    size = getattr(proc, "size", None) or {}
    if "height" in size and "width" in size:
        hw = (int(size["height"]), int(size["width"]))
    elif "shortest_edge" in size:
        hw = (int(size["shortest_edge"]),) * 2
    else:
        return None
    mean = getattr(proc, "image_mean", None) if getattr(proc, "do_normalize", True) else None
    std = getattr(proc, "image_std", None) if getattr(proc, "do_normalize", True) else None
    return Preprocess(
        size=hw,
        mean=tuple(float(v) for v in (mean or (0.0, 0.0, 0.0))),
        std=tuple(float(v) for v in (std or (1.0, 1.0, 1.0))),
        source=f"image processor saved in {folder}",
    )


def _timm_labels(timm: ModuleType, model: nn.Module) -> list[str] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names") if isinstance(cfg, Mapping) else None
    if names:
        return [str(n) for n in names]
    try:
        subset = timm.data.infer_imagenet_subset(model)
        if not subset:
            return None
        info = timm.data.ImageNetInfo(subset)
        return [str(info.index_to_description(i)) for i in range(info.num_classes())]
    except Exception:  # labels are a convenience; older timm has no ImageNetInfo
        return None


@contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(spec: str, module_name: str) -> ModuleType:
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise ModelSpecError(f"model spec {spec!r}: {path} is not a file.")
        name = f"camkit_user_{path.stem}"
        found = importlib.util.spec_from_file_location(name, path)
        if found is None or found.loader is None:
            raise ModelSpecError(f"model spec {spec!r}: cannot import {path} as a module.")
        module = importlib.util.module_from_spec(found)
        sys.modules[name] = module
        try:
            found.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ModelSpecError(
                f"importing {path} for model spec {spec!r} raised {type(exc).__name__}: "
                f"{first_line(exc)}"
            ) from exc
        return module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == module_name or module_name.startswith(exc.name + ".")):
            raise ModelSpecError(
                f"model spec {spec!r}: no module named {exc.name!r} in the current directory "
                f"({os.getcwd()}) or the installed packages. Check the spelling, run from the "
                "folder that holds it, or use torchvision:NAME / timm:NAME."
            ) from exc
        raise ModelSpecError(
            f"importing {module_name!r} for model spec {spec!r} failed: {first_line(exc)}"
        ) from exc
    except Exception as exc:
        raise ModelSpecError(
            f"importing {module_name!r} for model spec {spec!r} raised "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _factory(spec: str, weights: str | None) -> LoadedModel:
    module_name, _, attr = spec.rpartition(":")
    with _cwd_on_path():
        module = _import(spec, module_name)
        obj: Any = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                names = [n for n in dir(module) if not n.startswith("_")]
                hint = did_you_mean(part, names)
                raise ModelSpecError(
                    f"model spec {spec!r}: {module_name} has no attribute {attr!r}.{hint}"
                ) from None
        if not callable(obj):
            raise ModelSpecError(
                f"model spec {spec!r}: {attr} is a {type(obj).__name__}, not a function or "
                "class that builds the model."
            )
        try:
            model = obj()
        except Exception as exc:
            raise ModelSpecError(
                f"model spec {spec!r}: calling {attr}() raised {type(exc).__name__}: "
                f"{first_line(exc)}"
            ) from exc
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model spec {spec!r}: {attr}() returned a {type(model).__name__}; it must return "
            "a torch.nn.Module."
        )
    if weights is not None:
        load_checkpoint(model, weights, spec)
    return LoadedModel(model, spec, weights=weights)
