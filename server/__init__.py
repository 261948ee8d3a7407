"""The model-serving container: sources, harvest, formats, engine, HTTP API."""
