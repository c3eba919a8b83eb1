"""rewardserve: fast, exact reward-model scoring over HTTP."""

__version__ = "0.1.0"
