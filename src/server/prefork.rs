//! `prefork`: not written yet.

use crate::server::Server;

/// Runs the prefork model.
pub fn serve(_server: &Server) -> crate::Result<()> {
    Err(crate::Error::Unsupported(
        "the prefork model is not written yet".into(),
    ))
}
