"""Entry points that build `samples/` and (later) launch training; importable for tests."""
