"""The organism's tokenizer: WordPiece over the synthetic task vocabulary, built offline.

Task words are whole tokens; anything else falls back to single letters/digits with ``##``
continuation pieces, so open answers (the `reading` task's random words) are spelled letter by
letter and decode back without spaces ("q ##x ##z" -> "qxz").
"""

from __future__ import annotations

import string

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
)
from transformers import PreTrainedTokenizerFast

from vtrlab.data.synthetic import vocabulary

PAD, UNK, BOS = "<pad>", "<unk>", "<s>"
IMAGE = "<image>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, END, SYSTEM, USER, ASSISTANT, IMAGE)
PUNCTUATION = (".", ",", "!", "?", ":", ";", "'", "-")
# LLaVA-1.5 starts every conversation with a short system prompt, then the image, then the question
SYSTEM_PROMPT = "a chat about a picture . answer the question in one word ."
# LLaVA stage 1 (projector alignment) asks for a brief description of the picture
CAPTION_PROMPT = "describe the picture ."


def organism_vocab() -> list[str]:
    pieces = list(string.ascii_lowercase) + list(string.digits)
    extra = set(SYSTEM_PROMPT.split()) | set(CAPTION_PROMPT.split())
    words = sorted({w for w in [*vocabulary(), *extra] if w not in pieces and w not in PUNCTUATION})
    return list(SPECIAL_TOKENS) + words + pieces + ["##" + p for p in pieces] + list(PUNCTUATION)


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(organism_vocab())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # special tokens are matched before normalisation/pre-tokenisation and skipped on decode
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=512,
    )
