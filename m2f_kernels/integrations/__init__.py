"""Integrations with other libraries; none of them is imported until used."""

from .transformers import is_patched, patch_transformers, unpatch_transformers

__all__ = ["is_patched", "patch_transformers", "unpatch_transformers"]
