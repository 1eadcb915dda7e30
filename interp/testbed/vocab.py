"""Word-level vocabulary and tokenizer for the multimodal testbed.

The tokenizer is a standard ``transformers.PreTrainedTokenizerFast`` wrapping a
``tokenizers`` WordLevel model with a whitespace-split pre-tokenizer, so it can be
saved next to a checkpoint and re-loaded offline with ``AutoTokenizer``.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE, MASK, UNK = "<pad>", "<bos>", "<eos>", "<image>", "<mask>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE, MASK, UNK]

SHAPES = ["square", "circle", "triangle", "cross"]
COLOURS = ["red", "green", "blue", "yellow", "purple"]
COUNT_WORDS = ["one", "two", "three"]
WHERE_WORDS = ["top-left", "top-right", "bottom-left", "bottom-right"]
YES_NO = ["yes", "no"]

PROMPT_WORDS = [
    "user", "assistant", ":", "?", ".",
    "what", "color", "is", "the", "there", "a", "how", "many", "objects",
    "where", "describe",
]

WORDS = PROMPT_WORDS + SHAPES + COLOURS + COUNT_WORDS + WHERE_WORDS + YES_NO
VOCAB = SPECIAL_TOKENS + WORDS


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the word-level fast tokenizer (ids are fixed by ``VOCAB`` order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # WhitespaceSplit: split on whitespace only, so "top-left" stays one token and
    # punctuation must be written as separate words ("what color is the circle ?").
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        mask_token=MASK,
        additional_special_tokens=[IMAGE],
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    return fast
