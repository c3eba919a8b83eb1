"""`rewardserve bench throughput`: one mixed-length workload through three paths, in one process.

(a) HF AutoModelForSequenceClassification, padded batches in arrival order (what peers run);
(b) HF, length-sorted micro-batches under the token budget (our padded fallback);
(c) the packed fast path.
Runs alternate (a, b, c, a, b, c, ...) so drift in machine speed hits every path alike. It prints
tokens/s, each path's ratio to (a), and the fraction of the machine's limit: measured GEMM FLOP/s
for the dtype divided by the model's FLOPs per token (weights and causal attention of this workload).
For (c) it also prints the fraction counting only what the packed path executes: its last layer
runs attention, the output projection and the MLP for the pooled rows alone.
The limit is measured in every round, after the paths, and each round's rates are set against that
round's limit (median over rounds), so a machine whose speed drifts is compared with itself.
"""

from __future__ import annotations

import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForSequenceClassification, LlamaConfig, PreTrainedTokenizerFast

from rewardserve.config import ModelEntry
from rewardserve.models.hf_backend import HFBackend
from rewardserve.models.loading import load_model, resolve_dtype
from rewardserve.models.units import lone
from rewardserve.models.packed import onednn_linear, onednn_pack, onednn_works

# Realistic reward-model shapes: a ~40M Llama on CPU, a Qwen2.5-0.5B-class one on GPU.
SHAPES = {
    "cpu": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=32000),
    "gpu": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936),
}


def build_checkpoint(shape: str, max_len: int, path: Path) -> Path:
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(2048, max_len), num_labels=1, pad_token_id=0,
                      tie_word_embeddings=False, architectures=["LlamaForSequenceClassification"])
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(path)
    word_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def _word(i: int) -> str:
    """Token id `i` as a word: base 36, so a text costs at most 5 characters a token (vLLM refuses texts of
    more than 6 characters per token of its context before tokenising them)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    word = ""
    while True:
        i, d = divmod(i, 36)
        word = digits[d] + word
        if i == 0:
            return word


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """One word per token id (see `as_text`), so texts sent to a server tokenise to exactly the workload's
    ids whichever server's tokenizer reads them; no special tokens are added."""
    vocab = {"<pad>": 0, "<unk>": 1} | {_word(i): i for i in range(2, vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def as_text(ids: list[int]) -> str:
    """The text that the benchmark checkpoint's tokenizer reads back as `ids` (ids >= 2)."""
    return " ".join(map(_word, ids))


def workload(n_items: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n_items)]


def batches_by_tokens(seqs: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Arrival order, a batch closing before it would pass `budget` tokens: how the batcher feeds
    the packed path."""
    out, cur, n = [], [], 0
    for x in seqs:
        if cur and n + len(x) > budget:
            out.append(cur)
            cur, n = [], 0
        cur.append(x)
        n += len(x)
    return out + ([cur] if cur else [])


def model_flops_per_token(cfg, seqs: list[list[int]]) -> float:
    """2 x (non-embedding weights) per token, plus causal attention (QK^T and AV) of this workload."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    weights = layers * (h * (q + 2 * kv) + q * h + 3 * h * i)
    tokens = sum(len(s) for s in seqs)
    attn = layers * sum(2 * 2 * (len(s) * (len(s) + 1) / 2) * q for s in seqs) / tokens
    return 2 * weights + attn


def executed_flops_per_token(cfg, seqs: list[list[int]]) -> float:
    """What the packed path computes per token: every layer but the last in full, and of the last only
    the fused q, k, v projection (its attention, output projection and MLP run for the pooled rows
    alone, one per sequence here: counted, though they are noise)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    d = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    tokens = sum(len(s) for s in seqs)
    full = model_flops_per_token(cfg, seqs) / layers  # one layer, attention included
    pooled = len(seqs) * (2 * (q * h + 3 * h * i) + 2 * 2 * q * sum(len(s) for s in seqs) / len(seqs)) / tokens
    return (layers - 1) * full + 2 * h * (q + 2 * kv) + pooled


def gemm_flops(dtype: torch.dtype, device: torch.device, n: int, k: int, m: int, seconds: float = 2.0) -> float:
    """Best observed FLOP/s of an (n x k) @ (k x m) product: the machine's practical limit. On CPU
    both GEMM libraries torch carries are timed (MKL through `@`; oneDNN as the fast path runs it,
    on a packed weight, and on a plain one) and the fastest counts, so the limit is never one
    library's weakness."""
    a = torch.randn(n, k, device=device).to(dtype)
    b = torch.randn(k, m, device=device).to(dtype)
    products = [lambda: a @ b]
    if device.type == "cpu" and onednn_works(dtype):
        w = b.t().contiguous()
        packed = onednn_pack(w, n)
        products += [lambda: onednn_linear(a, w), lambda: onednn_linear(a, packed)]
    best = 0.0
    for product in products:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            _sync(device)
            t = time.perf_counter()
            product()
            _sync(device)
            best = max(best, 2 * n * k * m / (time.perf_counter() - t))
    return best


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ArrivalOrderHF:
    """What peers do: consecutive requests padded together, no sorting."""

    def __init__(self, model, device, batch_items: int, pad_id: int):
        self.model, self.device, self.batch_items, self.pad_id = model, device, batch_items, pad_id

    @torch.inference_mode()
    def score(self, seqs: list[list[int]]) -> None:
        for i in range(0, len(seqs), self.batch_items):
            chunk = seqs[i : i + self.batch_items]
            longest = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), longest), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits.float().cpu()


