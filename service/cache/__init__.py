"""The score cache: an in-process LRU and a fail-open Redis tier shared by the process, a keyed view
per model, and the keys (model fingerprint + scoring configuration + exact token ids)."""
