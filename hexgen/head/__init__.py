"""The head: reads requests, validates and tokenizes them, submits work, watches health and placement."""
