"""Host backends: store and move only sealed bytes; hold no keys."""
