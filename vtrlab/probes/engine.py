"""`capture(vlm, batch, ...)`: one forward of the unchanged model, attention rows as an xarray.Dataset."""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from vtrlab.models.base import ImageLayout
from vtrlab.models.hooks import record
from vtrlab.models.labels import key_coordinates, packed_crop_offsets

from .attention import RowPlan, Site, copy_stream, copy_to_host, session, to_device
from .grouped import LayerGroup, SiteLists
from .spec import head_indices, layer_indices, padded_rows, queries_per_sample, store_dtype
from .switch import attention_switched

# capture's device staging buffer (see launch) up to this size; larger captures copy layer by layer
_STAGE_MAX_BYTES = 256 * 2**20
# The LM rows' group flushes when the last recorded layer's attention has run, not after the forward: its rows
# are computed and copied while the forward finishes (the final norm, the LM head; ~55 MB of question rows at
# LLaVA-1.5-7B took ~2 ms to reach the host, most of it waited for after the forward otherwise). The vision
# [CLS] rows' group likewise flushes at the last recorded vision layer.
FLUSH_AT_LAST_LAYER = True


def _lm_sites(attn_modules: list, layers: list[int], plan: RowPlan, dtype, device) -> dict[int, Site]:
    """``attn_modules[i]``: LM layer ``i``'s attention module (every layer, looked up once per call)."""
    rows = plan.rows
    return {
        id(attn_modules[i]): Site("lm", i, rows=rows, plan=plan, store_dtype=dtype, store_device=device) for i in layers
    }


class _BufferSink:
    """Capture's :class:`~vtrlab.probes.grouped.RowSink`: a group's rows go into the host ``buffer``
    (L, B, H|-, R, N), one slice per layer (``slots``: layer -> index), heads selected / averaged first.

    The softmax writes straight into ``stage`` (capture's device staging buffer on CUDA) or into the
    buffer itself when that is on the rows' device (CPU), when both are float32 and no head work comes
    between. Each group's rows leave for the host as soon as they are computed (asynchronously, on the copy
    stream), so the copies of early groups overlap the later layers' forward."""

    def __init__(self, buffer: torch.Tensor, stage, slots: dict[int, int], head_sel, head_mean: bool, device):
        self.buffer, self.stage, self.slots, self.head_sel, self.head_mean = buffer, stage, slots, head_sel, head_mean
        self.device = torch.device(device)  # where the rows are computed (the model's device)

    def _span(self, sites) -> tuple[int, int] | None:
        first = self.slots[sites[0].layer]
        if all(self.slots[s.layer] == first + g for g, s in enumerate(sites)):
            return first, len(sites)
        return None

    def _direct(self) -> torch.Tensor | None:
        """The float32 tensor on the rows' device to softmax into (the staging buffer, or the buffer on CPU)."""
        if self.head_sel is not None or self.head_mean:
            return None
        dest = self.stage if self.stage is not None else self.buffer
        if dest.dtype != torch.float32 or dest.device.type != self.device.type:  # pinned host memory, CUDA rows
            return None
        return dest

    def target(self, sites):
        dest, span = self._direct(), self._span(sites)
        return None if dest is None or span is None else dest.narrow(0, *span)

    def put(self, sites, probs, written) -> None:
        span = self._span(sites)
        if written:
            if self.stage is not None:  # from the staging buffer to the host, now (asynchronously)
                copy_to_host(self.buffer.narrow(0, *span), self.stage.narrow(0, *span))
        else:
            if self.head_sel is not None:
                probs = probs.index_select(2, self.head_sel.to(probs.device))
            if self.head_mean:
                probs = probs.mean(2)
            if span is not None:
                copy_to_host(self.buffer.narrow(0, *span), probs)  # converts to the buffer's dtype
            else:
                for g, site in enumerate(sites):
                    copy_to_host(self.buffer[self.slots[site.layer]], probs[g])
        for site in sites:  # the buffer slot its rows are in (capture checks one call per layer)
            site.probs.append(self.slots[site.layer])


