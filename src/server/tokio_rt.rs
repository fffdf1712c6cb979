//! `async`: not written yet.

use crate::server::Server;

/// Runs the async model.
pub fn serve(_server: &Server) -> crate::Result<()> {
    Err(crate::Error::Unsupported(
        "the async model is not written yet".into(),
    ))
}
