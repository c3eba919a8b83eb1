"""Loading and scoring a checkpoint below the server, as the model tests do."""

from __future__ import annotations

from rewardserve.config import ModelEntry
from rewardserve.models.hf_backend import BatchOutput
from rewardserve.models.loading import LoadedModel, load_model
from rewardserve.models.units import lone


def load(path, *, max_batch_tokens: int = 16384, attention_kernel: bool = True, **entry) -> LoadedModel:
    """`path` loaded as a model entry (`entry`: its other keys) with a batch budget."""
    return load_model(ModelEntry(name=entry.pop("name", "test"), path=str(path), **entry), max_batch_tokens,
                      attention_kernel)


def score_ids(loaded: LoadedModel, seqs: list[list[int]], backend: int = 0) -> BatchOutput:
    """Each sequence a unit of its own, pooled where HF pools it, through one replica."""
    return loaded.backends[backend].score(lone(seqs, loaded.pad_token_id))
