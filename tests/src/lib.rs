//! Real-kernel integration tests live in `tests/tests/`; see ARCHITECTURE.md.
