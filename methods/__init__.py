"""Training methods (MTSL, TAG, DMTG, sharpness-aware MTL, gradient methods, baselines)."""
