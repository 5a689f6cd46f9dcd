"""The studio: Gradio app and its background worker."""
