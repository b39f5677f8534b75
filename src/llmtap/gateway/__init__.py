"""`llmtap gateway`: the proxy between clients and LLM providers, logging every request off its path."""