def run(device_name: str, dtype_name: str, n_items: int, lo: int, hi: int, repeats: int, batch_tokens: int,
        batch_items: int) -> dict:
    device = torch.device(device_name)
    shape = "gpu" if device.type == "cuda" else "cpu"
    dtype = resolve_dtype(dtype_name, device)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(shape, hi, Path(tmp))
        base = dict(name="bench", path=str(path), dtype=str(dtype).removeprefix("torch."), devices=device_name)
        fast = load_model(ModelEntry(**base, backend="packed"), batch_tokens).backends[0]
        hf = load_model(ModelEntry(**base, backend="hf"), batch_tokens).backends[0]
    assert isinstance(hf, HFBackend)
    cfg = hf.model.config
    seqs = workload(n_items, lo, hi, cfg.vocab_size)
    tokens = sum(len(s) for s in seqs)
    paths = {"a_hf_arrival_order": ArrivalOrderHF(hf.model, device, batch_items, 0), "b_hf_length_sorted": hf,
             "c_packed": fast}

    batches = [lone(b, hf.pad_token_id) for b in batches_by_tokens(seqs, batch_tokens)]

    def once(name: str) -> float:
        _sync(device)
        t = time.perf_counter()
        if name.startswith("a_"):
            paths[name].score(seqs)
        else:
            for b in batches:
                paths[name].score(b)
        _sync(device)
        return tokens / (time.perf_counter() - t)

    flops_tok = model_flops_per_token(cfg, seqs)  # what HF computes: the fractions of the limit count this
    executed_tok = executed_flops_per_token(cfg, seqs)

    def measure_limit() -> float:
        return gemm_flops(dtype, device, min(4096, batch_tokens), cfg.hidden_size, cfg.intermediate_size, 1.0)

    for name in paths:  # warm-up (allocator, kernel selection, compilation)
        once(name)
    measure_limit()
    # the limit is measured in every round too, right after the paths: a VM's speed drifts over minutes,
    # and a limit measured once, at another time, would move every path's fraction with the drift
    rates: dict[str, list[float]] = {n: [] for n in paths}
    limits: list[float] = []
    for _ in range(repeats):
        for name in paths:
            rates[name].append(once(name))
        limits.append(measure_limit())
    limit = statistics.median(limits)
    base_rate = statistics.median(rates["a_hf_arrival_order"])
    rows = {}
    for name, rs in rates.items():
        rate = statistics.median(rs)
        fraction = statistics.median(r * flops_tok / lim for r, lim in zip(rs, limits))
        rows[name] = {"tokens_per_s": round(rate, 1), "ratio_vs_a": round(rate / base_rate, 3),
                      "fraction_of_limit": round(fraction, 3)}
        executed = ""
        if name == "c_packed":  # the same rate, counting only the work the packed path does
            done = statistics.median(r * executed_tok / lim for r, lim in zip(rs, limits))
            rows[name]["executed_fraction_of_limit"] = round(done, 3)
            executed = f" ({100 * done:5.1f}% counting only the work it does)"
        print(f"{name:20s} {rate:10.1f} tok/s  x{rate / base_rate:5.2f} vs (a)  "
              f"{100 * fraction:5.1f}% of limit{executed}", flush=True)
    return {
        "bench": "throughput", "device": device_label(device),
        "dtype": str(dtype).removeprefix("torch."), "shape": SHAPES[shape], "items": n_items, "tokens": tokens,
        "lengths": [lo, hi], "repeats": repeats, "batch_tokens": batch_tokens, "arrival_batch_items": batch_items,
        "gemm_flops": round(limit), "gemm_flops_per_round": [round(x) for x in limits],
        "model_flops_per_token": round(flops_tok), "executed_flops_per_token": round(executed_tok), "paths": rows,
    }