class _ClsSink(SiteLists):
    """The vision [CLS] rows' sink: :class:`~vtrlab.probes.grouped.SiteLists`, except that when one flush
    delivers every recorded vision layer, in order, and every sample's vision table lists its own encoder
    sequence's tokens 0..S-1 in order (LLaVA-1.5; any batch of one crop per image whose tables list every
    token), that block (L, B, H, S) *is* the Dataset's values: it goes to the host at once in one
    asynchronous copy (into pinned memory on CUDA), with no per-layer views and no gather after the forward.
    Any other flush (a second one, other layers) falls back to the per-site rows, the first block included."""

    def __init__(self, layers: list[int], tables: list[dict[str, np.ndarray]]):
        super().__init__()
        self.layers, self.tables = list(layers), tables
        self.host: torch.Tensor | None = None  # (B, L, H, S) on the host (a view), when the direct path ran

    def put(self, sites: list, probs: torch.Tensor, written: bool) -> None:
        if not self.blocks and len(sites) == len(self.layers):
            block = probs[:, :, :, 0]  # (L, B, H, S); contiguous (R is 1)
            if [s.layer for s in sites] == self.layers and _own_sequences(self.tables, block.shape[1], block.shape[3]):
                self.blocks.append((sites, block))
                if block.device.type == "cuda":
                    host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
                    # on the compute stream: ~1 MB (LLaVA-1.5-7B), microseconds of copy, where the side stream's
                    # switch and waits cost more host time; the builder's event covers both streams (launch)
                    host.copy_(block, non_blocking=True)
                else:
                    host = block
                self.host = host.permute(1, 0, 2, 3)
                return
        if self.host is not None:  # another flush after the direct one: every site's rows after all
            self.host = None
            first_sites, first = self.blocks[0]
            for site, row in zip(first_sites, first.unbind(0)):
                site.probs.append(row)
        super().put(sites, probs, written)


def _own_sequences(tables: list[dict[str, np.ndarray]], n_seq: int, S: int) -> bool:
    """Whether sample b's vision table lists exactly encoder sequence b's tokens 0..S-1, in order, for every b."""
    if n_seq != len(tables):
        return False
    order = None
    for b, t in enumerate(tables):
        vpos, crop = t["vpos"], t["crop"]
        if len(vpos) != S:
            return False
        if order is None:
            order = np.arange(S)
        if not (np.array_equal(vpos, order) and bool((crop == b).all())):
            return False
    return True


def _vision_tables(layouts: Sequence[ImageLayout]) -> list[dict[str, np.ndarray]]:
    """Each sample's vision-table columns that capture reads (:data:`_VISION_LABELS`), read once a call."""
    tables = []
    for b, L in enumerate(layouts):
        if L.vision is None:
            raise ValueError(
                f"sample {b}'s layout has no vision-encoder table, so vision attention cannot be labelled; "
                "pass vision=False"
            )
        tables.append(_columns(L.vision, [col for col, _ in _VISION_LABELS]))
    return tables


def _columns(frame, names: list[str]) -> dict[str, np.ndarray]:
    """``{name: frame[name].to_numpy()}`` without building a Series per column (~7 µs each, most of a
    vision table's read; capture reads seven columns of every sample's table per call). Uses pandas'
    ``DataFrame._get_column_array`` where it exists and gives what ``to_numpy`` gives; else the Series."""
    out = {}
    getter = getattr(frame, "_get_column_array", None) if frame.columns.is_unique else None
    for name in names:
        values = None
        if getter is not None:
            try:
                values = np.asarray(getter(frame.columns.get_loc(name)))
            except Exception:  # another pandas: its public path below
                values = None
        if values is None or values.shape != (len(frame),):
            values = frame[name].to_numpy()
        out[name] = values
    return out


def _cls_index(layouts: Sequence[ImageLayout], tables: list[dict[str, np.ndarray]] | None = None) -> int:
    """[CLS]'s position in the vision sequence, from the first sample's table (0 without a [CLS] row)."""
    if tables is None:
        vis = layouts[0].vision
        if vis is None:
            return 0
        kind, vpos = vis["kind"].to_numpy(), vis["vpos"].to_numpy()
    else:
        kind, vpos = tables[0]["kind"], tables[0]["vpos"]
    hits = np.flatnonzero(kind == "cls")
    return int(vpos[hits[0]]) if hits.size else 0


def _vision_sites(attn_modules: list, layers: list[int], mode: str, cls_index: int, dtype, device) -> dict[int, Site]:
    """``attn_modules[i]``: vision layer ``i``'s attention module."""
    return {
        id(attn_modules[i]): Site(
            "vision", i, vision_mode=mode, cls_index=cls_index, store_dtype=dtype, store_device=device
        )
        for i in layers
    }


