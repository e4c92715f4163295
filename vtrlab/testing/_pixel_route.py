"""Pixel-level layout proof for families that merge patches (Qwen2/2.5-VL, Idefics3/SmolVLM, Gemma3).

Instead of the vision encoder's features, every patch carries a code made of what it shows:
``(mean R, mean G, mean B, 1, source)`` computed from the pixels the model itself received, where
``source`` is the patch's row in the model's vision input (Qwen: row of ``pixel_values``; others:
index of the crop in the vision batch). The transformer blocks are bypassed (identity), and the
codes travel through the model's OWN merge code (Qwen 2x2 merger grouping + window un-permute,
Idefics3 pixel shuffle, Gemma3 average pooling) into the LM sequence. With gradient images
(R encodes x, G encodes y), each LM position then says which original pixels it covers, which
view it came from, and, for merged tokens, where each sub-patch sits. ``check_*`` compare that
with the layout (LM table) and with the vision table (codes as the vision blocks see them).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from vtrlab.models.base import KIND_IMAGE

CODE = 5  # R, G, B, marker, source


def _denormalize_channels(values: torch.Tensor, image_processor) -> torch.Tensor:
    """(..., 3) normalized channel means -> 0..1 pixel intensities."""
    mean = torch.tensor(image_processor.image_mean, dtype=values.dtype)
    std = torch.tensor(image_processor.image_std, dtype=values.dtype)
    x = values * std + mean if getattr(image_processor, "do_normalize", True) else values
    return x if getattr(image_processor, "do_rescale", True) else x / 255.0


def _passthrough(stack: ExitStack, module: torch.nn.Module) -> None:
    """Make ``module`` return its first input unchanged (same output type)."""

    def hook(mod, args, kwargs, out):
        x = (args[0] if args else kwargs["hidden_states"]).contiguous()  # real layers return fresh tensors
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    stack.callback(module.register_forward_hook(hook, with_kwargs=True).remove)


def _record_input(stack: ExitStack, module: torch.nn.Module, store: dict, key: str) -> None:
    def hook(mod, args, kwargs):
        store[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    stack.callback(module.register_forward_pre_hook(hook, with_kwargs=True).remove)


def _conv_patch_codes(stack: ExitStack, embeddings: torch.nn.Module, image_processor) -> None:
    """SigLIP-style embeddings: patch conv -> per-patch colour codes; position embedding -> 0."""
    conv = embeddings.patch_embedding
    patch = conv.kernel_size[0]

    def conv_hook(mod, args, out):
        pix = args[0].double()
        mean = F.avg_pool2d(pix, patch)  # (B, 3, h, w), the model's own patch grid
        rgb = _denormalize_channels(mean.permute(0, 2, 3, 1), image_processor).permute(0, 3, 1, 2)
        code = torch.zeros_like(out, dtype=torch.float64)
        code[:, :3] = rgb
        code[:, 3] = 1.0
        code[:, 4] = torch.arange(pix.shape[0], dtype=torch.float64).view(-1, 1, 1)
        return code.to(out.dtype)

    stack.callback(conv.register_forward_hook(conv_hook).remove)
    stack.callback(embeddings.position_embedding.register_forward_hook(lambda m, a, out: torch.zeros_like(out)).remove)


@contextmanager
def route_pixel_codes(vlm) -> Iterator[dict]:
    """Install the hooks; yields a dict that receives ``vision_seq`` (codes as the vision blocks see them)."""
    family, model, ip = vlm.family, vlm.model, vlm.processor.image_processor
    seen: dict = {}
    with ExitStack() as stack:
        if family in ("qwen2_vl", "qwen2_5_vl"):
            visual = model.model.visual
            pe = visual.patch_embed

            def pe_hook(mod, args, out):
                rows = args[0].double()
                n = rows.shape[0]
                means = rows.view(n, pe.in_channels, -1).mean(-1)
                code = torch.zeros(n, out.shape[-1], dtype=torch.float64)
                code[:, :3] = _denormalize_channels(means, ip)
                code[:, 3] = 1.0
                code[:, 4] = torch.arange(n, dtype=torch.float64)
                return code.to(out.dtype)

            stack.callback(pe.register_forward_hook(pe_hook).remove)
            for blk in visual.blocks:
                _passthrough(stack, blk)
            _record_input(stack, visual.blocks[0], seen, "vision_seq")
            unit = visual.spatial_merge_size**2

            def merger_hook(mod, args, out):
                # the merger concatenates each run of `unit` consecutive rows (its own .view(-1, hidden*unit))
                x = args[0].view(-1, unit, args[0].shape[-1])[..., :CODE]
                code = torch.zeros_like(out)
                code[:, : unit * CODE] = x.reshape(x.shape[0], -1)
                return code

            stack.callback(visual.merger.register_forward_hook(merger_hook).remove)
        elif family in ("idefics3", "smolvlm"):
            vm = model.model.vision_model
            _conv_patch_codes(stack, vm.embeddings, ip)
            for layer in vm.encoder.layers:
                _passthrough(stack, layer)
            _passthrough(stack, vm.post_layernorm)
            _record_input(stack, vm.encoder.layers[0], seen, "vision_seq")
            proj = model.model.connector.modality_projection

            def proj_hook(mod, args, out):
                x = args[0]  # (B, S, D * s^2): the connector's own pixel shuffle stacked s^2 patches
                d = model.config.vision_config.hidden_size
                sub = x.view(*x.shape[:2], -1, d)[..., :CODE]
                code = torch.zeros_like(out)
                code[..., : sub.shape[2] * CODE] = sub.reshape(*x.shape[:2], -1)
                return code

            stack.callback(proj.register_forward_hook(proj_hook).remove)
        elif family == "gemma3":
            vm = vlm.adapter.vision_encoder(model)
            _conv_patch_codes(stack, vm.embeddings, ip)
            for layer in vm.encoder.layers:
                _passthrough(stack, layer)
            _passthrough(stack, vm.post_layernorm)
            _record_input(stack, vm.encoder.layers[0], seen, "vision_seq")
            mmp = model.model.multi_modal_projector
            _passthrough(stack, mmp.mm_soft_emb_norm)  # the model's own avg_pool still runs
            weight = mmp.mm_input_projection_weight
            saved = weight.detach().clone()
            with torch.no_grad():
                weight.zero_()
                weight[:CODE, :CODE] = torch.eye(CODE, dtype=weight.dtype)
            stack.callback(lambda: weight.data.copy_(saved))
        else:
            raise ValueError(f"no pixel route for family {family!r}")
        yield seen


def codes_at_positions(vlm, batch) -> tuple[torch.Tensor, dict]:
    """(inputs_embeds the decoder receives with pixel codes routed, recorded vision sequence)."""
    with route_pixel_codes(vlm) as seen:
        embeds = vlm.adapter.decoder_inputs(vlm.model, batch.inputs)["inputs_embeds"]
    return embeds.double(), seen


def _center(code: np.ndarray, wh: tuple[int, int]) -> tuple[float, float]:
    return float(code[0]) * wh[0], float(code[1]) * wh[1]


def _tol(wh: tuple[int, int], box_w: float, box_h: float) -> tuple[float, float]:
    # uint8 quantization of the ramp + resampling near borders; well under half a box
    return 0.6 + wh[0] / 255 + 0.15 * box_w, 0.6 + wh[1] / 255 + 0.15 * box_h


def check_lm_positions(vlm, batch, embeds: torch.Tensor, sub_grid: int, source_of) -> int:
    """Every image position holds ``sub_grid**2`` sub-patch codes whose pixels lie at the matching
    sub-box of the layout's box and whose source is ``source_of(sample, image, tile)`` (a set)."""
    checked = 0
    n_sub = sub_grid * sub_grid
    for i, lay in enumerate(batch.layouts):
        e = embeds[i].numpy()
        marker = e[:, 3 : n_sub * CODE : CODE]
        is_code = np.isclose(marker, 1.0, atol=1e-4).all(axis=1)
        assert set(np.flatnonzero(is_code)) == set(lay.image_positions.tolist()), (
            f"sample {i}: positions holding routed pixels differ from the layout's image positions"
        )
        t = lay.table()
        for rec in t[t["kind"] == KIND_IMAGE].itertuples():
            wh = lay.image_sizes[rec.image]
            sources = source_of(i, rec.image, rec.tile)
            bw, bh = (rec.x1 - rec.x0) / sub_grid, (rec.y1 - rec.y0) / sub_grid
            tx, ty = _tol(wh, bw, bh)
            for k in range(n_sub):
                code = e[rec.position, k * CODE : (k + 1) * CODE]
                dr, dc = divmod(k, sub_grid)
                cx, cy = _center(code, wh)
                ex, ey = rec.x0 + (dc + 0.5) * bw, rec.y0 + (dr + 0.5) * bh
                assert abs(cx - ex) < tx and abs(cy - ey) < ty, (
                    f"sample {i} position {rec.position} (image {rec.image} tile {rec.tile} row {rec.row} col "
                    f"{rec.col}) sub-patch {k}: pixels centred at ({cx:.1f}, {cy:.1f}), "
                    f"layout box says ({ex:.1f}, {ey:.1f})"
                )
                assert int(round(code[4])) in sources, (
                    f"sample {i} position {rec.position}: came from vision input {code[4]:.0f}, "
                    f"layout's (image {rec.image}, tile {rec.tile}) is {sorted(sources)[:3]}..."
                )
                checked += 1
    return checked


