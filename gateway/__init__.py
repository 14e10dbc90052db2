"""A resilient, OpenAI-compatible LLM gateway with deadline propagation."""
