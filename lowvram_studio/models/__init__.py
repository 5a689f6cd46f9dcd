"""Where pipelines come from: the built-in demo model, diffusers folders, single-file checkpoints."""
