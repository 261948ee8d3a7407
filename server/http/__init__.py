"""The HTTP layer: FastAPI app, OpenAI schemas, errors, probes, metrics, serve."""
