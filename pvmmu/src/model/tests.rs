//! Unit tests of the model (filled in below).
