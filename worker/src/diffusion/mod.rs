//! Noise schedules, samplers and guidance (diffusers-compatible).
