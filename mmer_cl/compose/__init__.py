"""Expansion: one composed model serving every registered modality, mixed inputs routed per token.

``Store.compose()`` gathers the sources; :func:`build_composed` assembles a
:class:`ComposedModel`; :mod:`mmer_cl.compose.adapters` says how each model family
turns its modality input into token embeddings.
"""

from mmer_cl.compose.model import (DEFAULT_CACHE_BYTES, DEFAULT_TEXT_ONLY, DEFAULT_TEXT_PARAMS, ComposedModel,
                                   EntrySource, build_composed)
from mmer_cl.compose.routing import CompositionError

__all__ = ["ComposedModel", "CompositionError", "DEFAULT_CACHE_BYTES", "DEFAULT_TEXT_ONLY", "DEFAULT_TEXT_PARAMS",
           "EntrySource", "build_composed"]
