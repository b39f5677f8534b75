"""Test support: local stand-ins for the real LLM providers, so tests and benchmarks run offline."""
