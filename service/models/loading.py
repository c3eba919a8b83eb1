"""Loading a checkpoint (local path or hub id) onto the devices it will serve from.

A reward model is read through its classification head. A causal LM (a judge, or a process reward
model that answers with label tokens) is read through a few rows of its LM head, named by token
text (`tokens`): each must be one token of its tokenizer, checked here, and only those rows are
ever computed. The embedded default models load through exactly this code, like any other checkpoint.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification,
    AutoTokenizer,
)
from transformers.utils import cached_file

from rewardserve.config import CheckpointEntry
from rewardserve.models.hf_backend import HFBackend
from rewardserve.models.packed import DecoderConfig, load_packed
from rewardserve.models.packed_backend import PackedBackend, rotary_parameters
from rewardserve.models.tokenize import ItemEncoder

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_devices(spec: str) -> list[torch.device]:
    """'auto' = every visible GPU, else the CPU; otherwise a comma-separated list."""
    if spec == "auto":
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return [torch.device("cpu")]
    devices = [torch.device(s.strip()) for s in spec.split(",") if s.strip()]
    if not devices:
        raise ValueError(f"no device in devices={spec!r}")
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {d} requested but CUDA is not available")
    return devices


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec != "auto":
        return _DTYPES[spec]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _model_max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class LoadedModel:
    name: str
    source: str
    model_dir: Path  # where the checkpoint's files are (the hub cache snapshot for a hub id)
    architecture: str
    num_labels: int
    labels: list[str]
    max_length: int
    dtype: torch.dtype
    encoder: ItemEncoder
    pad_token_id: int | None
    backend: str  # "packed" (the fast path) or "hf" (padded HF model)
    backends: list = field(default_factory=list)  # one HFBackend or PackedBackend per device
    token_ids: dict[str, int] = field(default_factory=dict)  # a causal LM's rows by label: {"yes": 9, ...}

    @property
    def devices(self) -> list[str]:
        return [str(b.device) for b in self.backends]

    @property
    def attention(self) -> str:
        """The packed path's attention (varlen_attn, C++ kernel or SDPA); "" on the HF path."""
        return self.backends[0].attention


def _model_dir(source: str, common: dict, want_safetensors: bool) -> Path:
    """The local directory holding the checkpoint (downloading a hub snapshot when it is a hub id)."""
    if Path(source).is_dir():
        return Path(source)
    if want_safetensors:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=common.get("revision"),
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))
    return Path(cached_file(source, "config.json", **common)).parent


def choose_backend(requested: str, config, model_dir: Path | None) -> tuple[str, str]:
    """('packed' | 'hf', reason)."""
    if requested == "hf":
        return "hf", "requested"
    reason = DecoderConfig.unsupported_reason(config)
    if reason is None and model_dir is not None and not any(model_dir.glob("*.safetensors")):
        reason = "no safetensors weights"
    if reason is None:
        return "packed", "Llama-family checkpoint"
    if requested == "packed":
        raise ValueError(f"--backend packed cannot serve this checkpoint: {reason}")
    return "hf", reason


