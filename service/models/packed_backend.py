"""The packed backend: batches of token ids through the padding-free decoder."""

from __future__ import annotations

import importlib

import torch

from rewardserve.models.hf_backend import BatchOutput
from rewardserve.models.packed import PackedBatch, PackedRewardModel
from rewardserve.models.units import Unit


def rotary_parameters(hf_config) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as the family's HF rotary module computes them
    (default, llama3, linear, yarn all come from transformers' own rope initialisers)."""
    family = hf_config.model_type
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rotary = cls(config=hf_config)
    return rotary.inv_freq.detach().float().cpu(), float(rotary.attention_scaling)


class PackedBackend:
    kind = "packed"
    shares_prefix = True  # a unit's prefix and suffixes become tree-shaped packed segments
    # Lone items of one batch that begin with this many equal tokens or more (a chat template's
    # opening, a GRPO group's prompt sent as separate requests) share one prefix segment.
    share_across_min = 4

    def __init__(self, model: PackedRewardModel, device: torch.device):
        self.model = model
        self.device = device
        self.vocab_size = model.cfg.vocab_size
        self.attention = model.ops.attention_name  # varlen_attn, C++ kernel or SDPA
        # Only where a response after a shared prefix gets the same bits as its whole sequence (the
        # C++ kernel's key blocks sit at fixed positions): an item's score must not depend on whether
        # a batch mate happened to begin like it.
        self.share_across = model.ops.attention_kernel is not None

    @torch.inference_mode()
    def score(self, batch: list[Unit]) -> BatchOutput:
        packed = PackedBatch.build(batch, self.device, self.share_across_min if self.share_across else None)
        scores = self.model(packed).float().cpu()  # (rows, K)
        tokens = packed.cu_seqlens[-1]
        return BatchOutput(scores, tokens, tokens, saved_tokens=packed.saved_tokens)
