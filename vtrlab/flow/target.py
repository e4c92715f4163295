"""The answer token a flow probe scores: log-probs at each sample's last real position, and checks
of a user-given ``target`` (one token id per sample)."""

from __future__ import annotations

import numpy as np
import torch

from vtrlab.probes.attention import to_device


def log_probs_at_last(vlm, layouts, logits: torch.Tensor) -> torch.Tensor:
    """(B, vocab) log-softmax of ``logits`` (B, N, vocab) at each sample's last real position (at
    least float32; float64 models stay float64)."""
    last = np.asarray([L.last_position for L in layouts], dtype=np.int64)
    if bool((last == logits.shape[1] - 1).all()):
        picked = logits[:, -1]  # every sample ends at the last column (unpadded or left-padded): a view
    else:  # positions copied through pinned memory (a pageable copy waits for the device on CUDA)
        rows = torch.arange(len(layouts), device=logits.device)
        picked = logits[rows, to_device(last, logits.device)]
    return torch.log_softmax(picked if picked.dtype == torch.float64 else picked.float(), dim=-1)


def validate_target(target, batch_size: int, vocab: int, device) -> torch.Tensor:
    """``target`` as a (B,) long tensor of token ids in 0..vocab-1; a clear error for anything else."""
    accepted = f"one integer token id in 0..{vocab - 1} per sample ({batch_size}), or None (greedy prediction)"
    if isinstance(target, (str, bytes)):
        raise ValueError(f"target={target!r} is a string; accepted: {accepted} (tokenize the answer first)")
    if torch.is_tensor(target):
        arr = target.detach().cpu().numpy()
    else:
        try:
            arr = np.asarray(target)
        except Exception:  # ragged or odd objects
            raise ValueError(f"target={target!r} is not accepted; accepted: {accepted}") from None
    flat = arr.reshape(-1) if arr.ndim <= 1 else None
    if flat is None:
        raise ValueError(f"target of shape {arr.shape} is not accepted; accepted: {accepted}")
    if arr.dtype == bool or arr.dtype.kind not in "iu":
        raise ValueError(f"target={target!r} holds {arr.dtype} values, not token ids; accepted: {accepted}")
    if flat.size != batch_size:
        raise ValueError(f"target has {flat.size} token ids for a batch of {batch_size} samples; accepted: {accepted}")
    out_of_range = flat[(flat < 0) | (flat >= vocab)]
    if out_of_range.size:
        raise ValueError(f"target: token id {int(out_of_range[0])} is outside the vocabulary; accepted: {accepted}")
    return torch.as_tensor(flat.astype(np.int64), device=device)