_REWARD_ARCHS = ("ForSequenceClassification", "ForRewardModel")
_PROCESS_ARCHS = _REWARD_ARCHS + ("ForTokenClassification",)
_CAUSAL_ARCHS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def single_token(tokenizer, text: str, key: str, source: str) -> int:
    """The id of the one token `text` is; ValueError naming the entry's key otherwise."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 1:
        return ids[0]
    vocab_id = tokenizer.get_vocab().get(text)  # a token given as the vocabulary spells it ("Ġyes")
    if vocab_id is not None:
        return vocab_id
    pieces = tokenizer.convert_ids_to_tokens(ids)
    raise ValueError(f"{key}: {text!r} is {len(ids)} tokens of {source}'s tokenizer ({pieces}), not one; name a "
                     "single token")


@dataclass
class Plan:
    """What building a replica of a checkpoint needs, decided once: picklable, so an engine process
    (engine/process.py) builds exactly what this process would."""

    name: str
    source: str
    common: dict  # trust_remote_code, revision
    config: Any  # the checkpoint's HF config
    model_dir: Path
    kind: str  # "packed" | "hf"
    auto: str  # the HF Auto class of the hf path
    rows: list[int] | None  # a causal LM's LM-head rows; None: its score head
    dtype: torch.dtype
    max_batch_tokens: int
    check_positions: bool  # reading several positions: the hf path must take a linear head


def build_replicas(plan: Plan, devices: list[torch.device], attention_kernel: bool) -> list:
    """One backend per device (the weights read once, copied for the other devices)."""
    backends: list = []
    if plan.kind == "packed":
        inv_freq, scaling = rotary_parameters(plan.config)
        base = load_packed(plan.model_dir, plan.config, inv_freq, scaling, plan.rows)
        for i, device in enumerate(devices):
            replica = base if i == len(devices) - 1 else copy.deepcopy(base)
            replica.to_device(device, plan.dtype, attention_kernel)
            backends.append(PackedBackend(replica, device))
        return backends
    auto = {"causal": AutoModelForCausalLM, "token": AutoModelForTokenClassification,
            "sequence": AutoModelForSequenceClassification}[plan.auto]
    model = auto.from_pretrained(plan.source, dtype=plan.dtype, **plan.common).eval()
    for i, device in enumerate(devices):
        replica = model if i == len(devices) - 1 else copy.deepcopy(model)
        backends.append(HFBackend(replica.to(device), device, plan.max_batch_tokens, plan.rows))
    if plan.check_positions and not backends[0].last_token_head:
        raise ValueError(f"{plan.source}: reading several positions needs a decoder with a linear head; "
                         f"{plan.config.architectures} pools by itself")
    return backends


def load_model(entry: CheckpointEntry, max_batch_tokens: int, attention_kernel: bool = True,
               tokens: dict[str, str] | None = None, process: bool = False, engines=None) -> LoadedModel:
    """Load `entry`'s checkpoint onto its devices. `max_batch_tokens` is its batch budget (it caps
    max_length: the longest item must fit in one batch); `attention_kernel`: the CPU attention kernel.
    With `tokens` ({config key: token text}), a causal LM read through those rows of its LM head;
    `process`: a process reward model's classification head (token classification heads too).
    `engines(device)`, when given, is the engine process a device's replica lives in (this process then
    keeps only the tokenizer); else the replicas live here."""
    source = entry.path
    common: dict = {"trust_remote_code": entry.trust_remote_code}
    if entry.revision and not Path(source).exists():
        common["revision"] = entry.revision
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except OSError as exc:  # HF's message names neither the model nor whether it looked locally
        where = "local directory" if Path(source).exists() else "hub id (no such local path)"
        raise OSError(f"cannot load model {source!r} as a {where}: {exc}") from exc
    archs = list(getattr(config, "architectures", None) or [])
    wanted = _CAUSAL_ARCHS if tokens else _PROCESS_ARCHS if process else _REWARD_ARCHS
    if archs and not any(a.endswith(wanted) for a in archs):
        what = "a causal LM (*ForCausalLM)" if tokens else "a reward model"
        raise ValueError(
            f"{source} is not {what} checkpoint (architectures={archs}): "
            + ("its verdict is read from the LM head" if tokens else "loading it for sequence classification would "
               "attach a randomly initialised score head")
        )
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    token_ids: dict[str, int] = {}
    if tokens:
        token_ids = {key: single_token(tokenizer, text, key, source) for key, text in tokens.items()}
        labels = [key.rsplit(".", 1)[-1] for key in tokens]
        rows: list[int] | None = list(token_ids.values())
    else:
        labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
        rows = None
    unknown = sorted(set(getattr(entry, "heads", None) or ()) - set(labels))
    if unknown:
        raise ValueError(f"heads: {unknown} are not heads of {source}; its heads are {labels}")
    devices = resolve_devices(entry.devices)
    dtype = resolve_dtype(entry.dtype, devices[0])
    kind, why = choose_backend(entry.backend, config, Path(source) if Path(source).is_dir() else None)
    model_dir = _model_dir(source, common, want_safetensors=kind == "packed")
    if kind == "packed":
        kind, why = choose_backend(entry.backend, config, model_dir)

    limits = [max_batch_tokens]
    for value in (entry.max_length, _model_max_positions(config)):
        if value:
            limits.append(value)
    max_length = min(limits)
    pad_id = config.get_text_config().pad_token_id
    token_heads = process and any(a.endswith("ForTokenClassification") for a in archs)
    plan = Plan(name=entry.name, source=source, common=common, config=config, model_dir=model_dir, kind=kind,
                auto="causal" if tokens else "token" if token_heads else "sequence", rows=rows, dtype=dtype,
                max_batch_tokens=max_batch_tokens, check_positions=bool(tokens or process))
    if engines is None:
        backends = build_replicas(plan, devices, attention_kernel)
    else:
        backends = [engines(device).load(plan) for device in devices]
    vocab = backends[0].vocab_size
    encoder = ItemEncoder(tokenizer, max_length=max_length, vocab_size=vocab)
    loaded = LoadedModel(
        name=entry.name, source=source, model_dir=model_dir, architecture=(archs or ["unknown"])[0],
        num_labels=len(labels), labels=labels, max_length=max_length, dtype=dtype, encoder=encoder,
        pad_token_id=pad_id, backend=kind, backends=backends, token_ids=token_ids,
    )
    attention = f", attention: {loaded.attention}" if loaded.attention else ""
    where = "" if engines is None else " (in engine processes)"
    log.info("loaded %s as %r (%s, %s) on %s%s with the %s backend (%s%s), max_length=%d", source, entry.name, archs,
             dtype, devices, where, kind, why, attention, max_length)
    return loaded