def attention_modules(vlm, vision: bool) -> list:
    """Every LM (or vision) layer's attention module, in layer order. Looked up once per call: ``vlm.lm_layers``
    and ``vlm.vision_layers`` walk the module tree on every access, and indexing a ``ModuleList`` is slow.

    The adapter's lookup (``layer.self_attn``: ``nn.Module.__getattr__``, ~0.6 µs a layer) runs once per layer
    list; what is remembered is only the *name* of each layer's attention child, and every call reads the child
    by that name from the layer's own ``_modules``, so a module replaced since (``layer.self_attn = ...``) is
    the one returned."""
    layers = vlm.vision_layers if vision else vlm.lm_layers
    adapter_type = type(vlm.adapter)
    with _NAMES_LOCK:
        hit = _ATTENTION_NAMES.get((id(layers), vision))
    if hit is not None and hit[0]() is layers and hit[1] is adapter_type and len(hit[2]) == len(layers):
        try:
            return [layer._modules[name] for layer, name in zip(layers, hit[2])]
        except KeyError:  # a child removed since: the adapter's lookup again
            pass
    attention = vlm.adapter.vision_attention if vision else vlm.adapter.lm_attention
    modules = [attention(m) for m in layers]
    names = [next((n for n, child in layer._modules.items() if child is m), None) for layer, m in zip(layers, modules)]
    if None not in names:  # every attention module is a direct child: remember where
        with _NAMES_LOCK:
            _ATTENTION_NAMES[(id(layers), vision)] = (weakref.ref(layers), adapter_type, names)
            while len(_ATTENTION_NAMES) > 32:
                _ATTENTION_NAMES.pop(next(iter(_ATTENTION_NAMES)))
    return modules


# (id(layer list), vision) -> (weak reference to that list, adapter type, each layer's attention child's name)
_ATTENTION_NAMES: dict[tuple[int, bool], tuple] = {}
_NAMES_LOCK = threading.Lock()


def _hidden_norm_hooks(vlm, layers: list[int]):
    """Record the L2 norm of every position's hidden state after each chosen decoder layer."""
    # kept on the device and copied once when the Dataset is built (no sync per layer)
    return record(outputs={i: vlm.lm_layers[i] for i in layers}, transform=lambda h: h.float().norm(dim=-1))


_VISION_LABELS = (("kind", "pad"), ("crop", -1), ("vpos", -1), ("image", -1), ("tile", -1), ("row", -1), ("col", -1))


def _vision_table(
    layouts, probs_by_layer: dict[int, torch.Tensor], layers: list[int], head_mean: bool = False, dtype=np.float32
):
    """Gather each sample's vision tokens (layout.vision: crop, vpos) from per-layer (crops, H, S).

    The gather runs on the device: the layers are stacked, every sample's (crop, vpos) pairs picked
    with one index (and the heads averaged there with ``head_mean``), and only the (B, L, H, V) result
    is copied to the host, once. Gathering on the host instead (numpy fancy indexing of every layer's
    (crops, H, S) block) cost ~16 ms a call at LLaVA-NeXT's 5 crops x 577 tokens x 24 layers x 16 heads
    and ~200 ms at batch 8 (benchmarks/README.md, profile), which is what capture with vision cost over
    capture without it. Returns (values (B, L, H|-, V) ``dtype`` with NaN past each sample's tokens, coords).
    :func:`capture` runs the two halves apart (:func:`_vision_gather` right after the forward, its copy
    asynchronous; :func:`_vision_labels` when the Dataset is built).
    """
    pending = _vision_gather(layouts, probs_by_layer, layers, head_mean, dtype)
    if pending[0].is_pinned() and torch.cuda.is_available():
        copy_stream(torch.device("cuda", torch.cuda.current_device())).synchronize()
    return _vision_labels(*pending)


