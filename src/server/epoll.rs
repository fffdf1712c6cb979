//! `epoll`: not written yet.

use crate::server::Server;

/// Runs the epoll model.
pub fn serve(_server: &Server) -> crate::Result<()> {
    Err(crate::Error::Unsupported(
        "the epoll model is not written yet".into(),
    ))
}
