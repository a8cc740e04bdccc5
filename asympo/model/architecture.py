"""The tiny default policy: a Qwen2-architecture causal LM over the character vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from asympo.model.char_tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, char_vocab


@dataclass(frozen=True)
class TinyArchitecture:
    """Shape of the tiny model (defaults: about 1.6 M parameters, head_dim 32).

    vLLM's CPU attention needs a head size in {32, 64, 80, ...}, so keep
    ``hidden_size / num_heads`` at one of those.
    """

    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_positions: int = 256
    rope_theta: float = 10_000.0

    def qwen2_config(self) -> Qwen2Config:
        """The transformers config for this shape and the character vocabulary."""
        vocab = char_vocab()
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return Qwen2Config(
            vocab_size=len(vocab),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=True,
            bos_token_id=vocab[BOS_TOKEN],
            eos_token_id=vocab[EOS_TOKEN],
            pad_token_id=vocab[PAD_TOKEN],
            use_sliding_window=False,
        )


def build_tiny_model(arch: TinyArchitecture, seed: int) -> Qwen2ForCausalLM:
    """A freshly initialised tiny model in float32, deterministic given ``seed``."""
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(arch.qwen2_config())
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.bos_token_id = model.config.bos_token_id
    return model.float()


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
