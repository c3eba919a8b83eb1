"""HTTP: the FastAPI routes (scoring, ranking, operations), their request and response schemas, and
how errors leave the service. Routes are thin: they parse, pick the registry entry, and call a scorer."""
