//! `process`: not written yet.

use crate::server::Server;

/// Runs the process model.
pub fn serve(_server: &Server) -> crate::Result<()> {
    Err(crate::Error::Unsupported(
        "the process model is not written yet".into(),
    ))
}
