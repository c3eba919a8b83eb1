"""The fast path: a padding-free packed decoder for Llama-family reward models (Llama, Qwen2, Qwen3,
Mistral), reading the HF config and safetensors weights directly.

All tokens of a batch are concatenated into one (T, H) stream; `cu_seqlens` marks where each
sequence starts and `positions` restart at 0 for each. Every matmul runs over the T real tokens and
nothing else. Attention is causal within each sequence (and windowed where the config says so).
The reward is read at each sequence's pooled token by the fused reward head (final RMSNorm + gather
+ projection onto all heads, fp32 accumulation).

On CUDA the elementwise ops are Triton kernels (kernels/); on CPU their PyTorch references run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from rewardserve.kernels.attention_cpu import load_kernel, load_rmsnorm, load_rope
from rewardserve.kernels.reward_head import reward_head_torch, reward_head_triton
from rewardserve.kernels.rmsnorm import rmsnorm_cpu, rmsnorm_triton
from rewardserve.kernels.rope import rope_cpu, rope_tables, rope_triton
from rewardserve.kernels.swiglu import silu_mul_, swiglu_triton
from rewardserve.models.attention import packed_causal_attention, pooled_causal_attention
from rewardserve.models.units import Unit, share_across

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# "dynamic" (NTK) rescales the frequencies only for a sequence longer than max_position_embeddings,
# and the encoder never lets one through (max_length is capped there), so for every item we serve
# HF's dynamic update keeps the original frequencies, which are what rotary_parameters returns.
_ROPE_TYPES = ("default", "llama3", "linear", "yarn", "dynamic")


@dataclass(frozen=True)
class DecoderConfig:
    family: str
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    num_labels: int
    qk_norm: bool
    windows: tuple[int | None, ...]  # per layer: sliding window size, or None for full causal attention
    max_positions: int
    qkv_bias: bool = False  # Qwen2; Llama/Qwen3 with attention_bias
    o_bias: bool = False
    mlp_bias: bool = False
    score_bias: bool = False  # token-classification heads (process reward models) carry one

    @staticmethod
    def unsupported_reason(hf) -> str | None:
        """Why this HF config cannot take the fast path (None when it can)."""
        if hf.model_type not in FAMILIES:
            return f"model_type {hf.model_type!r} is not one of {FAMILIES}"
        rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            return f"rope_type {rope_type!r} is not one of {_ROPE_TYPES}"
        if getattr(hf, "hidden_act", "silu") != "silu":
            return f"hidden_act {hf.hidden_act!r}"
        return None

    @classmethod
    def from_hf(cls, hf) -> "DecoderConfig":
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        windows = tuple(window if t == "sliding_attention" and window else None for t in types)
        if hf.model_type == "mistral" and window and not getattr(hf, "layer_types", None):
            windows = (window,) * hf.num_hidden_layers
        return cls(
            family=hf.model_type, vocab_size=hf.vocab_size, hidden=hf.hidden_size, layers=hf.num_hidden_layers,
            heads=hf.num_attention_heads, kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim, intermediate=hf.intermediate_size, eps=hf.rms_norm_eps, num_labels=hf.num_labels,
            qk_norm=hf.model_type == "qwen3", windows=windows, max_positions=hf.max_position_embeddings,
        )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) through oneDNN's fp32/bf16 GEMM.

    Written by hand because torch's CPU F.linear goes to MKL, which on this AMD EPYC VM ran our
    projection shapes at 125-150 GFLOP/s with 2 threads, while oneDNN (bundled with torch) ran the
    same shapes at 150-205, in fp32 with the same accumulation (differences are reordering only:
    ~1e-6 relative) and rows independent of the batch. The op is the one torch's own compiler
    emits for CPU linears; `onednn_works` probes it (Ops falls back to F.linear without it)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_pack(weight: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """`weight` reordered once, at load, into oneDNN's blocked layout for GEMMs of about `rows` rows
    (an opaque tensor that only the oneDNN GEMMs above take). Unpacked weights are reordered inside
    every call: packing measured 2-7% faster per GEMM on the 2-core VM, with identical results."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows)


