//! Submission helpers: the `user_data` token every submission carries, the entries the worker
//! submits, and the one place they enter the submission queue. With `buffers.rs`, the only
//! file holding uring's `unsafe`.

use std::net::TcpStream;
use std::os::fd::{FromRawFd, RawFd};

use io_uring::types::{Fd, Timespec};
use io_uring::{opcode, squeue, IoUring};

use super::{BUFFER_GROUP, BUFFER_SIZE};

/// IORING_RECVSEND_POLL_FIRST: wait for data before trying the receive. The next message of
/// an echo client arrives after its echo, so trying at once would fail nearly every time.
pub(super) const RECV_POLL_FIRST: u16 = 1;

/// Defines [`Kind`] and its decoding from one list, so decoding is total by construction: a
/// variant cannot be missing from it.
macro_rules! kinds {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// What a submission was for; the top byte of its `user_data`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum Kind {
            $($(#[$doc])* $name = $value,)*
        }

        impl Kind {
            /// Every kind.
            #[cfg(test)]
            pub const ALL: &'static [Kind] = &[$(Kind::$name,)*];

            /// The kind whose byte is `value`; `None` for a byte no kind has (0 included, so a
            /// zeroed `user_data` is never mistaken for one).
            pub fn from_u8(value: u8) -> Option<Kind> {
                match value {
                    $($value => Some(Kind::$name),)*
                    _ => None,
                }
            }
        }
    };
}

kinds! {
    Accept = 1,
    Recv = 2,
    Send = 3,
    ShutdownSignal = 4,
    Wake = 5,
    /// The periodic look for idle connections and late PROXY headers.
    Sweep = 6,
    AcceptBackoff = 7,
    Deadline = 8,
    /// An AsyncCancel; its own completion carries nothing to act on.
    Cancel = 9,
    /// The connection limit has room again (a multishot poll of its descriptor).
    Room = 10,
    /// The TLS handshake cap has room again (a multishot poll of its descriptor).
    HandshakeRoom = 11,
}

/// `user_data`: kind (8 bits), generation (24 bits), slot or listener index (32 bits).
pub fn token(kind: Kind, index: u32, generation: u32) -> u64 {
    (kind as u64) << 56 | u64::from(generation & 0xFF_FFFF) << 32 | u64::from(index)
}

/// The parts of a `user_data` made by [`token`]; the kind is `None` for one we never made.
pub fn untoken(user_data: u64) -> (Option<Kind>, u32, u32) {
    (
        Kind::from_u8((user_data >> 56) as u8),
        user_data as u32,
        (user_data >> 32) as u32 & 0xFF_FFFF,
    )
}

/// A receive into a buffer the kernel picks from [`BUFFER_GROUP`]: multishot, ending after
/// `limit` bytes (Linux 6.16+), or one recv that waits for data before trying.
pub fn recv(fd: RawFd, multishot: bool, limit: u32) -> squeue::Entry {
    if multishot {
        with_total_limit(opcode::RecvMulti::new(Fd(fd), BUFFER_GROUP).build(), limit)
    } else {
        opcode::Recv::new(Fd(fd), std::ptr::null_mut(), BUFFER_SIZE as u32)
            .buf_group(BUFFER_GROUP)
            .ioprio(RECV_POLL_FIRST)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
    }
}

/// A send of `len` bytes at `data`. `dont_wait`: complete at once with EAGAIN or a short
/// count rather than wait for room (for sends from the shared pool, which must not be held by
/// a client that does not read).
pub fn send(fd: RawFd, data: *const u8, len: u32, dont_wait: bool) -> squeue::Entry {
    let flags = libc::MSG_NOSIGNAL | if dont_wait { libc::MSG_DONTWAIT } else { 0 };
    opcode::Send::new(Fd(fd), data, len).flags(flags).build()
}

pub fn accept_multi(fd: RawFd) -> squeue::Entry {
    opcode::AcceptMulti::new(Fd(fd))
        .flags(libc::SOCK_CLOEXEC)
        .build()
}

pub fn poll_in(fd: RawFd) -> squeue::Entry {
    opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32).build()
}

/// A poll that stays armed and completes once per wake-up of `fd`, even when another ring
/// drains the descriptor first (the kernel posts the mask the wake-up carried).
pub fn poll_in_multi(fd: RawFd) -> squeue::Entry {
    opcode::PollAdd::new(Fd(fd), libc::POLLIN as u32)
        .multi(true)
        .build()
}

/// A timeout; `timespec` must stay put until the entry is submitted (the worker boxes it).
pub fn timeout(timespec: &Timespec) -> squeue::Entry {
    opcode::Timeout::new(timespec).build()
}

pub fn cancel(target: u64) -> squeue::Entry {
    opcode::AsyncCancel::new(target)
        .build()
        .user_data(token(Kind::Cancel, 0, 0))
}

