"""The padded Hugging Face path: any AutoModelForSequenceClassification, batched with right padding.

Decoder reward models (a `score` linear head over the last token) run their backbone once per
micro-batch and we apply the head only at each item's pooled position: the same numbers HF computes,
without projecting every padded position. Other architectures (encoders with their own poolers) are
called whole; their logits are HF's by construction.

Padding is always on the right with explicit position ids 0..n-1, whatever the tokenizer's padding
side: causal attention means real tokens never see the padding, and absolute-position models (GPT-2)
see the same positions as when the item runs alone.

Shared-prefix groups (best-of-N, GRPO groups) run their prompt once with a KV cache; each chunk of
responses then runs as one right-padded batch against a copy of that cache repeated per row, with
positions continuing after the prompt. Models whose backbone takes no cache (encoders) score the
group's members as full sequences.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from rewardserve.errors import bug
from rewardserve.models.units import Unit


@dataclass(slots=True)
class BatchOutput:
    scores: torch.Tensor  # (n, K) float32 on CPU, in input order
    computed_positions: int  # positions the device computed, padding included
    real_tokens: int
    seconds: float | None = None  # the device's own time on the batch, where the backend measured it apart
    saved_tokens: int = 0  # tokens not computed because separate items' shared beginnings ran once


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


class TokenRows(nn.Module):
    """Some rows of a causal LM's head (its verdict or label tokens), as the model computes them."""

    def __init__(self, lm_head: nn.Linear, rows: list[int], softcap: float | None):
        super().__init__()
        self.weight = nn.Parameter(lm_head.weight.detach()[rows].clone(), requires_grad=False)
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.weight.T
        if self.softcap:  # Gemma's final logit soft-capping
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class HFBackend:
    """Scores batches of token ids with one HF model replica on one device: through its score head, or
    with `rows`, through those rows of its LM head (a causal LM)."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch_tokens: int, rows: list[int] | None = None):
        self.model = model
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.attention = ""  # HF's own
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.pad_token_id = cfg.pad_token_id
        self.fill_id = self.pad_token_id if self.pad_token_id is not None else 0
        if rows is not None:
            self.head = TokenRows(model.get_output_embeddings(), rows,
                                  getattr(cfg, "final_logit_softcapping", None)).to(device)
            self.outputs = len(rows)
        else:
            self.head, self.outputs = getattr(model, "score", None), model.config.num_labels
        self.last_token_head = isinstance(self.head, (nn.Linear, TokenRows)) and not getattr(
            model.config, "is_encoder_decoder", False)
        self.shares_prefix = False
        if self.last_token_head:
            self.backbone = model.base_model
            params = inspect.signature(self.backbone.forward).parameters
            self.pass_positions = "position_ids" in params
            self.shares_prefix = self.pass_positions and "past_key_values" in params and "use_cache" in params

    @torch.inference_mode()
    def score(self, units: list[Unit]) -> BatchOutput:
        out = torch.empty(sum(u.rows for u in units), self.outputs, dtype=torch.float32)
        plain: list[tuple[int, list[int], tuple[int, ...]]] = []  # (first output row, ids, pooled positions)
        computed = real = row = 0
        for u in units:
            if u.prefix and self.shares_prefix:
                scores, positions = self._forward_shared(u)
                out[row: row + u.rows] = scores
                computed, real, row = computed + positions, real + u.tokens, row + u.rows
                continue
            for ids, pools in u.sequences():  # a lone sequence, or a group this model cannot share
                plain.append((row, ids, pools))
                row += len(pools)
        lengths = [len(ids) for _, ids, _ in plain]
        for group in plan_padded(lengths, self.max_batch_tokens):
            longest = max(lengths[i] for i in group)
            computed += longest * len(group)
            rows = [plain[i][0] + j for i in group for j in range(len(plain[i][2]))]
            out[rows] = self._forward([plain[i][1] for i in group], [plain[i][2] for i in group], longest)
        return BatchOutput(out, computed, real + sum(lengths))

    def _forward_shared(self, unit: Unit) -> tuple[torch.Tensor, int]:
        """The prompt once with a cache, then the responses in padded chunks against copies of it."""
        p = len(unit.prefix)
        ids = torch.tensor([unit.prefix], dtype=torch.long, device=self.device)
        prompt = self.backbone(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                               position_ids=torch.arange(p, device=self.device)[None])
        lengths = [len(s) for s in unit.suffixes]
        first = [0]
        for pools in unit.pools:
            first.append(first[-1] + len(pools))
        scores = torch.empty(first[-1], self.outputs, dtype=torch.float32)
        computed = p
        for group in plan_padded(lengths, self.max_batch_tokens):
            n, longest = len(group), max(lengths[i] for i in group)
            computed += n * longest
            cache = copy.deepcopy(prompt.past_key_values)  # the forward below appends to the cache in place
            cache.batch_repeat_interleave(n)
            ids = torch.full((n, longest), self.fill_id, dtype=torch.long)
            mask = torch.zeros((n, p + longest), dtype=torch.long)
            mask[:, :p] = 1
            for r, i in enumerate(group):
                ids[r, : lengths[i]] = torch.tensor(unit.suffixes[i], dtype=torch.long)
                mask[r, p: p + lengths[i]] = 1
            positions = torch.arange(p, p + longest, device=self.device).expand(n, longest)
            hidden = self.backbone(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                   position_ids=positions, past_key_values=cache, use_cache=True).last_hidden_state
            rows = [first[i] + j for i in group for j in range(len(unit.pools[i]))]
            scores[rows] = self._head(hidden, [unit.pools[i] for i in group])
        return scores, computed

    def _head(self, hidden: torch.Tensor, pools: list[tuple[int, ...]]) -> torch.Tensor:
        """The score head at each row's pooled positions: (n, L, H) -> (sum of len(pools), K) fp32 on CPU."""
        r = torch.tensor([i for i, p in enumerate(pools) for _ in p], device=self.device)
        c = torch.tensor([q for p in pools for q in p], device=self.device)
        return self.head(hidden[r, c]).float().cpu()

    def _forward(self, seqs: list[list[int]], pools: list[tuple[int, ...]], longest: int) -> torch.Tensor:
        n = len(seqs)
        ids = torch.full((n, longest), self.fill_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        if not self.last_token_head:  # the model pools by its own rule: one row per sequence
            if any(len(p) != 1 for p in pools):
                raise bug(f"{type(self.model).__name__} pools by itself; it cannot read several positions.")
            return self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()
        kwargs = {}
        if self.pass_positions:
            kwargs["position_ids"] = torch.arange(longest, device=self.device).expand(n, longest)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state  # (n, L, H)
        return self._head(hidden, pools)
