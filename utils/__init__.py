"""Small shared helpers: errors for bad input, atomic file writes, CLI wrapper, logging."""
