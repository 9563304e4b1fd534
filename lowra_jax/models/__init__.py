"""Model-side code: checkpoint readers (``weights``), the Flax LLaMA (``llama``), tokenizers
(``tokenizer``: HF directories and llama2.c ``tok*.bin`` behind one interface)."""

from lowra_jax.models import llama, tokenizer, weights  # noqa: F401
