"""The padded Hugging Face path: any AutoModelForSequenceClassification, batched with right padding.

Decoder reward models (a `score` linear head over the last token) run their backbone once per
micro-batch and we apply the head only at each item's pooled position: the same numbers HF computes,
without projecting every padded position. Other architectures (encoders with their own poolers) are
called whole; their logits are HF's by construction.

Padding is always on the right with explicit position ids 0..n-1, whatever the tokenizer's padding
side: causal attention means real tokens never see the padding, and absolute-position models (GPT-2)
see the same positions as when the item runs alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from service.models.pooling import last_token_index
from service.models.units import Unit, flatten


@dataclass(slots=True)
class BatchOutput:
    scores: torch.Tensor  # (n, K) float32 on CPU, in input order
    computed_positions: int  # positions the device computed, padding included
    real_tokens: int


def plan_padded(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Split items into length-sorted micro-batches whose padded size (items x longest) fits `max_tokens`."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # sorted ascending, so the item joining is the longest of its group
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class HFBackend:
    """Scores batches of token ids with one HF model replica on one device."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch_tokens: int):
        self.model = model
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.pad_token_id = cfg.pad_token_id
        self.fill_id = self.pad_token_id if self.pad_token_id is not None else 0
        head = getattr(model, "score", None)
        self.last_token_head = isinstance(head, nn.Linear) and not getattr(model.config, "is_encoder_decoder", False)
        if self.last_token_head:
            self.backbone = model.base_model
            params = inspect.signature(self.backbone.forward).parameters
            self.pass_positions = "position_ids" in params

    @torch.inference_mode()
    def score(self, units: list[Unit]) -> BatchOutput:
        # no prefix sharing on this path: a group's members are scored as full sequences
        batch = flatten(units)
        lengths = [len(ids) for ids in batch]
        out = torch.empty(len(batch), self.model.config.num_labels, dtype=torch.float32)
        computed = 0
        for group in plan_padded(lengths, self.max_batch_tokens):
            seqs = [batch[i] for i in group]
            longest = max(lengths[i] for i in group)
            computed += longest * len(group)
            out[group] = self._forward(seqs, longest)
        return BatchOutput(out, computed, sum(lengths))

    def _forward(self, seqs: list[list[int]], longest: int) -> torch.Tensor:
        n = len(seqs)
        ids = torch.full((n, longest), self.fill_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if not self.last_token_head:
            return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        kwargs = {}
        if self.pass_positions:
            kwargs["position_ids"] = torch.arange(longest, device=self.device).expand(n, longest)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state  # (n, L, H)
        pos = torch.tensor([last_token_index(s, self.pad_token_id) for s in seqs], device=self.device)
        pooled = hidden[torch.arange(n, device=self.device), pos]  # (n, H)
        return self.model.score(pooled).float().cpu()  # (n, K)
