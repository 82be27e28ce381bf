"""The `llmtune` command line: parses, calls the public API, renders. No library logic lives here."""
