//! Loading diffusers pipeline folders.