def _vision_gather(layouts, probs_by_layer, layers, head_mean, dtype, tables=None, stacked=None):
    """The device half of :func:`_vision_table`: (host tensor being filled, valid (B, V), label tables).
    ``tables``: :func:`_vision_tables` of ``layouts`` if already read; ``stacked``: the (L, crops, H, S) stack of
    ``probs_by_layer`` over ``layers`` if the caller has it already (then ``probs_by_layer`` is not read)."""
    if tables is None:
        tables = _vision_tables(layouts)
    B, V = len(layouts), max(len(t["crop"]) for t in tables)
    # (L, crops, H, S), on the device
    probs = stacked if stacked is not None else torch.stack([probs_by_layer[layer] for layer in layers])
    n_seq, S = probs.shape[1], probs.shape[3]
    # one encoder sequence holding several crops (a packed encoder): no sort of every token's crop to find out
    packed = n_seq == 1 and _several_crops(tables)
    offsets = packed_crop_offsets(layouts) if packed else {}
    index = np.zeros((2, B, V), dtype=np.int64)  # (crop, vpos) of each (sample, vision token)
    valid = np.zeros((B, V), dtype=bool)
    for b, t in enumerate(tables):
        crop, vpos = t["crop"].astype(np.int64), t["vpos"].astype(np.int64)
        if not len(crop):
            continue
        if packed:
            vpos = vpos + np.array([offsets[int(c)] for c in crop], dtype=np.int64)
            crop = np.zeros_like(crop)
        if crop.max() >= n_seq or vpos.max() >= S:
            raise ValueError(
                f"sample {b}'s vision table names crop {t['crop'].max()} / vpos {t['vpos'].max()}, but the "
                f"vision encoder ran {n_seq} sequence(s) of {S} tokens"
            )
        index[0, b, : len(crop)], index[1, b, : len(crop)] = crop, vpos
        valid[b, : len(crop)] = True
    if _identity_gather(index, valid, n_seq, S, packed):
        # each sample's own sequence, every token in order (LLaVA-1.5, and any batch of one crop per image
        # whose tables list every token): a view, no index kernel
        picked = probs.permute(1, 0, 2, 3)  # (B, L, H, S)
    else:
        idx = to_device(index.reshape(2, B * V), probs.device)  # non-blocking: no stream sync
        picked = probs[:, idx[0], :, idx[1]]  # (B*V, L, H): the indexed axis comes first
        picked = picked.view(B, V, *picked.shape[1:]).permute(0, 2, 3, 1)  # (B, L, H, V)
    if head_mean:
        picked = picked.mean(2)
    picked = picked.to(torch.float16 if dtype == np.float16 else torch.float32)
    if picked.device.type == "cuda":  # one asynchronous copy into page-locked memory (PyTorch's host cache)
        host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
        copy_to_host(host, picked)
    else:
        host = picked.contiguous()
    return host, valid, tables


def _several_crops(tables) -> bool:
    first = next((t["crop"][0] for t in tables if len(t["crop"])), None)
    return first is not None and any(bool((t["crop"] != first).any()) for t in tables)


def _identity_gather(index: np.ndarray, valid: np.ndarray, n_seq: int, S: int, packed: bool) -> bool:
    """Whether the (crop, vpos) ``index`` (2, B, V) picks sequence b's tokens 0..S-1 in order for every sample b."""
    B, V = valid.shape
    return (
        not packed
        and n_seq == B
        and V == S
        and bool(valid.all())
        and bool((index[0] == np.arange(B)[:, None]).all())
        and bool((index[1] == np.arange(V)[None, :]).all())
    )


def _vision_labels(host, valid, tables):
    """The host half of :func:`_vision_table` (once ``host`` holds its values): NaN padding and labels."""
    values = host.numpy()
    _vision_pad(values, valid)
    return values, _vision_coords(valid, tables)


def _vision_pad(values: np.ndarray, valid: np.ndarray) -> None:
    """NaN past each sample's own vision tokens, in place (once ``values`` holds the copied probabilities)."""
    np.moveaxis(values, -1, 1)[~valid] = np.nan  # (B, V, ...) view


def _vision_coords(valid: np.ndarray, tables) -> dict:
    """The ``vision_key_*`` labels (sample, vision_key) of the samples' vision tables."""
    B, V = valid.shape
    # valid[b] is True on sample b's first len(table) tokens, so a boolean assignment fills every sample's
    # labels in one operation from the samples' columns joined in order
    padded = not valid.all()
    coords = {}
    for col, fill in _VISION_LABELS:
        joined = np.concatenate([t[col] for t in tables])
        if col == "kind":  # strings as wide as the longest label present (as astype(str) of the labels gives)
            labels = {str(k) for k in set(joined.tolist())} | ({fill} if padded else set())
            arr = np.full((B, V), fill, dtype=f"<U{max([1] + [len(k) for k in labels])}")
        else:
            arr = np.full((B, V), fill, dtype=np.int64)
        arr[valid] = joined
        coords[f"vision_key_{col}"] = (("sample", "vision_key"), arr)
    return coords


def _vision_probs(vlm, sites) -> dict[int, torch.Tensor]:
    """Each vision layer's recorded (crops, H, S) probabilities (packed encoders' pieces joined)."""
    vis = {}
    for site in sites.values():
        if site.stream != "vision":
            continue
        if not site.probs:
            raise RuntimeError(f"vision layer {site.layer}'s attention never ran through {type(vlm.model).__name__}")
        # packed encoders (one call per image / window) give (1, H, S_seg) pieces: join along keys
        vis[site.layer] = torch.cat(site.probs, dim=-1) if len(site.probs) > 1 else site.probs[0]
    return vis


