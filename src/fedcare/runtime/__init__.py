"""Where the pieces run: `local` (every site in one process)."""
