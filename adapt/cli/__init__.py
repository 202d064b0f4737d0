"""What the commands share: one clear error and exit 2 for user errors, argument types that refuse bad input."""