def capture(
    vlm,
    batch,
    *,
    queries="last",
    layers="all",
    heads=None,
    vision: bool = True,
    hidden: bool = False,
    dtype="float32",
    head_mean: bool = False,
    vision_layers="all",
) -> xr.Dataset:
    """Attention probabilities of the chosen queries, per LM layer, in one sdpa forward.

    Args:
        vlm: a :class:`vtrlab.models.VLM` (its model runs with attn_implementation='sdpa').
        batch: ``vlm.prepare(...)`` output.
        queries: ``"last"`` (each sample's last real token), ``"question"``, ``"text"``, ``"all"``,
            ``"image"``, or explicit integer positions (one list for all samples, or one list per
            sample; negative counts back from the last real token).
        layers: ``"all"`` or LM layer indices.
        heads: ``None`` (all) or LM head indices.
        vision: also record vision-encoder attention from [CLS] (mean over queries without [CLS]).
        hidden: also record the hidden-state norm of every position after each chosen LM layer.
        dtype: ``"float32"`` or ``"float16"`` for the stored probabilities (on CPU).
        head_mean: store the mean over the chosen heads instead of each head.
        vision_layers: ``"all"`` or vision layer indices.

    Returns an ``xarray.Dataset`` with ``lm_attn`` (sample, layer, head, query, key),
    ``query_position`` (sample, query; NaN where a sample has fewer queries), key labels
    ``key_kind/key_image/key_tile/key_row/key_col`` (sample, key), and if asked ``vision_attn``
    (sample, vision_layer, vision_head, vision_key) with ``vision_key_*`` labels, and
    ``hidden_norm`` (sample, layer, key). The model's outputs are those of a plain sdpa forward.
    """
    return launch(
        vlm,
        batch,
        queries=queries,
        layers=layers,
        heads=heads,
        vision=vision,
        hidden=hidden,
        dtype=dtype,
        head_mean=head_mean,
        vision_layers=vision_layers,
    )()


