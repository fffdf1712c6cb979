//! TLS with rustls (the ring provider): the client side (`client`: the configuration that
//! `client`, `bench` and `compare` build from their flags).

pub mod client;
