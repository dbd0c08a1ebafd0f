"""Helpers the tests share (importable as `support.*`: pyproject.toml puts tests/ on the path)."""