def launch(
    vlm,
    batch,
    *,
    queries="last",
    layers="all",
    heads=None,
    vision: bool = True,
    hidden: bool = False,
    dtype="float32",
    head_mean: bool = False,
    vision_layers="all",
) -> Callable[[], xr.Dataset]:
    """Run :func:`capture`'s forward and return the function that builds its Dataset (same arguments).

    On CUDA the forward's kernels and the asynchronous row copies may still run when this returns:
    the builder waits on an event recorded after them (not on the whole device), so a streaming caller
    can launch the next batch's forward before building this batch's Dataset (device work of batch
    *i + 1* overlaps host work of batch *i*). On CPU everything has run when this returns.
    """
    sdtype = store_dtype(dtype)
    layouts = list(batch.layouts)
    lm_layers = layer_indices(layers, len(vlm.lm_layers))
    per_sample = queries_per_sample(layouts, queries)
    rows_np = padded_rows(per_sample)
    device = vlm.device
    plan = RowPlan.build(rows_np, device)  # shared by every LM layer: masks gathered once per forward
    inputs = dict(batch.inputs)
    seq_len = int(inputs["input_ids"].shape[1]) if "input_ids" in inputs else layouts[0].seq_len

    lm_attn = attention_modules(vlm, vision=False)
    n_heads = _num_heads(lm_attn[0])
    head_sel = head_indices(heads, n_heads)
    # One CPU buffer for every layer's rows, written in place during the forward: on CUDA it is
    # pinned and each layer's copy is asynchronous, so capture adds no sync per layer and no
    # stacking afterwards (this is what keeps capture near the cost of a plain forward).
    # Layer-major, so that each layer's slice is contiguous: a copy into a strided slice of host memory
    # (sample-major at batch > 1) goes through an unpinned temporary and synchronises the device.
    shape = (len(lm_layers), len(layouts)) + (() if head_mean else (len(head_sel),)) + (rows_np.shape[1], seq_len)
    cuda = device.type == "cuda"
    buffer = torch.empty(shape, dtype=sdtype, pin_memory=cuda)
    sites = _lm_sites(lm_attn, lm_layers, plan, sdtype, "cpu")
    every_head = len(head_sel) == n_heads and list(head_sel) == list(range(n_heads))
    sel = None if every_head else to_device(np.asarray(head_sel, dtype=np.int64), device)
    # On CUDA, while the rows fit in _STAGE_MAX_BYTES, each group of layers softmaxes straight into its slice
    # of a device staging buffer, and that slice goes to the host at once, asynchronously (_BufferSink);
    # otherwise (head work first, float16, larger) the rows are copied to the host from a temporary.
    stage = None
    direct = sdtype == torch.float32 and sel is None and not head_mean
    if cuda and direct and buffer.numel() * buffer.element_size() <= _STAGE_MAX_BYTES:
        stage = torch.empty(shape, dtype=sdtype, device=device)
    # the layers' rows computed in batched groups, not one layer at a time (see vtrlab.probes.grouped)
    lm_group = LayerGroup(
        _BufferSink(buffer, stage, {layer: i for i, layer in enumerate(lm_layers)}, sel, head_mean, device),
        rows_np,
        device,
        plan=plan,
        last=sites[id(lm_attn[max(lm_layers)])] if FLUSH_AT_LAST_LAYER and lm_layers else None,
    )
    groups = [lm_group]
    for site in sites.values():  # (no site.out: the group's sink writes each layer's slice of the buffer)
        site.head_sel, site.head_mean, site.group = sel, head_mean, lm_group

    v_layers: list[int] = []
    v_attn: list = []
    v_sink = None
    tables = None
    has_cls = vision and vlm.has_cls  # read once (the adapter walks the vision tower)
    if vision:
        v_attn = attention_modules(vlm, vision=True)
        v_layers = layer_indices(vision_layers, len(v_attn), what="vision_layers")
        mode = "cls" if has_cls else "mean"
        tables = _vision_tables(layouts)  # read once: the [CLS] index now, the labels at build
        cls_index = _cls_index(layouts, tables)
        v_sites = _vision_sites(v_attn, v_layers, mode, cls_index, torch.float32, device)
        if mode == "cls":
            # the rows straight to the host in the Dataset's layout where the tables allow (float32, every head)
            direct = not head_mean and sdtype == torch.float32
            v_sink = _ClsSink(v_layers, tables) if direct else SiteLists()
            # flushed at the last vision layer: the same time on the H200 as after the forward or at the LM's first
            # layer, and the held vision queries and keys are freed before the LM's are held (peak extra memory at
            # LLaVA-NeXT-7B batch 1, last row + [CLS]: 0.63 GiB against 0.89; benchmarks/README.md, session 9)
            last = v_sites[id(v_attn[max(v_layers)])] if FLUSH_AT_LAST_LAYER and v_layers else None
            v_group = LayerGroup(v_sink, cls_index, device, last=last)
            groups.append(v_group)
            for site in v_sites.values():
                site.group = v_group
        sites.update(v_sites)

    hooks = _hidden_norm_hooks(vlm, lm_layers) if hidden else contextlib.nullcontext({})
    # only the configs the probed modules (and the model's masks) read are switched: no walk over every module
    probed = [lm_attn[i] for i in lm_layers] + [v_attn[i] for i in v_layers]
    with attention_switched(vlm.model, probed), session(sites), hooks as norms, torch.no_grad():
        vlm.model(**inputs, use_cache=False)
        for group in groups:  # the layers still held
            group.flush()
    vision_pending = None
    if getattr(v_sink, "host", None) is not None:  # [CLS] rows on their way to the host in the Dataset's layout
        vision_pending = (v_sink.host, np.ones((len(layouts), v_sink.host.shape[-1]), dtype=bool), tables)
    elif vision:  # gathered on the device now; its copy to the host runs before the event below
        vdtype = np.float16 if sdtype == torch.float16 else np.float32
        # one flush that held every vision layer already gave their stack (LLaVA-1.5 / NeXT: all 24 layers at once)
        stacked = v_sink.stacked(v_layers) if v_sink is not None else None
        by_layer = _vision_probs(vlm, sites) if stacked is None else None
        vision_pending = _vision_gather(layouts, by_layer, v_layers, head_mean, vdtype, tables, stacked=stacked)
    done = None
    if device.type == "cuda":
        # the row copies run on a side stream (they overlap the next layers' kernels); the event waits for
        # both that stream and the forward's
        stream = copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        done = torch.cuda.Event()
        done.record(stream)
    return functools.partial(
        _build,
        vlm,
        sites,
        buffer,
        done,
        layouts,
        rows_np,
        lm_layers,
        head_sel,
        v_layers,
        vision_pending,
        norms,
        seq_len,
        queries=queries,
        vision=vision,
        hidden=hidden,
        head_mean=head_mean,
        has_cls=has_cls,
    )


