"""The built-in default model: a tiny Llama made in code, so `qcompile build` works with no download
and no GPU.

Weights are drawn from a seeded generator (variance-preserving scales, so activations and logits
have a real spread and quantization error is visible), and the tokenizer is byte-level BPE with
no merges (256 byte tokens + <s> + </s>). A trained small model replaces it when one is present
in the cache (see ``find_default_model``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

SEEDED_NAME = "tiny-llama-seeded-v1"  # bump the suffix when the recipe below changes
TRAINED_NAME = "tiny-llama-trained"
SEED = 0

HIDDEN = 256
INTERMEDIATE = 768  # a multiple of 128, so every linear fits int4-g128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
BYTE_TOKENS = 256
BOS, EOS = "<s>", "</s>"
VOCAB = BYTE_TOKENS + 2


def cache_root() -> Path:
    """$QCOMPILE_CACHE_DIR, else ~/.cache/qcompile."""
    env = os.environ.get("QCOMPILE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "qcompile"


def find_default_model() -> Path:
    """The trained small model when it is in the cache, else the seeded one (written on first use)."""
    trained = cache_root() / "models" / TRAINED_NAME
    if (trained / "config.json").is_file():
        return trained
    return default_model_dir(cache_root())


def default_model_dir(root: Union[str, os.PathLike, None] = None) -> Path:
    """Write the seeded default model under ``root/models`` once and return its directory.

    The model is written into a temporary directory beside the final one and renamed into place,
    so a reader never sees a half-written model and concurrent writers do not clash.
    """
    root = Path(root) if root is not None else cache_root()
    final = root / "models" / SEEDED_NAME
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SEEDED_NAME}.tmp-", dir=final.parent))
    try:
        write_seeded_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process won the race: its copy is identical, keep it
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def seeded_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=BYTE_TOKENS, eos_token_id=BYTE_TOKENS + 1, pad_token_id=BYTE_TOKENS + 1,
        architectures=["LlamaForCausalLM"])


def seeded_model():
    """LlamaForCausalLM (fp32) with weights from a seeded generator, independent of how
    transformers initialises modules (that changes between versions)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():  # transformers' own init draws from the global RNG; leave it as it was
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(seeded_config())
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:  # RMSNorm gains: around 1
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # linears [out, in]: unit-variance outputs for unit-variance inputs
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.eval()


def byte_to_unicode():
    """GPT-2's reversible map of the 256 byte values to printable characters (ByteLevel's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = {}
    extra = 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def seeded_tokenizer():
    """Byte-level BPE with no merges: one token per byte (ids 0..255 = byte values), then <s>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BYTE_TOKENS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def write_seeded_model(out_dir: Union[str, os.PathLike]) -> None:
    from transformers import GenerationConfig

    model = seeded_model()
    tokenizer = seeded_tokenizer()
    assert len(tokenizer) == VOCAB, len(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=BYTE_TOKENS, eos_token_id=BYTE_TOKENS + 1, pad_token_id=BYTE_TOKENS + 1)
    from .build import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(out_dir)  # safetensors, never pickle
        tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "README.qcompile.json"), "w") as f:
        json.dump({"what": "qcompile seeded default model (random weights, not trained)",
                   "seed": SEED, "recipe": SEEDED_NAME}, f, indent=1)
