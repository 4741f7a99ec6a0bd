"""HexGen: serve Llama-family models over pipelines of stages with asymmetric tensor parallelism."""

__version__ = "0.1.0"
