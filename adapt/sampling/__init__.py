"""Samplers: token ids in, token ids out. Each takes a denoiser (see adapt.denoiser.Denoiser):
a callable (B, L) ids -> (B, L, V) log p_theta(x0_i | x_t), rows already aligned for the shift."""