def _build(
    vlm,
    sites,
    buffer,
    done,
    layouts,
    rows_np,
    lm_layers,
    head_sel,
    v_layers,
    vision_pending,
    norms,
    seq_len,
    *,
    queries,
    vision,
    hidden,
    head_mean,
    has_cls,
) -> xr.Dataset:
    """The Dataset of one launched capture (waits for its copies on CUDA).

    The labels and the Dataset around the host buffers are made *before* waiting for the copies into them (on
    CUDA the GPU may still be finishing the forward: this host work overlaps it); the values are read only
    after the wait (the NaN padding of the vision table). The Dataset must hold those very buffers, which is
    checked; if it holds copies it is built again after the wait."""
    for site in sites.values():
        if site.stream == "lm" and len(site.probs) != 1:
            raise RuntimeError(f"LM layer {site.layer}'s attention ran {len(site.probs)} times in one forward")

    attn = np.moveaxis(buffer.numpy(), 0, 1)  # a view: (B, L, H, R, N), or (B, L, R, N) with head_mean
    qpos = np.where(rows_np >= 0, rows_np, np.nan)
    same_rows = bool((rows_np == rows_np[:1]).all()) and not (rows_np < 0).any()
    query_coord = rows_np[0] if same_rows else np.arange(rows_np.shape[1])
    attn_dims = ("sample", "layer", "query", "key") if head_mean else ("sample", "layer", "head", "query", "key")
    data = {
        "lm_attn": (attn_dims, attn),
        "query_position": (("sample", "query"), qpos),
        **key_coordinates(layouts, seq_len),
    }
    coords = {
        "sample": np.arange(len(layouts)),
        "layer": np.asarray(lm_layers),
        "query": query_coord,
        "key": np.arange(seq_len),
    }
    if not head_mean:
        coords["head"] = np.asarray(head_sel)
    values = None
    if vision:
        host, valid, tables = vision_pending
        values = host.numpy()
        vdims = ("sample", "vision_layer") + (() if head_mean else ("vision_head",)) + ("vision_key",)
        data["vision_attn"] = (vdims, values)
        data.update(_vision_coords(valid, tables))
        coords["vision_layer"] = np.asarray(v_layers)
        if not head_mean:
            coords["vision_head"] = np.arange(values.shape[2])
    if hidden:  # (.cpu() waits for the device itself)
        data["hidden_norm"] = (("sample", "layer", "key"), torch.stack([norms[i] for i in lm_layers], 1).cpu().numpy())
    attrs = {
        "model": str(vlm.name),
        "family": str(vlm.family),
        "queries": queries if isinstance(queries, str) else "explicit",
        "query_coordinate": "sequence position" if same_rows else "row index (see query_position)",
        "vision_mode": ("cls" if has_cls else "mean over queries") if vision else "none",
        "head_mean": int(head_mean),
        "attn_implementation": "vtrlab_sdpa",
    }
    ds = _dataset(data, coords, attrs)
    if done is not None:
        done.synchronize()  # the asynchronous row copies into `buffer` (and the vision table) have landed
    if vision:
        _vision_pad(values, vision_pending[1])
    holds = np.may_share_memory(ds.variables["lm_attn"].data, attn) and (
        values is None or np.may_share_memory(ds.variables["vision_attn"].data, values)
    )
    return ds if holds else _dataset(data, coords, attrs)  # values copied before they landed: build again


# Whether xarray's direct Dataset constructor builds what xr.Dataset(...) builds from capture's ingredients;
# None until checked (once a process, on a small example: see _direct_matches)
_DIRECT: bool | None = None


def _dataset(data: dict[str, tuple], coords: dict[str, np.ndarray], attrs: dict) -> xr.Dataset:
    """``xr.Dataset(data, coords=coords, attrs=attrs)`` for capture's ingredients, built without its merge.

    ``data``: name -> (dims, array); ``coords``: dimension name -> 1-D array (each gets xarray's default
    pandas index, as ``xr.Dataset`` gives it). ``xr.Dataset`` converts, merges and aligns every variable
    against every index, ~1-2 ms a call for capture's ~20 variables on a loaded 2-core host (as much as the
    rest of capture's per-call host work); capture's variables are consistent by construction, so they go
    to xarray's direct constructor with the default indexes made by xarray's own ``PandasIndex`` (~3x
    faster). The direct constructor is xarray-internal, so its result is compared with ``xr.Dataset``'s once
    a process (:func:`_direct_matches`) and ``xr.Dataset`` is used if they differ in anything.
    """
    global _DIRECT
    if _DIRECT is None:
        _DIRECT = _direct_matches()
    return _direct(data, coords, attrs) if _DIRECT else xr.Dataset(data, coords=coords, attrs=attrs)


