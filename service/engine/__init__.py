"""Queues and batches: the registry of scorers, the per-model scheduler (cache look-up, single-flight,
grouping, dispatch), the token-budget batcher, and the device workers the models share."""
