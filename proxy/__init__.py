"""The capgate HTTP proxy: OpenAI-compatible routes in front of vLLM."""

__version__ = "0.1.0"
