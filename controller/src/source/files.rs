//! The YAML directory source. (Being written.)
