"""Loading a reward model checkpoint (local path or hub id) onto the devices it will serve from.

The embedded default model is loaded through exactly this code, like any other checkpoint.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import cached_file

from rewardserve.config import ModelEntry
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
    backend: str  # "packed" (the fast path) or "hf" (padded AutoModelForSequenceClassification)
    backends: list = field(default_factory=list)  # one HFBackend or PackedBackend per device

    @property
    def devices(self) -> list[str]:
        return [str(b.device) for b in self.backends]

    @property
    def attention(self) -> str:
        """The packed path's attention (varlen_attn, C++ kernel or SDPA); "" on the HF path."""
        return self.backends[0].model.ops.attention_name if self.backend == "packed" else ""


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


def load_model(entry: ModelEntry, max_batch_tokens: int, attention_kernel: bool = True) -> LoadedModel:
    """Load `entry`'s checkpoint onto its devices. `max_batch_tokens` is its batch budget (it caps
    max_length: the longest item must fit in one batch); `attention_kernel`: the CPU attention kernel."""
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
    if archs and not any(a.endswith(("ForSequenceClassification", "ForRewardModel")) for a in archs):
        raise ValueError(
            f"{source} is not a reward model checkpoint (architectures={archs}): loading it for sequence "
            "classification would attach a randomly initialised score head"
        )
    labels = [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
    unknown = sorted(set(entry.heads or ()) - set(labels))
    if unknown:
        raise ValueError(f"heads: {unknown} are not heads of {source}; its heads are {labels}")
    devices = resolve_devices(entry.devices)
    dtype = resolve_dtype(entry.dtype, devices[0])
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
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
    backends: list = []
    if kind == "packed":
        inv_freq, scaling = rotary_parameters(config)
        base = load_packed(model_dir, config, inv_freq, scaling)
        vocab = base.cfg.vocab_size
        for i, device in enumerate(devices):
            replica = base if i == len(devices) - 1 else copy.deepcopy(base)
            replica.to_device(device, dtype, attention_kernel)
            backends.append(PackedBackend(replica, device))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype, **common).eval()
        vocab = model.get_input_embeddings().num_embeddings
        for i, device in enumerate(devices):
            replica = model if i == len(devices) - 1 else copy.deepcopy(model)
            backends.append(HFBackend(replica.to(device), device, max_batch_tokens))
    encoder = ItemEncoder(tokenizer, max_length=max_length, vocab_size=vocab)
    loaded = LoadedModel(
        name=entry.name, source=source, model_dir=model_dir, architecture=(archs or ["unknown"])[0],
        num_labels=config.num_labels, labels=labels, max_length=max_length, dtype=dtype, encoder=encoder,
        pad_token_id=pad_id, backend=kind, backends=backends,
    )
    attention = f", attention: {loaded.attention}" if loaded.attention else ""
    log.info("loaded %s as %r (%s, %s) on %s with the %s backend (%s%s), max_length=%d", source, entry.name, archs,
             dtype, devices, kind, why, attention, max_length)
    return loaded
