"""KV tiers below the primary pool: books for a host-memory tier, and the swap-or-recompute rule."""
