"""The node's signed HTTP API (FastAPI on uvicorn)."""