/// Where `optlen` is in `struct io_uring_sqe` (the kernel's ABI).
const OPTLEN_OFFSET: usize = 44;

/// Sets a multishot recv's total byte limit, after which it ends (`sqe->optlen` with
/// IORING_OP_RECV, Linux 6.16; older kernels fail it with EINVAL). The io-uring crate does
/// not expose the field; the layout is checked by a test.
fn with_total_limit(entry: squeue::Entry, limit: u32) -> squeue::Entry {
    let mut raw = to_bytes(entry);
    raw[OPTLEN_OFFSET..OPTLEN_OFFSET + 4].copy_from_slice(&limit.to_ne_bytes());
    from_bytes(raw)
}

fn to_bytes(entry: squeue::Entry) -> [u8; 64] {
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around `struct io_uring_sqe`, 64 bytes of plain
    // integers (transmute checks the size), so any bytes make a valid value either way.
    unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(entry) }
}

fn from_bytes(raw: [u8; 64]) -> squeue::Entry {
    // SAFETY: as in `to_bytes`.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}

/// Pushes `entry` into the submission queue, submitting what is queued once if it is full;
/// false if the kernel cannot take it yet.
///
/// Every entry comes from this file's builders, with memory whose life the worker and the
/// connection state machine guarantee: pool buffers (alive as long as the ring), a
/// connection's own buffer (not touched while its send is in flight, freed only when the
/// connection has nothing in flight), the worker's boxed timespecs (read at submission),
/// a UDP ring's boxed message headers (alive as long as the ring, each rewritten only when
/// its buffer has no operation in flight) and descriptors that stay open until their
/// operation completes.
pub fn push(ring: &mut IoUring, entry: &squeue::Entry) -> bool {
    for _ in 0..2 {
        // SAFETY: see above: everything the entry points to outlives its operation.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return true;
        }
        if ring.submit().is_err() {
            return false;
        }
    }
    false
}

/// The stream of a successful accept's result.
pub fn accepted_stream(fd: RawFd) -> TcpStream {
    assert!(fd >= 0, "accept result is not a descriptor");
    // SAFETY: a successful accept returns a new descriptor that nothing else owns.
    unsafe { TcpStream::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let user_data = token(Kind::Send, 123_456, 0x1_23_45_67);
        assert_eq!(
            untoken(user_data),
            (Some(Kind::Send), 123_456, 0x23_45_67),
            "generations keep their low 24 bits"
        );
        assert_eq!(untoken(0).0, None);
        for &kind in Kind::ALL {
            assert_eq!(untoken(token(kind, u32::MAX, 0)), (Some(kind), u32::MAX, 0));
        }
    }

    /// Decoding is total: every variant decodes from its own byte, and no other byte decodes.
    #[test]
    fn kind_decoding_is_total() {
        let decoded: Vec<Kind> = (0..=u8::MAX).filter_map(Kind::from_u8).collect();
        assert_eq!(decoded, Kind::ALL, "every kind, once, in order");
        for value in 0..=u8::MAX {
            if let Some(kind) = Kind::from_u8(value) {
                assert_eq!(kind as u8, value);
            }
        }
        assert_eq!(Kind::from_u8(0), None);
    }

    /// `with_total_limit` writes `optlen` at byte 44 of the kernel's `struct io_uring_sqe`
    /// and nothing else. The fields the crate sets are checked at their ABI offsets too, so
    /// a crate whose entry is laid out otherwise fails here, not in production.
    #[test]
    fn total_limit_is_written_at_the_kernels_optlen_offset() {
        let fd = 0x1234_5678;
        let entry = opcode::RecvMulti::new(Fd(fd), 0x2345)
            .build()
            .user_data(0x0102_0304_0506_0708);
        let before = to_bytes(entry.clone());
        assert_eq!(before[0], 27, "opcode IORING_OP_RECV at offset 0");
        assert_eq!(&before[4..8], &fd.to_ne_bytes(), "fd at offset 4");
        assert_eq!(
            &before[32..40],
            &0x0102_0304_0506_0708_u64.to_ne_bytes(),
            "user_data at offset 32"
        );
        assert_eq!(
            &before[40..42],
            &0x2345_u16.to_ne_bytes(),
            "buf_group at 40"
        );
        assert_eq!(&before[44..48], &[0; 4], "optlen starts unset");
        let after = to_bytes(with_total_limit(entry, 0xA1B2_C3D4));
        assert_eq!(&after[44..48], &0xA1B2_C3D4_u32.to_ne_bytes());
        for (i, (a, b)) in before.iter().zip(&after).enumerate() {
            if !(44..48).contains(&i) {
                assert_eq!(a, b, "byte {i} changed");
            }
        }
    }
}
