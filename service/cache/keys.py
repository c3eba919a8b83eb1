"""Cache keys: what an item's score depends on, hashed.

A key hashes (1) the model fingerprint, a digest of the weights files and config computed once at
load; (2) the scoring configuration: dtype, backend, attention implementation, heads (and, later,
transforms); (3) the exact token ids. Change any of them and the key changes, so the cache can never
serve another model's or another configuration's answer.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from array import array
from pathlib import Path

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_CONFIG_FILES = ("config.json",)
_SHA256_NAME = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 << 20


def _file_digest(path: Path) -> str:
    target = path.resolve()
    # Hub cache blobs are named by their sha256: no need to read gigabytes to know their content.
    if path.is_symlink() and _SHA256_NAME.match(target.name):
        return "sha256:" + target.name
    h = hashlib.blake2b(digest_size=32)
    with open(target, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "blake2b:" + h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Digest of a checkpoint directory's config and weights files (names and contents)."""
    files = sorted(p for p in model_dir.iterdir()
                   if p.is_file() and (p.name in _CONFIG_FILES or p.name.endswith(_WEIGHT_SUFFIXES)))
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files):
        raise FileNotFoundError(f"no weights files in {model_dir}")
    h = hashlib.blake2b(digest_size=16)
    for p in files:
        h.update(f"{p.name}={_file_digest(p)}\n".encode())
    return h.hexdigest()


class KeyMaker:
    """Turns token ids into cache keys within one scoring configuration."""

    def __init__(self, fingerprint: str, scoring_config: str, prefix: str = "rs:"):
        self.namespace = hashlib.blake2b(f"{fingerprint}|{scoring_config}".encode(), digest_size=16).digest()
        self.prefix = prefix.encode()

    def key(self, ids: list[int]) -> bytes:
        return self.key_bytes(array("q", ids).tobytes())

    def key_bytes(self, data: bytes) -> bytes:
        """The key of any input (a verifier's response and reference)."""
        h = hashlib.blake2b(self.namespace, digest_size=16)
        h.update(data)
        return self.prefix + h.hexdigest().encode()


# Values: a version byte, then every head's score as float64 (the fp32 result widens exactly).
_VERSION = 1


def encode_scores(scores: list[float]) -> bytes:
    return bytes([_VERSION]) + struct.pack(f"<{len(scores)}d", *scores)


def decode_scores(raw: bytes | None, num_labels: int) -> list[float] | None:
    """The scores, or None for anything that is not exactly a value we wrote (garbage reads as a miss)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != 1 + 8 * num_labels or raw[0] != _VERSION:
        return None
    scores = list(struct.unpack(f"<{num_labels}d", raw[1:]))
    return scores if all(math.isfinite(s) for s in scores) else None
