"""Train the built-in demo model on procedural video (see train.py) and measure how it moves."""
