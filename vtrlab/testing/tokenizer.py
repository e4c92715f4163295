"""Offline tokenizers for tiny test models: byte-level, no merges, so any text encodes without UNK."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def byte_tokenizer(
    special_tokens: Sequence[str],
    chat_template: str | None = None,
    *,
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    add_bos: bool = True,
    **named_tokens: str,
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` over the 256 byte symbols plus ``special_tokens``.

    ``named_tokens`` become attributes the processors look for (e.g. ``image_token="<image>"``).
    Every special token is a single id, as in the real checkpoints.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    base = [t for t in (bos, eos, pad) if t is not None]
    extra = [t for t in special_tokens if t not in base]
    tok.add_special_tokens(base + extra)
    if add_bos and bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
    kwargs = dict(tokenizer_object=tok, eos_token=eos, pad_token=pad, extra_special_tokens=extra)
    if bos is not None:
        kwargs["bos_token"] = bos
    out = PreTrainedTokenizerFast(**kwargs)
    for name, value in named_tokens.items():
        setattr(out, name, value)
    if chat_template is not None:
        out.chat_template = chat_template
    return out
