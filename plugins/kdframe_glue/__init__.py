"""kdframe bundled plugin (stub, filled in by its issue)."""
