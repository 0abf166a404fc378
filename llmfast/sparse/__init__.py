"""Activation sparsity: methods that make a model's MLPs compute fewer neurons per token (see docs/sparsify.md).

Importing the package registers every method in `SPARSIFIERS` (llmfast/sparse/base.py).
"""

from llmfast.sparse import cats, dejavu, relufy, teal  # noqa: F401  (registration)
