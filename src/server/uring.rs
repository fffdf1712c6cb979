//! `uring`: not written yet.

use crate::server::Server;

/// Runs the uring model.
pub fn serve(_server: &Server) -> crate::Result<()> {
    Err(crate::Error::Unsupported(
        "the uring model is not written yet".into(),
    ))
}
