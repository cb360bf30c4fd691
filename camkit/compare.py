"""``camkit.compare``: explain a data set with several methods and score every map with several
metrics; one :class:`~camkit.comparison.Comparison` back.

Under ``torchrun`` (``torch.distributed`` initialised) each rank takes whole batches of the
single-process order, round robin, the per-sample values of all ranks are gathered, and every
rank returns the same comparison (the caller writes it on rank 0): every sample is computed in
the batch it has in one process, so its values, the means and the intervals are those of one
process to the last bit.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .comparison import Comparison
from .errors import CamkitWarning, InputError
from .evaluate import evaluate
from .explain import explain
from .progress import bar
from .registry import Registry, default_registry

__all__ = ["compare"]

Batch = tuple[Tensor, Tensor, Tensor | None, Tensor | None]  # indices, x, labels, masks


def _unpack(batch: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None, None
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3:
        parts = list(batch) + [None] * (3 - len(batch))
        if isinstance(parts[0], Tensor):
            return parts[0], parts[1], parts[2]
    raise InputError(
        "compare expects batches of x, (x, y) or (x, y, masks) tensors; got "
        f"{type(batch).__name__}. Return one of these from the dataset's __getitem__."
    )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _batches(data: Any, batch_size: int) -> tuple[int | None, Iterator[Batch]]:
    """The number of samples this process handles (``None`` if unknown) and its batches with
    their global sample indices."""
    loader: DataLoader[Any] | None = None
    if isinstance(data, DataLoader):
        if not _distributed():
            return _count(data), _running(data)
        loader, dataset = data, data.dataset
        batch_size = data.batch_size or batch_size
    elif isinstance(data, Tensor):
        dataset = TensorDataset(data)
    elif isinstance(data, (tuple, list)) and data and all(isinstance(t, Tensor) for t in data):
        dataset = TensorDataset(*data)
    elif isinstance(data, Dataset):
        dataset = data
    else:
        raise InputError(
            "compare expects data as a DataLoader, a Dataset, a tensor x or a tuple (x, y) or "
            f"(x, y, masks) of tensors; got {type(data).__name__}."
        )
    order = list(range(len(dataset)))  # type: ignore[arg-type]
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if _distributed():
        # whole batches of the single-process order, round robin: every sample is computed in
        # the same batch as in one process, so its values are the same to the last bit (batched
        # kernels round differently for other batch compositions)
        chunks = chunks[dist.get_rank() :: dist.get_world_size()]
    collate = loader.collate_fn if loader is not None else None
    workers = loader.num_workers if loader is not None else 0
    batched = DataLoader(dataset, batch_sampler=chunks, collate_fn=collate, num_workers=workers)

    def gen() -> Iterator[Batch]:
        for idx, batch in zip(chunks, batched, strict=True):
            x, y, masks = _unpack(batch)
            yield torch.tensor(idx), x, y, masks

    return sum(len(c) for c in chunks), gen()


def _count(loader: DataLoader[Any]) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return None


def _running(loader: Iterable[Any]) -> Iterator[Batch]:
    start = 0
    for batch in loader:
        x, y, masks = _unpack(batch)
        yield torch.arange(start, start + x.shape[0]), x, y, masks
        start += x.shape[0]


def _memory_probe(device: torch.device) -> Callable[[], int | None]:
    """Start measuring; the returned function gives the peak growth in bytes since."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        return lambda: torch.cuda.max_memory_allocated(device) - base
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return lambda: None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return lambda: (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _run_batch(
    model: nn.Module,
    batch: Batch,
    plan: _Plan,
) -> dict[str, Any]:
    """Explain one batch with every method and score it with every metric."""
    index, x, y, masks = batch
    device = plan.device
    x = x.to(device)
    masks = None if masks is None else masks.to(device)
    target = plan.target if plan.target is not None else (None if y is None else y.to(device))
    record: dict[str, Any] = {"indices": index, "values": {}, "seconds": {}, "memory": {}}
    keep = index < plan.figure_images
    if bool(keep.any()):
        record["examples"] = (index[keep], x[keep].detach().cpu(), {})
    for method in plan.methods:
        opts = dict(plan.method_options.get(method, {}))
        opts.setdefault("seed", plan.seed)
        probe = _memory_probe(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        res = explain(model, x, method=method, layer=plan.layer, target=target, **opts)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        record["seconds"][method] = time.perf_counter() - start
        record["memory"][method] = probe()
        if "examples" in record:
            record["examples"][2][method] = res.maps[keep.to(res.maps.device)].detach().cpu()
        explained = res.targets if res.targets is not None else target
        values = {}
        for metric in plan.metrics:
            needs = plan.needs[metric]
            if ("masks" in needs and masks is None) or (
                "other-objects" in needs
                and (masks is None or masks.ndim != x.ndim or masks.shape[1] < 2)
            ):
                continue
            mopts = dict(plan.metric_options.get(metric, {}))
            mopts.setdefault("seed", plan.seed)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = evaluate(
                    model, x, res, metric, target=explained, masks=masks,
                    method_options=opts, registry=plan.registry, **mopts,
                )  # fmt: skip
            for w in caught:  # undefined values are summed up once, at the end
                if "is undefined for" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            values[metric] = out.values.double()
        record["values"][method] = values
    return record


class _Plan:
    """What every batch is run with."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    device: torch.device
    methods: list[str]
    metrics: list[str]
    needs: dict[str, tuple[str, ...]]
    layer: Any
    target: Any
    method_options: Mapping[str, Mapping[str, Any]]
    metric_options: Mapping[str, Mapping[str, Any]]
    seed: int
    figure_images: int
    registry: Registry


def _load_checkpoint(path: Path | None, key: str) -> list[dict[str, Any]]:
    if path is None or not path.exists():
        return []
    saved = torch.load(path, weights_only=False)
    if not isinstance(saved, dict) or saved.get("key") != key:
        raise InputError(
            f"the partial results in {str(path)!r} come from a different comparison (methods, "
            "metrics, options or data); delete the file or choose another output folder."
        )
    records: list[dict[str, Any]] = saved["records"]
    return records


def _save_checkpoint(path: Path | None, key: str, records: list[dict[str, Any]]) -> None:
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"key": key, "records": records}, tmp)
    os.replace(tmp, path)


def _gather(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not _distributed():
        return records
    everyone: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, records)
    return [r for rank in everyone for r in (rank or [])]


def compare(
    model: nn.Module,
    data: Any,
    methods: Sequence[str] = ("gradcam", "random"),
    metrics: Sequence[str] = ("deletion", "insertion"),
    layer: Any = None,
    target: Any = None,
    *,
    batch_size: int = 32,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    figure_images: int = 4,
    progress: bool | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    registry: Registry | None = None,
) -> Comparison:
    """Compare methods on metrics over ``data``.

    Args:
        model: the model; each method explains it and each metric scores it, on the device of
            its parameters (the CPU for a model without any).
        data: a ``DataLoader`` or ``Dataset`` of ``x``, ``(x, y)`` or ``(x, y, masks)``, or
            such tensors (``x`` ``(N, C, *S)``, ``y`` ``(N,)`` classes, ``masks`` ``(N, *S)``
            or ``(N, K, *S)`` bool, region 0 the labelled object's).
        methods: method names (aliases allowed).
        metrics: metric names; those that need masks are skipped, with the reason, when the data
            has none.
        layer: the layer to explain (``None``: found per model, as ``camkit.explain`` does).
        target: what to explain: ``None`` for the labels ``y`` when the data has them, else the
            predicted class; or anything ``camkit.explain`` accepts.
        batch_size: samples per explain call.
        method_options: ``{method: {option: value}}`` options per method.
        metric_options: ``{metric: {option: value}}`` options per metric.
        n_bootstrap: resamples of the bootstrap intervals.
        seed: seeds every method and metric, and the bootstrap.
        figure_images: how many of the first inputs (and their maps) to keep for
            :meth:`Comparison.figure`.
        progress: a bar over samples; ``None`` shows it when stderr is a terminal.
        checkpoint: a file for partial results: written after each batch, and read at the start
            so that an interrupted comparison resumes where it stopped (one file per rank under
            ``torchrun``, the rank appended to its name).
        registry: the registry to look names up in.

    Returns:
        A :class:`~camkit.comparison.Comparison`.
    """
    reg = registry or default_registry()
    names = list(dict.fromkeys(reg.get(m).name for m in methods))
    metric_objs = [reg.get_metric(m) for m in metrics]
    metric_names = list(dict.fromkeys(m.name for m in metric_objs))
    if not names or not metric_names:
        raise InputError("compare expects at least one method and one metric.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size expects an int >= 1; got {batch_size!r}.")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    plan = _Plan(
        device=device,
        methods=names,
        metrics=metric_names,
        needs={m.name: tuple(m.needs) for m in metric_objs},
        layer=layer,
        target=target,
        method_options={reg.get(k).name: v for k, v in (method_options or {}).items()},
        metric_options={reg.get_metric(k).name: v for k, v in (metric_options or {}).items()},
        seed=seed,
        figure_images=figure_images,
        registry=reg,
    )
    total, batches = _batches(data, batch_size)
    world = dist.get_world_size() if _distributed() else 1
    key = json.dumps(
        [names, metric_names, repr(layer), repr(target), batch_size, seed, total, world,
         repr(sorted(plan.method_options.items())), repr(sorted(plan.metric_options.items()))]
    )  # fmt: skip
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and world > 1:
        ckpt = ckpt.with_name(f"{ckpt.name}.rank{dist.get_rank()}")
    records = _load_checkpoint(ckpt, key)
    done = len(records)
    with bar(total or 0, "camkit compare", progress) as pbar:
        for k, batch in enumerate(batches):
            if k >= done:
                records.append(_run_batch(model, batch, plan))
                _save_checkpoint(ckpt, key, records)
            pbar.update(int(batch[1].shape[0]))
    return _assemble(_gather(records), plan, n_bootstrap)


def _assemble(records: list[dict[str, Any]], plan: _Plan, n_bootstrap: int) -> Comparison:
    if not records:
        raise InputError("compare got no data: the data set is empty.")
    index = torch.cat([r["indices"] for r in records])
    order = index.argsort(stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]  # a sample seen twice counts once
    pick = order[first]
    computed = [m for m in plan.metrics if all(m in r["values"][plan.methods[0]] for r in records)]
    values = {
        method: {m: torch.cat([r["values"][method][m] for r in records])[pick] for m in computed}
        for method in plan.methods
    }
    skipped = {m: "the data has no masks" for m in plan.metrics if m not in computed}
    seconds = {m: sum(r["seconds"][m] for r in records) for m in plan.methods}
    memory: dict[str, int | None] = {}
    for m in plan.methods:
        measured = [r["memory"][m] for r in records if r["memory"][m] is not None]
        memory[m] = max(measured) if measured else None
    examples, example_maps = None, {}
    kept = [r["examples"] for r in records if "examples" in r]
    if kept:
        idx = torch.cat([k[0] for k in kept])
        keep_order = idx.argsort()
        unique = torch.ones_like(idx, dtype=torch.bool)
        unique[1:] = idx[keep_order][1:] != idx[keep_order][:-1]
        sel = keep_order[unique]
        examples = torch.cat([k[1] for k in kept])[sel]
        example_maps = {m: torch.cat([k[2][m] for k in kept])[sel] for m in plan.methods}
    reg = plan.registry
    for m in computed:
        for method in plan.methods:
            bad = int(values[method][m].isnan().sum())
            if bad:
                warnings.warn(
                    f"metric {m!r} is undefined for {bad} of {len(pick)} samples with "
                    f"{method!r}; its mean and interval leave them out.",
                    CamkitWarning,
                    stacklevel=3,
                )
    return Comparison(
        methods=plan.methods,
        metrics=computed,
        values=values,
        higher_is_better={m: reg.get_metric(m).higher_is_better for m in computed},
        seconds=seconds,
        images=len(pick),
        memory=memory,
        skipped=skipped,
        examples=examples,
        example_maps=example_maps,
        n_bootstrap=n_bootstrap,
        seed=plan.seed,
        device=str(plan.device),
    )
