//! TLS: rustls configurations and the sans-I/O echo session the event-driven models drive.

pub mod session;
