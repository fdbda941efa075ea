//! Redirection rules (being written).
