"""Step 2 of the recipe: a byte-level BPE tokenizer trained with `tokenizers` on the train split only.

GPT-2 style byte-level BPE (every byte is a token, so there is no unknown token), GPT-2's
pre-tokenizer regex, ``<s>`` / ``</s>`` / ``<pad>`` as ids 0 / 1 / 2, and ``<s>`` added in front
of every encoded text (as Llama's tokenizer does). Returned as a transformers
PreTrainedTokenizerFast, saved with ``save_pretrained`` beside the model.

Training is deterministic for a given input (the BPE trainer breaks count ties by the pair itself);
``tokenizer_sha256`` fingerprints the result so reruns can be compared.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [BOS, EOS, PAD]  # ids 0, 1, 2
VOCAB_SIZE = 4096
MIN_FREQUENCY = 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE, min_frequency: int = MIN_FREQUENCY):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=1 << 20, clean_up_tokenization_spaces=False)


def tokenizer_sha256(tokenizer) -> str:
    """A fingerprint of the tokenizer's model (vocabulary, merges, normalization, specials)."""
    backend = tokenizer.backend_tokenizer if hasattr(tokenizer, "backend_tokenizer") else tokenizer
    return hashlib.sha256(backend.to_str(pretty=False).encode("utf-8")).hexdigest()

