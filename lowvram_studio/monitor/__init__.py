"""What a run cost: VRAM sampling, run records, reports."""
