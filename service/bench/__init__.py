"""`rewardserve bench ...`: measurements, each printed as a table and one final JSON line."""
