"""jaxprune: functional pruning transforms for LLaMA-family models in JAX."""

from jaxprune.eval import perplexity, perplexity_of_text

__all__ = ["perplexity", "perplexity_of_text"]