def onednn_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's GEMM runs here, on plain and on packed weights, and matches F.linear for `dtype`."""
    try:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 8, generator=g).to(dtype), torch.randn(5, 8, generator=g).to(dtype)
        b = torch.randn(5, generator=g).to(dtype)
        want = F.linear(x.float(), w.float(), b.float())
        return all(torch.allclose(onednn_linear(x, weight, b).float(), want, rtol=2e-2, atol=2e-2)
                   for weight in (w, onednn_pack(w, 3)))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Ops:
    """The kernels for one device: Triton on CUDA; elsewhere the PyTorch versions that compute the
    references' numbers with fewer passes over memory (the `*_cpu` beside each reference) and
    oneDNN's GEMM for the projections, on weights packed once at load.

    On CPU (`chunk_tokens` set) the block after attention runs a chunk of tokens at a time (see
    `Block._mlp_chunked`); on CUDA the whole batch goes through each kernel, the residual add fused
    into the Triton RMSNorm."""

    cpu_chunk_tokens = 2048

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, attention_kernel: bool = True):
        cuda = device.type == "cuda"
        self.onednn = device.type == "cpu" and onednn_works(dtype)
        self.linear = onednn_linear if self.onednn else F.linear
        self.chunk_tokens = None if cuda else self.cpu_chunk_tokens
        self.rmsnorm = rmsnorm_triton if cuda else rmsnorm_cpu
        self.rope = rope_triton if cuda else rope_cpu
        self.swiglu = swiglu_triton  # the whole-batch path is CUDA's; CPU chunks call silu_mul_
        self.reward_head = reward_head_triton if cuda else reward_head_torch
        self.gather_rope_once = not cuda  # the Triton kernel gathers the tables itself
        native = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and attention_kernel
        self.attention_kernel = load_kernel() if native else None  # None: torch SDPA
        rope_inplace = load_rope() if self.attention_kernel else None  # the same numbers as rope_cpu, one pass
        if rope_inplace is not None:
            self.rope = lambda q, k, cos, sin, positions: rope_inplace(q, k, cos, sin)
        rmsnorm_fused = load_rmsnorm() if self.attention_kernel else None  # rmsnorm_cpu's roundings, one call
        if rmsnorm_fused is not None:
            self.rmsnorm = rmsnorm_fused
        self.attention_name = "varlen_attn" if cuda else "C++ kernel" if self.attention_kernel else "SDPA"


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, q + 2 * kv, bias=cfg.qkv_bias)  # q, k, v projections fused
        self.wo = nn.Linear(q, cfg.hidden, bias=cfg.o_bias)
        self.w_gate_up = nn.Linear(cfg.hidden, 2 * cfg.intermediate, bias=cfg.mlp_bias)  # gate, up fused
        self.w_down = nn.Linear(cfg.intermediate, cfg.hidden, bias=cfg.mlp_bias)
        self.attn_norm = nn.Parameter(torch.ones(cfg.hidden))
        self.mlp_norm = nn.Parameter(torch.ones(cfg.hidden))
        if cfg.qk_norm:
            self.q_norm = nn.Parameter(torch.ones(cfg.head_dim))
            self.k_norm = nn.Parameter(torch.ones(cfg.head_dim))

    def prepare(self, ops: Ops) -> None:
        """Fix the (weight, bias) each projection runs with on `ops`' device. In CPU chunks gate and
        up are projected apart (see `_mlp_chunked`); with oneDNN the weights are packed and the
        modules' own copies released, so the model does not hold its weights twice."""
        layers = (self.wqkv, self.wo, self.w_gate_up, self.w_down)
        if ops.chunk_tokens is None:
            names = ("qkv", "o", "gate_up", "down")
            self.gemm = {name: (layer.weight, layer.bias) for name, layer in zip(names, layers)}
            return
        inter = self.cfg.intermediate
        w, b = self.w_gate_up.weight, self.w_gate_up.bias
        self.gemm = {
            "qkv": (self.wqkv.weight, self.wqkv.bias), "o": (self.wo.weight, self.wo.bias),
            "gate": (w[:inter], None if b is None else b[:inter]),  # row blocks of the fused weight
            "up": (w[inter:], None if b is None else b[inter:]),
            "down": (self.w_down.weight, self.w_down.bias),
        }
        if ops.onednn:
            self.gemm = {name: (onednn_pack(w, ops.chunk_tokens), b) for name, (w, b) in self.gemm.items()}
            for layer in layers:
                layer.weight.data = layer.weight.data.new_empty(0)

    def forward(self, x, residual, ops: Ops, rope, batch, pooled_only: bool = False):
        """-> (stream, residual) after this block, for every row, or with `pooled_only` (the last
        block) for the batch's pooled rows only: every row's keys and values are still computed, but
        attention's queries, the output projection and the MLP run on those B rows alone."""
        cfg = self.cfg
        if ops.chunk_tokens is None:
            h, residual = ops.rmsnorm(x, self.attn_norm, cfg.eps, residual)  # (T, H)
            qkv = ops.linear(h, *self.gemm["qkv"])  # (T, (Hq + 2 Hk) D)
        else:
            qkv, residual = self._qkv_chunked(x, residual, ops)
        q, k, v = qkv.split([cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim], -1)
        q = q.view(-1, cfg.heads, cfg.head_dim)  # (T, Hq, D)
        k = k.view(-1, cfg.kv_heads, cfg.head_dim)  # (T, Hk, D)
        v = v.view(-1, cfg.kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, _ = ops.rmsnorm(q, self.q_norm, cfg.eps)
            k, _ = ops.rmsnorm(k, self.k_norm, cfg.eps)
        q, k = ops.rope(q, k, *rope)
        if pooled_only:
            attn = pooled_causal_attention(q, k, v, batch, self.window, ops.attention_kernel)  # (B, Hq D)
            residual = residual[batch.last_idx]
        else:
            attn = packed_causal_attention(q, k, v, batch, self.window, ops.attention_kernel)  # (T, Hq D)
        if ops.chunk_tokens is not None:
            return self._mlp_chunked(attn, residual, ops), None
        h, residual = ops.rmsnorm(ops.linear(attn, *self.gemm["o"]), self.mlp_norm, cfg.eps, residual)
        act = ops.swiglu(ops.linear(h, *self.gemm["gate_up"]))
        return ops.linear(act, *self.gemm["down"]), residual

    def _qkv_chunked(self, x: torch.Tensor, residual: torch.Tensor | None, ops: Ops):
        """RMSNorm and the fused q, k, v projection a chunk of tokens at a time -> (qkv, stream).

        Why: the normalised chunk is still in the CPU's caches when the GEMM reads it, and oneDNN ran
        this projection's shape at 218 GFLOP/s on 2048 rows against 183 on 16k (the 2-core VM)."""
        stream = x if residual is None else x + residual

        def qkv_of(rows: torch.Tensor) -> torch.Tensor:
            return ops.linear(ops.rmsnorm(rows, self.attn_norm, self.cfg.eps)[0], *self.gemm["qkv"])

        if x.shape[0] <= ops.chunk_tokens:  # one chunk: the projection's own output, no copy
            return qkv_of(stream), stream
        qkv = torch.empty(x.shape[0], self.wqkv.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, x.shape[0], ops.chunk_tokens):
            rows = slice(start, start + ops.chunk_tokens)
            qkv[rows] = qkv_of(stream[rows])
        return qkv, stream

    def _mlp_chunked(self, attn: torch.Tensor, residual: torch.Tensor, ops: Ops) -> torch.Tensor:
        """Output projection, residual add, RMSNorm, SwiGLU MLP and second residual add, a chunk of
        tokens at a time; returns the residual stream after the block (T, H).

        Why by hand: every op here is per token, so a chunk's intermediates (the largest, gate and
        up for 2048 tokens, are 12 MB each in the 40M benchmark model) stay in the CPU's caches
        between the ops that produce and consume them, where whole-batch tensors (T up to 16k
        tokens: 200 MB) went through DRAM, which this VM streams at about 6 GB/s; the GEMMs
        themselves ran 10-25% slower with 16k rows than with 2k. GEMM rows do not depend on how
        many rows share the call, so chunk boundaries change no token's numbers (fp32 scores were
        bit-identical to the whole-batch path). Measured on the 2-core VM with the 40M model:
        chunking +10% tokens/s, packed weights another +3%. Two GEMMs then SiLU on the
        cache-resident gate beat oneDNN's SiLU epilogue by 4-8%, and an add epilogue was no faster
        than `add_` on a cached chunk, so the ops stay plain torch."""
        eps, gemm, linear = self.cfg.eps, self.gemm, ops.linear

        def block_of(attn_rows: torch.Tensor, residual_rows: torch.Tensor) -> torch.Tensor:
            h, stream = ops.rmsnorm(linear(attn_rows, *gemm["o"]), self.mlp_norm, eps, residual_rows)
            act = silu_mul_(linear(h, *gemm["gate"]), linear(h, *gemm["up"]))
            return linear(act, *gemm["down"]).add_(stream)

        if attn.shape[0] <= ops.chunk_tokens:  # one chunk: the last GEMM's own output, no copy
            return block_of(attn, residual)
        out = torch.empty_like(residual)
        for start in range(0, attn.shape[0], ops.chunk_tokens):
            rows = slice(start, start + ops.chunk_tokens)
            out[rows] = block_of(attn[rows], residual[rows])
        return out


@dataclass
class PackedBatch:
    """Segments back to back. A segment is a whole sequence, a shared prefix, or a response whose
    attention also covers its parent prefix segment (positions continue after the prefix)."""

    input_ids: torch.Tensor  # (T,) all tokens
    positions: torch.Tensor  # (T,) position within its own sequence (a response continues its prefix)
    cu_seqlens: list[int]  # (S + 1,) segment start offsets, on the host (the CPU attention loops over them)
    parents: list[int]  # (S,) index of the prefix segment a segment attends to, or -1
    last_idx: torch.Tensor  # (B,) packed index of each scored row's pooled token
    device: torch.device
    attention_plan: list | None = None  # built by the attention on first use, shared by every layer
    saved_tokens: int = 0  # tokens not computed because lone units' shared beginnings ran once

    @classmethod
    def build(cls, units: list[Unit], device, share_min: int | None = None) -> "PackedBatch":
        """With `share_min`, lone units whose first `share_min` or more tokens agree (see
        `share_across`) become one prefix segment and their responses; the rows still come out in
        the units' order."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        cu, parents = [0], []
        last: list[list[int]] = [[] for _ in units]  # per unit, its pooled rows' packed indices

        def segment(tokens: list[int], start_pos: int, parent: int) -> int:
            ids.extend(tokens)
            positions.append(torch.arange(start_pos, start_pos + len(tokens)))
            cu.append(cu[-1] + len(tokens))
            parents.append(parent)
            return len(parents) - 1

        runs = share_across(units, share_min) if share_min else []
        in_run = {i for _, members in runs for i in members}
        for shared, members in runs:
            parent = segment(units[members[0]].suffixes[0][:shared], 0, -1)
            for i in members:
                seg = segment(units[i].suffixes[0][shared:], shared, parent)
                last[i] = [cu[seg] + q - shared for q in units[i].pools[0]]
        for i, u in enumerate(units):
            if i in in_run:
                continue
            parent = segment(u.prefix, 0, -1) if u.prefix else -1
            for suffix, pools in zip(u.suffixes, u.pools):
                seg = segment(suffix, len(u.prefix), parent)
                last[i].extend(cu[seg] + q for q in pools)
        return cls(torch.tensor(ids, dtype=torch.long, device=device), torch.cat(positions).to(device), cu,
                   parents, torch.tensor([r for rows in last for r in rows], dtype=torch.long, device=device),
                   torch.device(device), saved_tokens=sum((len(m) - 1) * shared for shared, m in runs))


class PackedRewardModel(nn.Module):
    def __init__(self, cfg: DecoderConfig, rope_inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.blocks = nn.ModuleList(Block(cfg, w) for w in cfg.windows)
        self.norm = nn.Parameter(torch.ones(cfg.hidden))
        self.score = nn.Parameter(torch.zeros(cfg.num_labels, cfg.hidden))
        self.score_bias = nn.Parameter(torch.zeros(cfg.num_labels)) if cfg.score_bias else None
        cos, sin = rope_tables(rope_inv_freq.float(), cfg.max_positions, rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_positions, D) fp32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.ops: Ops | None = None  # set by to_device, which prepares the weights for the device

    def to_device(self, device: torch.device, dtype: torch.dtype, attention_kernel: bool = True) -> "PackedRewardModel":
        """Move and cast the weights and prepare them for `device`'s kernels. Once per model: the CPU
        path packs the projection weights and releases the originals."""
        assert self.ops is None, "to_device runs once per model (copy the model first for another device)"
        self.to(device)
        for name, p in self.named_parameters():
            p.data = p.data.to(dtype)
        self.ops = Ops(device, dtype, attention_kernel)
        for block in self.blocks:
            block.prepare(self.ops)
        return self

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        assert self.ops is not None, "call to_device before running the model"
        x = self.embed(batch.input_ids)  # (T, H)
        residual = None
        if self.ops.gather_rope_once:  # per-token tables, gathered once for all layers
            rope = (self.rope_cos[batch.positions], self.rope_sin[batch.positions], None)
        else:
            rope = (self.rope_cos, self.rope_sin, batch.positions)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):  # the last block computes the pooled rows only
            x, residual = block(x, residual, self.ops, rope, batch, pooled_only=i == last)
        # final norm + every head of each pooled row, fp32 accumulation: (B, K)
        rows = torch.arange(x.shape[0], device=x.device)
        return self.ops.reward_head(x, rows, self.norm, self.cfg.eps, self.score, self.score_bias, residual)


def _hf_tensors(model_dir: Path):
    """Yield (name, tensor) from every safetensors file of the checkpoint."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir} (the fast path reads safetensors only)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


def load_packed(model_dir: Path, hf_config, rotary_inv_freq: torch.Tensor, rope_scaling: float,
                rows: list[int] | None = None) -> PackedRewardModel:
    """Build the packed model from the checkpoint's own files (fp32 on CPU; move with `to_device`).
    The head is the checkpoint's score head, or with `rows` those rows of a causal LM's head (its
    verdict or label tokens): the fused reward head then computes those logits and no others."""
    raw = dict(_hf_tensors(model_dir))
    prefix = "model." if any(n.startswith("model.") for n in raw) else ""
    has = lambda name: prefix + "layers.0." + name in raw  # noqa: E731
    cfg = dataclasses.replace(DecoderConfig.from_hf(hf_config), qkv_bias=has("self_attn.q_proj.bias"),
                              o_bias=has("self_attn.o_proj.bias"), mlp_bias=has("mlp.down_proj.bias"),
                              score_bias=rows is None and "score.bias" in raw)
    if rows is not None:
        cfg = dataclasses.replace(cfg, num_labels=len(rows))
    model = PackedRewardModel(cfg, rotary_inv_freq, rope_scaling)

    def take(name: str) -> torch.Tensor:
        try:
            return raw.pop(prefix + name).float()
        except KeyError:
            raise KeyError(f"checkpoint has no tensor {prefix + name!r}") from None

    with torch.no_grad():
        model.embed.weight.copy_(take("embed_tokens.weight"))
        for i, b in enumerate(model.blocks):
            p = f"layers.{i}."
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                getattr(b.wqkv, kind).copy_(torch.cat([take(p + f"self_attn.{n}_proj.{kind}") for n in "qkv"]))
            for kind in ("weight", "bias") if cfg.o_bias else ("weight",):
                getattr(b.wo, kind).copy_(take(p + f"self_attn.o_proj.{kind}"))
            for kind in ("weight", "bias") if cfg.mlp_bias else ("weight",):
                getattr(b.w_gate_up, kind).copy_(torch.cat([take(p + f"mlp.{n}_proj.{kind}") for n in ("gate", "up")]))
                getattr(b.w_down, kind).copy_(take(p + f"mlp.down_proj.{kind}"))
            b.attn_norm.copy_(take(p + "input_layernorm.weight"))
            b.mlp_norm.copy_(take(p + "post_attention_layernorm.weight"))
            if cfg.qk_norm:
                b.q_norm.copy_(take(p + "self_attn.q_norm.weight"))
                b.k_norm.copy_(take(p + "self_attn.k_norm.weight"))
        model.norm.copy_(take("norm.weight"))
        if rows is None:
            model.score.copy_(raw.pop("score.weight").float())
            if cfg.score_bias:
                model.score_bias.copy_(raw.pop("score.bias").float())
        else:  # a tied head is the embedding table
            lm_head = raw.pop("lm_head.weight", None)
            model.score.copy_((model.embed.weight if lm_head is None else lm_head.float())[rows])
    raw.pop("lm_head.weight", None)  # a tied or leftover LM head plays no part in the reward
    if raw:
        raise ValueError(f"unexpected tensors for the fast path: {sorted(raw)[:5]}")
    return model.eval()

