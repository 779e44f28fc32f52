"""IDRP: invertible flow + predictor of the discarded latent part (the paper's model)."""
