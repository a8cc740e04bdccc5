"""Sizing arithmetic: parameters, learner memory per GPU, training FLOPs and MFU.

Pure arithmetic over a decoder-only architecture (Qwen/LLaMA layout: GQA attention,
SwiGLU MLP, RMSNorm), used by docs/scaling.md (``python -m asympo.model.sizing``) and by
scripts/gpu_check.py. Memory is an estimate, not a measurement: the formulas are in
:func:`learner_memory` and explained in docs/scaling.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1 << 30


@dataclass(frozen=True)
class Arch:
    """The shape of a decoder-only transformer."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qk_norm: bool = True  # Qwen3 normalises q and k per head

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return q + kv + o + mlp + norms

    def params(self) -> int:
        """All parameters (a tied head counted once)."""
        embed = self.vocab * self.hidden
        head = 0 if self.tied else embed
        return self.layers * self.layer_params() + embed + head + self.hidden

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward).

        6 per non-embedding weight and per head weight, plus attention scores and
        values: 6 x 2 x layers x seq_len x heads x head_dim (causal: half of it).
        """
        matmul = self.layers * self.layer_params() + self.vocab * self.hidden
        attention = 6 * self.layers * seq_len * self.heads * self.head_dim  # causal half of 12
        return 6.0 * matmul + attention


# Shapes from the models' published config.json files (nothing is downloaded).
ARCHS = {
    "qwen3-0.6b": Arch("Qwen3-0.6B", 1024, 28, 16, 8, 128, 3072, 151936, True),
    "qwen3-1.7b": Arch("Qwen3-1.7B-Base", 2048, 28, 16, 8, 128, 6144, 151936, True),
    "llama-3.2-3b": Arch("Llama-3.2-3B-Instruct", 3072, 28, 24, 8, 128, 8192, 128256, True, False),
    "qwen3-4b": Arch("Qwen3-4B-Base", 2560, 36, 32, 8, 128, 9728, 151936, True),
    "qwen3-8b": Arch("Qwen3-8B-Base", 4096, 36, 32, 8, 128, 12288, 151936, False),
}


def activation_bytes_per_token(arch: Arch, checkpointing: bool) -> float:
    """Activation memory per token of a micro-batch, bf16 compute, SDPA attention.

    Per layer kept for backward: the two norm inputs and outputs (4h), q/k/v before and
    after RoPE (2h + 4 kv), the attention output (h), gate, up, SiLU(gate) and their
    product (4f): ``2 bytes x (7h + 4 kv + 4f)``. With activation checkpointing only each
    layer's input (2h bytes) is kept, plus one layer recomputed at a time. The head adds
    the logits in bf16, their float32 copy and the float32 log-softmax the loss keeps:
    ``(2 + 4 + 4) x vocab``.
    """
    kv = arch.kv_heads * arch.head_dim
    full_layer = 2.0 * (7 * arch.hidden + 4 * kv + 4 * arch.intermediate)
    layers = (
        arch.layers * 2.0 * arch.hidden + full_layer
        if checkpointing
        else arch.layers * full_layer
    )
    return layers + 10.0 * arch.vocab


def learner_memory(
    arch: Arch,
    strategy: str,
    gpus: int,
    tokens_per_micro_batch: int,
    checkpointing: bool,
) -> dict[str, float]:
    """Estimated learner memory per GPU in GiB: state, gathered, activations, total.

    * ``ddp`` (float32 everywhere): weights 4 + gradients 4 + AdamW moments 8 = 16 bytes
      per parameter on every GPU.
    * ``fsdp`` (bf16 compute, float32 master/gradients/AdamW): the same 16 bytes per
      parameter divided by the GPUs, plus the bf16 copies all-gathered for compute —
      the root (embeddings + head, held for the whole step) and two decoder layers
      (the current one and the prefetched next), and their bf16 gradients before the
      reduce-scatter.
    * ``fsdp-offload``: the sharded 16 bytes per parameter live in host memory; the GPU
      keeps only the gathered bf16 copies.
    Activations: :func:`activation_bytes_per_token` x ``tokens_per_micro_batch``.
    """
    p = arch.params()
    embed = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    if strategy == "ddp":
        state, gathered = 16.0 * p, 0.0
    elif strategy in ("fsdp", "fsdp-offload"):
        state = 0.0 if strategy == "fsdp-offload" else 16.0 * p / gpus
        gathered = 2.0 * (embed + 2 * arch.layer_params()) * 2  # params + grads, bf16
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    acts = activation_bytes_per_token(arch, checkpointing) * tokens_per_micro_batch
    host = 16.0 * p / gpus if strategy == "fsdp-offload" else 0.0
    return {
        "state": state / GIB,
        "gathered": gathered / GIB,
        "activations": acts / GIB,
        "total": (state + gathered + acts) / GIB,
        "host": host / GIB,
    }


def build_random_model(arch: Arch, seed: int = 0, max_positions: int = 4096) -> Any:
    """A randomly initialised Qwen3 causal LM of ``arch`` (float32, CPU; nothing downloaded)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim,
        tie_word_embeddings=arch.tied,
        max_position_embeddings=max_positions,
    )
    return Qwen3ForCausalLM(config).float()


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak."""
    if peak_flops <= 0:
        raise ValueError("peak_flops must be > 0")
    return tokens_per_s * flops_per_token / peak_flops


# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets.
BF16_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
}


def peak_flops_for(device_name: str) -> float | None:
    """The bf16 peak of a GPU by its name (``torch.cuda.get_device_name``), or None."""
    for key, value in BF16_PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def memory_table(gpus: int = 4, tokens: int = 16384) -> str:
    """The markdown table of docs/scaling.md: GiB per GPU by model, strategy, checkpointing."""
    rows = [
        "| model | params | strategy | act. ckpt | state | gathered | activations | "
        "total / GPU | host / GPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("qwen3-1.7b", "llama-3.2-3b", "qwen3-4b", "qwen3-8b"):
        arch = ARCHS[key]
        for strategy in ("ddp", "fsdp", "fsdp-offload"):
            for ckpt in (False, True):
                m = learner_memory(arch, strategy, gpus, tokens, ckpt)
                rows.append(
                    f"| {arch.name} | {arch.params() / 1e9:.2f}B | {strategy} | "
                    f"{'on' if ckpt else 'off'} | {m['state']:.1f} | {m['gathered']:.1f} | "
                    f"{m['activations']:.1f} | **{m['total']:.1f}** | {m['host']:.1f} |"
                )
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    gpus = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
    print(f"learner GPUs: {gpus}, tokens per micro-batch: {tokens}\n")
    print(memory_table(gpus, tokens))
