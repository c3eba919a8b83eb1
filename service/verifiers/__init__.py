"""Verifiable rewards: rule-based checkers (checks.py) and the process pool they run in (pool.py).

Nothing is imported here: the pool's worker processes import `pool`, the server imports `checks`
for its cheap metadata, and neither should pay for the other (math-verify pulls in SymPy).
"""
