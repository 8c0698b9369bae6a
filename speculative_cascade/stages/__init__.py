"""The stages of a cascade: what drafts and what reviews (``base``), and the kinds there are:
a neural model with its KV cache (``neural``), the tiny projection model (``tiny``), MaG (``mag``)."""
