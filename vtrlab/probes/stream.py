"""Capture over many samples in batches: one streaming engine, two ways to consume it.

* :func:`capture_batches` yields ``(first_sample_index, batch, dataset)`` per batch, for analyses that
  need each batch's layouts and full Dataset (notebook 01 builds its tables per batch);
* :func:`capture_dataset` (built on it) keeps only what is asked of each batch (by default the image
  tokens' columns, on the per-image-token axis ``token`` with the layout's labels) and returns one
  Dataset (and a netCDF file) without holding every batch's raw tensors. Batches of different
  sequence lengths line up because the kept axes are padded at the end (NaN / -1 / "pad").

Host and device work overlap: a background thread prepares batch *i + 1* (image processing,
tokenisation) while batch *i* runs; the forward of batch *i + 1* is launched before batch *i*'s
Dataset is built and handed out (on CUDA its kernels run while the host builds and analyses batch
*i*: :func:`vtrlab.probes.engine.launch`); :func:`capture_dataset` also reduces batch *i* in the
background. The probe session is a ContextVar, so the worker never sees (or disturbs) it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from vtrlab.models.labels import token_coordinates

from .engine import launch

KEYS = ("image", "all")
_FILL = {"f": np.nan, "i": -1, "u": 0, "U": "pad", "O": "pad", "b": False}


def _sample_parts(sample, i: int) -> tuple[Any, str]:
    """(image(s), prompt) from a pair or an object with ``image`` and ``prompt``/``question``."""
    if isinstance(sample, (tuple, list)) and len(sample) == 2:
        return sample[0], sample[1]
    image = getattr(sample, "image", None)
    prompt = getattr(sample, "prompt", None) or getattr(sample, "question", None)
    if image is None or not isinstance(prompt, str):
        raise ValueError(
            f"sample {i} ({type(sample).__name__}) is neither an (image, prompt) pair nor an object with "
            "`image` and `prompt` (or `question`)"
        )
    return image, prompt


def _reduce(ds: xr.Dataset, layouts, keys: str, start: int) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    """What is kept of one batch's capture: plain numpy per variable, sample axis first."""
    out: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    attn = ds["lm_attn"]
    dims = tuple(attn.dims)
    if keys == "image":
        tok = token_coordinates(layouts)
        pos = tok["position"][1]  # (B, T), -1 = padding
        idx = np.clip(pos, 0, None)
        a = attn.values
        shape = (a.shape[0],) + (1,) * (a.ndim - 2) + (pos.shape[1],)
        picked = np.take_along_axis(a, idx.reshape(shape), axis=-1)
        picked[np.broadcast_to((pos < 0).reshape(shape), picked.shape)] = np.nan
        out["lm_attn"] = (dims[:-1] + ("token",), picked)
        for name, value in tok.items():
            if name != "token":
                out[f"token_{name}"] = value
    else:
        out["lm_attn"] = (dims, attn.values)
        for name in ds.data_vars:
            if name.startswith("key_"):
                out[name] = (tuple(ds[name].dims), ds[name].values)
    out["query_position"] = (("sample", "query"), ds["query_position"].values)
    for name in ds.data_vars:
        if name == "vision_attn" or name.startswith("vision_key_") or name == "hidden_norm":
            out[name] = (tuple(ds[name].dims), ds[name].values)
    out["sample_index"] = (("sample",), np.arange(start, start + len(layouts)))
    return out


