"""Augmentation: DSA (differentiable siamese augmentation, the condensation methods, the farm recipes and
the standard evaluation protocol), SSD's FixMatch weak/strong augmentation, and the per-sample affine
RandomResizedCrop that EDC's synthesis and evaluation protocol use. Plain torch; every random draw
comes from a generator or seed passed in."""
from .affine import apply_affine, random_resized_crop_params
from .dsa import DSA, DSA_OPS, DSA_STRATEGY, NO_FLIP_DATASETS, DSAConfig, dsa_for_dataset, make_dsa
from .strong import StrongAugment

__all__ = ["DSA", "DSAConfig", "DSA_OPS", "DSA_STRATEGY", "NO_FLIP_DATASETS", "StrongAugment", "apply_affine",
           "dsa_for_dataset", "make_dsa", "random_resized_crop_params"]
