"""The one source of llmtune's version (read by pyproject.toml and `llmtune --version`)."""

__version__ = "0.1.0"