def _pad(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``arr`` in the corner of a ``shape`` array filled with NaN / -1 / "pad" (strings keep their dtype)."""
    if arr.shape == shape:
        return arr
    if arr.dtype.kind == "U":
        big = np.full(shape, "pad", dtype=f"<U{max(arr.dtype.itemsize // 4, 3)}")
    else:
        big = np.full(shape, _FILL.get(arr.dtype.kind, 0), dtype=arr.dtype)
    big[tuple(slice(0, n) for n in arr.shape)] = arr
    return big


def _join(parts: list[dict], coords_from: xr.Dataset, keys: str) -> xr.Dataset:
    """Pad every batch's variables to the largest extent of each axis and join along ``sample``."""
    data = {}
    for name, (dims, first) in parts[0].items():
        arrays = [p[name][1] for p in parts]
        tail = tuple(max(a.shape[k] for a in arrays) for k in range(1, first.ndim))
        data[name] = (dims, np.concatenate([_pad(a, (a.shape[0],) + tail) for a in arrays], axis=0))
    n_samples = data["sample_index"][1].shape[0]
    coords = {"sample": np.arange(n_samples), "query": np.arange(data["query_position"][1].shape[1])}
    for name in ("layer", "head", "vision_layer", "vision_head"):
        if name in coords_from.coords:
            coords[name] = coords_from[name].values
    if keys == "image":
        coords["token"] = np.arange(data["lm_attn"][1].shape[-1])
    else:
        coords["key"] = np.arange(data["lm_attn"][1].shape[-1])
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(coords_from.attrs)
    ds.attrs["query_coordinate"] = "row index (see query_position)"
    ds.attrs["keys"] = "image tokens (token axis; see token_position)" if keys == "image" else "every position"
    return ds


def _batches(vlm, samples: Iterable, batch_size: int, pool: ThreadPoolExecutor):
    """Prepared batches, batch *i + 1* prepared in ``pool`` while the caller works on batch *i*."""
    it = iter(samples)
    counter = itertools.count()

    def next_chunk():
        chunk = [_sample_parts(s, next(counter)) for s in itertools.islice(it, batch_size)]
        if not chunk:
            return None
        return vlm.prepare([c[0] for c in chunk], [c[1] for c in chunk])

    pending = pool.submit(next_chunk)
    while True:
        batch = pending.result()
        if batch is None:
            return
        pending = pool.submit(next_chunk)
        yield batch


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: need a positive integer")


def capture_batches(
    vlm, samples: Iterable, *, batch_size: int = 8, progress: bool = True, **capture_kwargs
) -> Iterator[tuple[int, Any, xr.Dataset]]:
    """Capture every sample in batches: yields ``(first_sample_index, batch, dataset)`` per batch.

    Args:
        vlm: a :class:`vtrlab.models.VLM`.
        samples: an iterable of ``(image or list of images, prompt)`` pairs (e.g.
            ``zip(images, prompts)``), or of objects with ``image`` and ``prompt`` (or ``question``),
            e.g. ``vtrlab.data`` samples. Read lazily.
        batch_size: samples per forward.
        progress: show a tqdm bar (one step per batch).
        **capture_kwargs: go to :func:`vtrlab.capture`.

    Each ``dataset`` equals ``vtrlab.capture(vlm, batch, **capture_kwargs)``. Batches differ in sequence
    length, so their datasets are not joined here: build tables per batch, or use
    :func:`capture_dataset` for one Dataset. While the caller works on batch *i*, batch *i + 1* is
    prepared and its forward launched.
    """
    from tqdm.auto import tqdm

    _check_batch_size(batch_size)
    total = -(-len(samples) // batch_size) if hasattr(samples, "__len__") else None
    bar = tqdm(total=total, desc="capture", unit="batch", disable=not progress)
    start = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vtrlab-stream") as pool:
        try:
            held = None  # (start, batch, build) of the batch whose forward was launched last
            for batch in _batches(vlm, samples, batch_size, pool):
                build = launch(vlm, batch, **capture_kwargs)  # the next forward runs before the last is built
                if held is not None:
                    yield held[0], held[1], held[2]()
                    bar.update(1)
                held = (start, batch, build)
                start += len(batch.layouts)
            if held is not None:
                yield held[0], held[1], held[2]()
                bar.update(1)
        finally:
            bar.close()


def capture_dataset(
    vlm,
    samples: Iterable,
    *,
    batch_size: int = 8,
    keys: str = "image",
    out: str | os.PathLike | None = None,
    progress: bool = True,
    **capture_kwargs,
) -> xr.Dataset:
    """Capture every sample in batches of ``batch_size`` and return one Dataset (written to ``out``).

    Args:
        vlm: a :class:`vtrlab.models.VLM`.
        samples: an iterable of ``(image or list of images, prompt)`` pairs, or of objects with
            ``image`` and ``prompt`` (or ``question``), e.g. ``vtrlab.data`` samples. Read lazily.
        batch_size: samples per forward.
        keys: ``"image"`` (default): keep each query row's attention to the image tokens only, on
            the axis ``token`` with per-sample labels ``token_position/_image/_tile/_row/_col`` and
            the pixel box ``token_x0.._y1`` (``vtrlab.models.labels.token_coordinates``);
            ``"all"``: keep every key position (axis ``key``, padded to the longest sequence).
        out: optional netCDF path; written atomically once at the end (``vtrlab.probes.save``).
        progress: show a tqdm bar (one step per batch).
        **capture_kwargs: go to :func:`vtrlab.capture` (``queries``, ``layers``, ``heads``,
            ``vision``, ``hidden``, ``dtype``, ``head_mean``, ``vision_layers``).

    Returns a Dataset with ``lm_attn`` (sample, layer, head, query, token|key), ``query_position``
    (sample, query; NaN where a sample has fewer rows), ``sample_index`` and the labels, plus
    ``vision_attn`` / ``hidden_norm`` when asked. Sample ``s`` of the result equals sample ``s``
    of ``capture`` run on its own batch, restricted to the kept keys (padding: NaN / -1 / ``"pad"``).
    """
    _check_batch_size(batch_size)
    if keys not in KEYS:
        raise ValueError(f"keys={keys!r} is not accepted; use one of {KEYS}")
    if "hidden" in capture_kwargs and capture_kwargs["hidden"] and keys == "image":
        raise ValueError("hidden=True keeps a norm per sequence position; use keys='all' with it")
    capture_kwargs.setdefault("vision", False)

    parts: list[dict] = []
    head: xr.Dataset | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vtrlab-reduce") as pool:
        reductions = []
        for start, batch, ds in capture_batches(
            vlm, samples, batch_size=batch_size, progress=progress, **capture_kwargs
        ):
            if head is None:
                head = ds.isel(sample=slice(0, 0))[[]]  # coords and attrs only
            # host: reduce this batch in the background while the next forward runs
            reductions.append(pool.submit(_reduce, ds, list(batch.layouts), keys, start))
            del ds, batch
            while reductions and reductions[0].done():
                parts.append(reductions.pop(0).result())
        parts.extend(r.result() for r in reductions)
    if not parts:
        raise ValueError("samples is empty: nothing to capture")
    result = _join(parts, head, keys)
    if out is not None:
        from .store import save

        save(result, Path(out))
    return result
