"""Text embedders a text codec was trained for (see ``embedder``)."""
