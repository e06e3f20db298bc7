"""The stable public path of :mod:`aligner.reference.trust_region` for plugins: the trust-region operations."""

from aligner.reference.trust_region import (load_reference, mix_into_reference, reference_file,  # noqa: F401
                                            relative_distance, save_reference)
