"""Train a byte-level BPE tokenizer locally with the `tokenizers` library.

The result is a ``PreTrainedTokenizerFast`` with a distinct pad token (so padding can never be confused with
EOS) and the special tokens of the built-in chat templates (ChatML and Llama-3 markers), so every built-in
template renders to single special tokens.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Special tokens of the built-in templates (chatml, llama3): each must be one token, never split.
TEMPLATE_TOKENS = [
    "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]
SPECIAL_TOKENS = [EOS, PAD, *TEMPLATE_TOKENS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on ``texts``.

    Args:
        texts: training text (any iterable of strings; consumed once).
        vocab_size: target vocabulary size including the 256 byte symbols and the special tokens.
        min_frequency: minimum pair count for a merge.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``eos_token``/``bos_token`` = ``<|endoftext|>`` and
        ``pad_token`` = ``<|pad|>`` (a different id), ``model_max_length`` unset.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=None,
        pad_token=PAD,
        additional_special_tokens=TEMPLATE_TOKENS,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
