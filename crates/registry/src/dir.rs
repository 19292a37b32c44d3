//! The directory registry.
