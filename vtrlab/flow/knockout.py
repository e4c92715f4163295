"""Attention knockout: block edges from chosen key positions to chosen query positions, in chosen LM layers.

The edges are removed inside vtrlab's attention function, so the model's own code runs unchanged
everywhere else. A cut layer of a short unpadded forward (host-bound: LLaVA-1.5 at batch 1) runs one
sdpa under the full cut mask, built once per forward (:class:`vtrlab.probes.attention.CutMask`); a longer
one runs the plain sdpa call (flash path kept) and recomputes only the cut query rows under their
explicit mask, spliced into the output (:class:`vtrlab.probes.attention.RowSplice`; equal to masking
every row, up to float rounding); with a recorder on the same layer (a capture inside the block) or many
cut rows, one sdpa under the full cut mask. Typical use: cut image tokens -> last token in layers
K..L and see whether the answer survives (Geva et al.-style information-flow analysis).

A knockout is bound to the batch it was built for (its positions are that batch's):

* forwards of that batch (``vlm.model(**batch.inputs)``, :func:`vtrlab.capture`,
  :func:`vtrlab.saliency`, a nested :func:`knocked_out`) run with the edges cut; nested probes
  compose (knockouts unite their edges, captures see the cut attention);
* the keep-mask path (:func:`vtrlab.reduce.logits` / :func:`vtrlab.answer` with ``keep=``) runs a
  reduced sequence: each column is mapped back to its original position (``source_positions``), so
  an edge is cut iff both ends were kept and the edge is cut in the full sequence;
* another batch, another sequence length, or a cached decode step (generated tokens are no
  position of the batch) raise a ``ValueError`` naming the mismatch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import xarray as xr

from vtrlab.models.labels import key_coordinates
from vtrlab.probes.attention import Binding, Knockout, Site, session, to_device
from vtrlab.probes.engine import attention_modules
from vtrlab.probes.spec import keys_per_sample, layer_indices, queries_per_sample
from vtrlab.probes.switch import attention_switched

from .target import log_probs_at_last, validate_target


def _host_mask(per_sample: list[np.ndarray], seq_len: int) -> np.ndarray:
    m = np.zeros((len(per_sample), seq_len), dtype=bool)
    for b, pos in enumerate(per_sample):
        m[b, np.asarray(pos, dtype=np.int64)] = True
    return m


def _seq_len(batch) -> int:
    inputs = dict(batch.inputs)
    if "input_ids" in inputs:
        return int(inputs["input_ids"].shape[1])
    return int(batch.layouts[0].seq_len)


def knockout_sites(vlm, batch, *, keys="image", queries="last", layers="all") -> dict[int, Site]:
    """Sites that block ``keys`` -> ``queries`` edges at ``layers`` (positions from the layouts),
    bound to ``batch``."""
    return _sites_and_modules(vlm, batch, keys, queries, layers)[0]


def _sites_and_modules(vlm, batch, keys, queries, layers) -> tuple[dict[int, Site], list]:
    """:func:`knockout_sites` and the cut layers' attention modules, in the sites' order."""
    layouts = list(batch.layouts)
    seq_len = _seq_len(batch)
    ids = dict(batch.inputs).get("input_ids")
    q_host = _host_mask(queries_per_sample(layouts, queries), seq_len)
    k_host = _host_mask(keys_per_sample(layouts, keys), seq_len)
    both = to_device(np.stack([q_host, k_host]), vlm.device)  # one copy (pinned on CUDA: no sync)
    ko = Knockout(
        queries=both[0],
        keys=both[1],
        binding=Binding.of(len(layouts), seq_len, ids),
        # the rows a knocked layer recomputes (and, without a model mask, their cut mask), without a device sync
        queries_host=q_host,
        keys_host=k_host,
    )
    attn = attention_modules(vlm, vision=False)  # every LM layer's, looked up once (remembered between calls)
    chosen = layer_indices(layers, len(attn))
    cut = [attn[i] for i in chosen]
    return {id(m): Site("lm", i, knockout=ko, probe="knocked_out") for i, m in zip(chosen, cut)}, cut


@contextlib.contextmanager
def _checks_batch(model: torch.nn.Module, binding: Binding) -> Iterator[None]:
    """Refuse, before it runs, a forward of ``model`` on input_ids other than the bound batch's."""

    def check(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        if ids is not None and past is not None and getattr(past, "get_seq_length", lambda: 0)() > 0:
            return None  # a cached decode step: refused inside the attention function, with its shapes
        binding.check_ids(ids, "a knockout")
        return None

    handle = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def knocked_out(vlm, batch, *, keys="image", queries="last", layers="all") -> Iterator[None]:
    """Within the block, forwards of ``vlm.model`` on ``batch`` run with ``keys -> queries`` edges cut.

    Probes compose: :func:`vtrlab.capture` / :func:`vtrlab.saliency` / another ``knocked_out``
    inside the block see the cut (nested knockouts unite their edges); leaving the block restores
    the previous state exactly. See the module docstring for what runs on other sequences.

    Args:
        keys: ``"image"`` (patch tokens), ``"image_block"`` (with newline/separator tokens),
            ``"question"``, ``"text"``, ``"all"``, ``"last"`` or explicit integer positions (one
            list, or one per sample).
        queries: positions whose attention loses those keys: ``"last"``, ``"question"``, ``"text"``,
            ``"all"``, ``"image"`` or explicit integer positions.
        layers: ``"all"`` or LM layer indices.
    """
    sites, cut = _sites_and_modules(vlm, batch, keys, queries, layers)
    binding = next(iter(sites.values())).knockout.binding
    with attention_switched(vlm.model, cut), _checks_batch(vlm.model, binding), session(sites):
        yield


def knockout(vlm, batch, *, keys="image", queries="last", layers="all", target=None) -> xr.Dataset:
    """The answer's log-prob with and without ``keys -> queries`` edges cut at ``layers``.

    Two forwards of ``batch`` (plain, then cut). ``target``: one token id per sample (default: the
    plain model's greedy prediction at each sample's last real position).

    Returns an ``xarray.Dataset`` over ``sample``: ``target``, ``logprob`` (log p(target) with the
    cut), ``logprob_clean`` (without), ``delta`` (= logprob - logprob_clean); ``logprobs`` and
    ``logprobs_clean`` (sample, vocab) at the last position; what was cut: ``cut_query`` and
    ``cut_key`` (sample, key) bool, the coordinate ``layer`` (the cut LM layers), and the key labels
    ``key_kind/key_image/key_tile/key_row/key_col`` (sample, key).
    """
    sites = knockout_sites(vlm, batch, keys=keys, queries=queries, layers=layers)
    ko = next(iter(sites.values())).knockout
    cut_layers = sorted(s.layer for s in sites.values())
    layouts = list(batch.layouts)
    inputs = dict(batch.inputs)
    with torch.no_grad():
        clean = log_probs_at_last(vlm, layouts, vlm.model(**inputs, use_cache=False).logits)
        if target is None:
            tgt = clean.argmax(-1)
        else:
            tgt = validate_target(target, len(layouts), clean.shape[-1], clean.device)
        with knocked_out(vlm, batch, keys=keys, queries=queries, layers=layers):
            cut = log_probs_at_last(vlm, layouts, vlm.model(**inputs, use_cache=False).logits)
    rows = torch.arange(len(layouts), device=clean.device)
    lp, lp_clean = cut[rows, tgt].cpu().numpy(), clean[rows, tgt].cpu().numpy()
    seq_len = ko.queries.shape[1]
    ds = xr.Dataset(
        {
            "target": (("sample",), tgt.cpu().numpy()),
            "logprob": (("sample",), lp),
            "logprob_clean": (("sample",), lp_clean),
            "delta": (("sample",), lp - lp_clean),
            "logprobs": (("sample", "vocab"), cut.cpu().numpy()),
            "logprobs_clean": (("sample", "vocab"), clean.cpu().numpy()),
            "cut_query": (("sample", "key"), ko.host_queries().copy()),
            "cut_key": (("sample", "key"), ko.host_keys().copy()),
            **key_coordinates(layouts, seq_len),
        },
        coords={"sample": np.arange(len(layouts)), "layer": np.asarray(cut_layers), "key": np.arange(seq_len)},
    )
    ds.attrs.update(
        {
            "model": str(vlm.name),
            "family": str(vlm.family),
            "keys": keys if isinstance(keys, str) else "explicit",
            "queries": queries if isinstance(queries, str) else "explicit",
            "objective": "log p(target) at each sample's last real position",
        }
    )
    return ds