def check_vision_table(vlm, batch, vision_seq: torch.Tensor, flat: bool) -> int:
    """Each vision-table row (crop, vpos) must show, in the sequence the vision blocks see, the
    pixels of its box. ``flat``: one concatenated sequence (Qwen) with crops back to back."""
    seq = vision_seq.double()
    tables = [lay.vision_table() for lay in batch.layouts]
    checked = 0
    if flat:
        sizes = np.zeros(1 + max(int(v["crop"].max()) for v in tables), dtype=int)
        for v in tables:
            for crop, n in v.groupby("crop").size().items():
                sizes[crop] = n
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        assert offsets[-1] == seq.shape[0], "vision tables do not cover the vision sequence"
    for i, (lay, vis) in enumerate(zip(batch.layouts, tables)):
        for rec in vis.itertuples():
            code = (seq[offsets[rec.crop] + rec.vpos] if flat else seq[rec.crop, rec.vpos]).numpy()
            wh = lay.image_sizes[rec.image]
            cx, cy = _center(code, wh)
            ex, ey = (rec.x0 + rec.x1) / 2, (rec.y0 + rec.y1) / 2
            tx, ty = _tol(wh, rec.x1 - rec.x0, rec.y1 - rec.y0)
            assert abs(cx - ex) < tx and abs(cy - ey) < ty, (
                f"sample {i} vision crop {rec.crop} vpos {rec.vpos} (image {rec.image} tile {rec.tile} patch "
                f"{rec.row},{rec.col}): pixels centred at ({cx:.1f}, {cy:.1f}), table box centre ({ex:.1f}, {ey:.1f})"
            )
            if not flat:
                assert int(round(code[4])) == rec.crop
            checked += 1
    return checked
