"""Game-theoretic layer pruning of causal language models (engine; never imports streamlit)."""

__version__ = "0.1.0"