def _direct(data: dict[str, tuple], coords: dict[str, np.ndarray], attrs: dict) -> xr.Dataset:
    from xarray.indexes import PandasIndex

    # capture's values are numpy arrays already: xarray's fast path skips the conversions (checked equal to
    # xr.Dataset's result by _direct_matches)
    variables = {name: xr.Variable(dims, values, fastpath=True) for name, (dims, values) in data.items()}
    indexes = {}
    for dim, values in coords.items():
        indexes[dim], adapter = _index(PandasIndex, dim, values)
        # a new variable every call (a Dataset's variables are mutable: attrs), around the shared read-only
        # adapter of the index's values, as PandasIndex.create_variables makes it
        variables[dim] = xr.IndexVariable((dim,), adapter, fastpath=True)
    sizes: dict[str, int] = {}
    for name, var in variables.items():
        for dim, n in zip(var.dims, var.shape):
            if sizes.setdefault(dim, n) != n:
                raise ValueError(f"capture's {name} has {n} entries along {dim!r}, another variable {sizes[dim]}")
    return xr.Dataset._construct_direct(variables, set(coords), sizes, dict(attrs), indexes)


# dimension coordinate -> its PandasIndex, reused between calls: the same coordinates (samples 0..B-1, the
# layers, the keys 0..N-1, ...) come back on every call of a loop, and building the index is most of a
# coordinate's cost. Indexes are immutable in xarray (a shallow copy of a Dataset shares them), so sharing one
# between Datasets is what xarray itself does; each Dataset still gets variables of its own.
_INDEXES: OrderedDict = OrderedDict()
_INDEXES_MAX = 64
_INDEXES_LOCK = threading.Lock()  # captures may run in threads (a streaming caller's builder)


def _index(index_type, dim: str, values: np.ndarray):
    """(index, its variable's data adapter) of the dimension coordinate ``dim`` = ``values``, shared between
    calls (see above)."""
    values = np.asarray(values)
    key = None
    if values.dtype.kind in "biuf":  # keyed by the bytes of the values: numbers only
        key = (dim, values.dtype.str, values.shape, values.tobytes())
        with _INDEXES_LOCK:
            hit = _INDEXES.get(key)
            if hit is not None:
                _INDEXES.move_to_end(key)
                return hit
    index = index_type.from_variables({dim: xr.Variable((dim,), values)}, options={})
    hit = index, index.create_variables()[dim]._data
    if key is not None:
        with _INDEXES_LOCK:
            _INDEXES[key] = hit
            while len(_INDEXES) > _INDEXES_MAX:
                _INDEXES.popitem(last=False)
    return hit


def _direct_matches() -> bool:
    """Whether :func:`_direct` builds exactly what ``xr.Dataset`` builds (values, dtypes, order of variables
    and dimensions, indexes and their types, attrs), on a small Dataset of capture's kinds of variables."""
    rng = np.random.default_rng(0)
    data = {
        "lm_attn": (("sample", "layer", "query", "key"), rng.random((2, 3, 1, 5), dtype=np.float32)),
        "query_position": (("sample", "query"), np.array([[4.0], [np.nan]])),
        "key_kind": (("sample", "key"), np.array([["text", "image", "image", "text", "pad"]] * 2)),
        "key_row": (("sample", "key"), np.arange(10).reshape(2, 5)),
        "vision_attn": (("sample", "vision_layer", "vision_key"), rng.random((2, 1, 3), dtype=np.float32)),
    }
    coords = {"sample": np.arange(2), "layer": np.asarray([0, 2, 5]), "query": np.arange(1), "key": np.arange(5)}
    coords["vision_layer"] = np.asarray([1])
    attrs = {"model": "m", "head_mean": 0}
    try:
        fast, ref = _direct(data, coords, attrs), xr.Dataset(data, coords=coords, attrs=attrs)
        return (
            fast.identical(ref)
            and list(fast.variables) == list(ref.variables)
            and list(fast.coords) == list(ref.coords)
            and list(fast.sizes.items()) == list(ref.sizes.items())
            and [(k, type(v)) for k, v in fast.xindexes.items()] == [(k, type(v)) for k, v in ref.xindexes.items()]
            and all(fast[k].dtype == ref[k].dtype for k in ref.variables)
        )
    except Exception:  # an xarray whose internals differ: its public constructor, always right
        return False


def _num_heads(attn_module) -> int:
    attrs = attn_module.__dict__  # instance attributes first: a miss through nn.Module.__getattr__ raises inside
    for name in ("num_heads", "num_attention_heads"):
        if name in attrs:
            return int(attrs[name])
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn_module, name):
            return int(getattr(attn_module, name))
    cfg = getattr(attn_module, "config", None)
    for name in ("num_attention_heads", "num_heads"):
        if cfg is not None and hasattr(cfg, name):
            return int(getattr(cfg, name))
    raise AttributeError(f"cannot tell how many heads {type(attn_module).__name__} has")
