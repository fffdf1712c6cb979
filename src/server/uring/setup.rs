//! Setup: the probe that `server::run` calls before binding (io_uring's features and a valid
//! [`BUFFERS_ENV`]), each worker's buffer count, and the rings (TCP and UDP), made before any
//! worker serves.

use std::io;

use io_uring::{opcode, IoUring, Probe};

use super::buffers::BufferPool;
use super::{BUFFERS_ENV, BUFFER_SIZE, POOL_BYTES, RING_ENTRIES};

/// Each worker's buffer count: its share of [`POOL_BYTES`], a power of two in 32..=256.
pub fn buffers_per_worker(workers: usize) -> u16 {
    let share = (POOL_BYTES / BUFFER_SIZE / workers).max(1);
    let power = 1usize << (usize::BITS - 1 - share.leading_zeros());
    power.clamp(32, 256) as u16
}

/// The number of buffers per worker: [`BUFFERS_ENV`] if set (a power of two from 1 to 32768,
/// else an error naming the value), or the worker's share of [`POOL_BYTES`].
pub fn buffer_count(workers: usize) -> crate::Result<u16> {
    count_from_env(BUFFERS_ENV, buffers_per_worker(workers))
}

/// The buffer count the environment variable `name` sets (a power of two from 1 to 32768,
/// else an error naming the value), or `default` without it.
pub fn count_from_env(name: &str, default: u16) -> crate::Result<u16> {
    let invalid = |text: &str| {
        crate::Error::io(
            format!("invalid {name}={text}"),
            io::Error::other("expected a power of two from 1 to 32768"),
        )
    };
    match std::env::var(name) {
        Ok(text) => parse_buffer_count(&text).ok_or_else(|| invalid(&text)),
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(std::env::VarError::NotUnicode(text)) => Err(invalid(&text.to_string_lossy())),
    }
}

fn parse_buffer_count(text: &str) -> Option<u16> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|n| n.is_power_of_two() && *n <= 32768)
}

/// Checks that io_uring and the features this model needs are available (an
/// [`crate::Error::Unsupported`] saying why if not), and that [`BUFFERS_ENV`] and
/// [`super::UDP_BUFFERS_ENV`] are valid.
/// `serve` calls it first; `server::run` calls it before binding, so either error comes
/// before any "listening on" line.
pub fn probe() -> crate::Result<()> {
    let ring = IoUring::new(8).map_err(unavailable)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(unavailable)?;
    let needed = [
        (opcode::Accept::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::PollAdd::CODE, "poll"),
        (opcode::Timeout::CODE, "timeout"),
        (opcode::AsyncCancel::CODE, "cancel"),
        // For udp:// (the UDP rings).
        (opcode::RecvMsg::CODE, "recvmsg"),
        (opcode::SendMsg::CODE, "sendmsg"),
        // The probe has no bit for multishot accept or recv; IORING_OP_SEND_ZC came in the
        // release that completed them (6.0), so it stands for them.
        (
            opcode::SendZc::CODE,
            "multishot accept and recv (Linux 6.0)",
        ),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(crate::Error::Unsupported(format!(
                "io_uring is not available on this system: the kernel lacks the {name} operation"
            )));
        }
    }
    let mut pool =
        BufferPool::new(1).map_err(|e| crate::Error::io("cannot allocate buffers", e))?;
    pool.register(&ring).map_err(|e| {
        crate::Error::Unsupported(format!(
            "io_uring is not available on this system: no provided buffer rings ({e})"
        ))
    })?;
    drop(ring);
    buffer_count(1)?;
    super::udp::buffer_count()?;
    Ok(())
}

/// The error for a ring that cannot be created.
fn unavailable(e: io::Error) -> crate::Error {
    let reason = match e.raw_os_error() {
        Some(libc::ENOSYS) => "the kernel has no io_uring (io_uring_setup: ENOSYS)".to_string(),
        Some(code @ (libc::EPERM | libc::EACCES)) => format!(
            "io_uring_setup was refused ({}; blocked by seccomp or sysctl kernel.io_uring_disabled)",
            if code == libc::EPERM { "EPERM" } else { "EACCES" }
        ),
        _ => return crate::Error::io("cannot create an io_uring instance", e),
    };
    crate::Error::Unsupported(format!(
        "io_uring is not available on this system: {reason}"
    ))
}

/// What the workers share: the connection count against `--max-conns`, and each worker's
/// A worker's ring and buffer pool, made before the worker thread starts.
pub struct Ring {
    // Declared before `pool`: dropped first, so the kernel stops using the buffers before
    // they are freed.
    pub ring: IoUring,
    pub pool: BufferPool,
    /// Created disabled (single issuer): the worker thread enables it.
    pub disabled: bool,
}

impl Ring {
    /// Single issuer with deferred task running where the kernel has them (6.1+), created
    /// disabled so that the worker thread, not this one, becomes its issuer; a plain ring
    /// otherwise.
    pub fn new(buffers: u16) -> crate::Result<Ring> {
        Ring::with_buffers(BufferPool::new(buffers))
    }

    /// [`Ring::new`] with the buffer pool `pool` (a UDP ring's, of larger buffers).
    pub fn with_buffers(pool: io::Result<BufferPool>) -> crate::Result<Ring> {
        let cq_entries = RING_ENTRIES * 4;
        let (ring, disabled) = match IoUring::builder()
            .setup_cqsize(cq_entries)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(RING_ENTRIES)
        {
            Ok(ring) => (ring, true),
            Err(_) => {
                let ring = IoUring::builder()
                    .setup_cqsize(cq_entries)
                    .build(RING_ENTRIES)
                    .map_err(unavailable)?;
                (ring, false)
            }
        };
        let mut pool = pool.map_err(|e| crate::Error::io("cannot allocate buffers", e))?;
        pool.register(&ring)
            .map_err(|e| crate::Error::io("cannot register the buffer ring", e))?;
        Ok(Ring {
            ring,
            pool,
            disabled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_pool_shares() {
        assert_eq!(buffers_per_worker(1), 256);
        assert_eq!(buffers_per_worker(2), 128);
        assert_eq!(buffers_per_worker(3), 64);
        assert_eq!(buffers_per_worker(64), 32);
        for workers in 1..=64 {
            assert!(buffers_per_worker(workers).is_power_of_two());
        }
    }

    #[test]
    fn buffer_counts_from_the_environment() {
        assert_eq!(parse_buffer_count("1"), Some(1));
        assert_eq!(parse_buffer_count("32"), Some(32));
        assert_eq!(parse_buffer_count("32768"), Some(32768));
        for bad in ["0", "3", "65536", "-4", "", "x", "1e3", "32769"] {
            assert_eq!(parse_buffer_count(bad), None, "{bad:?}");
        }
    }
}
