"""Model-side code for lowra-jax: checkpoint readers (``weights``)."""

from lowra_jax.models import weights  # noqa: F401
