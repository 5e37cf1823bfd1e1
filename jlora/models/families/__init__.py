"""One module per Hugging Face architecture family: its config map and name map.

Each module holds a ``FAMILY`` (:class:`~jlora.models.families.common.Family`)
that :mod:`jlora.models.registry` registers; the model itself is the shared
:class:`jlora.models.Llama` with the family's config switches.
"""
