//! The UDP rings' buffers and message headers: where the kernel's multishot header, the source
//! address and the datagram sit in each buffer, the `msghdr`s that receives and echoes point
//! the kernel at, their submission entries, and the parsing of what a receive left. With
//! `buffers.rs` and `sqe.rs`, the only place of uring's `unsafe`.
//!
//! Every buffer has one layout in both receive modes, so an echo is sent from where the
//! datagram landed, with the address the kernel wrote beside it as its destination: nothing
//! is copied, and the buffer (datagram and address alike) stays ours until the send
//! completes.
//! - multishot `recvmsg` (buffer select): the kernel writes its `io_uring_recvmsg_out`
//!   header, then the source address into a field of [`NAME_LEN`] bytes, then the datagram;
//! - single-shot `recvmsg` (the fallback): our header points the address and the datagram at
//!   the same two places, and the kernel reports the flags and address length in the header.

use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use io_uring::types::{CancelBuilder, Fd, RecvMsgOut};
use io_uring::{opcode, squeue};

use crate::server::uring::buffers::{BufferPool, Buffers};
use crate::server::uring::sqe::{token, Kind, RECV_POLL_FIRST};
use crate::server::uring::BUFFER_GROUP;

/// The header a multishot receive writes first (`struct io_uring_recvmsg_out`: four `u32`).
const RECVMSG_OUT_LEN: usize = 16;
/// Room for the source address: the largest a UDP socket reports (IPv6).
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_in6>();
/// Where the source address starts in a buffer.
const NAME_OFFSET: usize = RECVMSG_OUT_LEN;
/// Where the datagram starts in a buffer, in both modes.
const PAYLOAD_OFFSET: usize = NAME_OFFSET + NAME_LEN;
/// Room for the datagram: more than the largest there is, so none is ever cut short (and
/// `MSG_TRUNC` is checked anyway).
const PAYLOAD_CAPACITY: usize = crate::server::udp::BUFFER_SIZE;
/// The length of one buffer.
pub const BUFFER_LEN: usize = PAYLOAD_OFFSET + PAYLOAD_CAPACITY;

// The largest datagram (IPv6's) fits.
const _: () = assert!(PAYLOAD_CAPACITY >= 65_527);

/// A received datagram, as a buffer holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram {
    pub source: SocketAddr,
    pub len: usize,
    /// It was longer than the buffer's room (`MSG_TRUNC`): never echoed.
    pub truncated: bool,
    /// The length of the source address the kernel wrote (the echo's destination).
    name_len: u32,
}

/// A message header and its one `iovec`, at an address that stays put while an operation
/// uses them.
struct Message {
    header: libc::msghdr,
    iov: libc::iovec,
}

/// The headers of one UDP ring: the multishot receives' template and one per buffer, for
/// that buffer's echo (and, in the fallback, its receive).
pub struct Messages {
    template: Box<libc::msghdr>,
    per_buffer: Box<[Message]>,
}

fn empty_header() -> libc::msghdr {
    // SAFETY: `msghdr` is plain data (pointers, lengths, flags; on some targets padding) for
    // which all zeroes is valid: no name, no iovec, no control data.
    unsafe { std::mem::zeroed() }
}

impl Messages {
    /// Headers for a pool of `count` buffers.
    pub fn new(count: u16) -> Messages {
        let mut template = Box::new(empty_header());
        template.msg_namelen = NAME_LEN as libc::socklen_t;
        let per_buffer = (0..count)
            .map(|_| Message {
                header: empty_header(),
                iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
            })
            .collect();
        Messages {
            template,
            per_buffer,
        }
    }

    /// A multishot receive on `fd` into buffers of [`BUFFER_GROUP`], tagged `user_data`.
    pub fn recv_multishot(&self, fd: RawFd, user_data: u64) -> squeue::Entry {
        opcode::RecvMsgMulti::new(Fd(fd), &*self.template, BUFFER_GROUP)
            .build()
            .user_data(user_data)
    }

    /// A single receive on `fd` into buffer `bid` (which the caller holds), waiting for a
    /// datagram before trying.
    pub fn recv_single(
        &mut self,
        fd: RawFd,
        pool: &BufferPool,
        bid: u16,
        user_data: u64,
    ) -> squeue::Entry {
        let message = &mut self.per_buffer[usize::from(bid)];
        message.iov = libc::iovec {
            iov_base: pool.recv_ptr(bid, PAYLOAD_OFFSET, PAYLOAD_CAPACITY).cast(),
            iov_len: PAYLOAD_CAPACITY,
        };
        let mut header = empty_header();
        header.msg_name = pool.recv_ptr(bid, NAME_OFFSET, NAME_LEN).cast();
        header.msg_namelen = NAME_LEN as libc::socklen_t;
        header.msg_iov = &mut message.iov;
        header.msg_iovlen = 1;
        message.header = header;
        opcode::RecvMsg::new(Fd(fd), &mut message.header)
            .ioprio(RECV_POLL_FIRST)
            .build()
            .user_data(user_data)
    }

    /// The echo of `datagram`, which buffer `bid` holds, to its source, over `fd`.
    pub fn echo(
        &mut self,
        fd: RawFd,
        pool: &BufferPool,
        bid: u16,
        datagram: &Datagram,
        user_data: u64,
    ) -> squeue::Entry {
        let len = datagram.len.min(PAYLOAD_CAPACITY);
        let name_len = (datagram.name_len as usize).min(NAME_LEN);
        let message = &mut self.per_buffer[usize::from(bid)];
        message.iov = libc::iovec {
            iov_base: pool
                .send_ptr(bid, PAYLOAD_OFFSET as u32, len as u32)
                .cast_mut()
                .cast(),
            iov_len: len,
        };
        let mut header = empty_header();
        // The kernel only reads the destination of a send.
        header.msg_name = pool
            .send_ptr(bid, NAME_OFFSET as u32, name_len as u32)
            .cast_mut()
            .cast();
        header.msg_namelen = name_len as libc::socklen_t;
        header.msg_iov = &mut message.iov;
        header.msg_iovlen = 1;
        message.header = header;
        opcode::SendMsg::new(Fd(fd), &message.header)
            .build()
            .user_data(user_data)
    }

    /// What a multishot receive that completed with `result` left in buffer `bid`; `None`
    /// when it names no address this server can answer.
    pub fn parse_multishot(&self, pool: &BufferPool, bid: u16, result: usize) -> Option<Datagram> {
        let bytes = pool.bytes(bid);
        parse_multishot(&bytes[..result.min(bytes.len())], &self.template)
    }

    /// What the single receive into buffer `bid` that completed with `result` (its length)
    /// left there.
    pub fn parse_single(&self, pool: &BufferPool, bid: u16, result: usize) -> Option<Datagram> {
        let header = &self.per_buffer[usize::from(bid)].header;
        let name_len = header.msg_namelen as usize;
        if name_len > NAME_LEN {
            return None;
        }
        let bytes = pool.bytes(bid);
        let source = socket_addr(&bytes[NAME_OFFSET..NAME_OFFSET + name_len])?;
        Some(Datagram {
            source,
            len: result.min(PAYLOAD_CAPACITY),
            truncated: header.msg_flags & libc::MSG_TRUNC != 0 || result > PAYLOAD_CAPACITY,
            name_len: name_len as u32,
        })
    }
}

/// Cancels every operation of the ring (Linux 5.19's "any" match).
pub fn cancel_all() -> squeue::Entry {
    opcode::AsyncCancel2::new(CancelBuilder::any())
        .build()
        .user_data(token(Kind::Cancel, 0, 0))
}

/// Parses the bytes a multishot receive wrote (`bytes`, as long as its result) with the
/// header it was submitted with.
fn parse_multishot(bytes: &[u8], template: &libc::msghdr) -> Option<Datagram> {
    let out = RecvMsgOut::parse(bytes, template).ok()?;
    if out.is_name_data_truncated() {
        return None;
    }
    // The echo is sent from PAYLOAD_OFFSET: the datagram must be there.
    let payload_at = out.payload_data().as_ptr() as usize - bytes.as_ptr() as usize;
    if payload_at != PAYLOAD_OFFSET {
        debug_assert!(false, "a multishot datagram at byte {payload_at}");
        return None;
    }
    Some(Datagram {
        source: socket_addr(out.name_data())?,
        len: out.payload_data().len(),
        truncated: out.is_payload_truncated()
            || out.incoming_payload_len() as usize > out.payload_data().len(),
        name_len: out.incoming_name_len(),
    })
}

/// The address in a `sockaddr_in` or `sockaddr_in6` as the kernel wrote it (family in host
/// order, port in network order); `None` for any other family or a short one.
fn socket_addr(name: &[u8]) -> Option<SocketAddr> {
    let field = |range: std::ops::Range<usize>| name.get(range);
    let family = i32::from(u16::from_ne_bytes(field(0..2)?.try_into().ok()?));
    let port = u16::from_be_bytes(field(2..4)?.try_into().ok()?);
    match family {
        libc::AF_INET => {
            let ip: [u8; 4] = field(4..8)?.try_into().ok()?;
            Some(SocketAddrV4::new(ip.into(), port).into())
        }
        libc::AF_INET6 => {
            let flowinfo = u32::from_ne_bytes(field(4..8)?.try_into().ok()?);
            let ip: [u8; 16] = field(8..24)?.try_into().ok()?;
            let scope_id = u32::from_ne_bytes(field(24..28)?.try_into().ok()?);
            Some(SocketAddrV6::new(ip.into(), port, flowinfo, scope_id).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `sockaddr_in` or `sockaddr_in6` for `addr`, laid out as the kernel writes it.
    fn name_of(addr: SocketAddr) -> Vec<u8> {
        let mut name = Vec::new();
        match addr {
            SocketAddr::V4(v4) => {
                name.extend((libc::AF_INET as u16).to_ne_bytes());
                name.extend(v4.port().to_be_bytes());
                name.extend(v4.ip().octets());
                name.extend([0; 8]);
            }
            SocketAddr::V6(v6) => {
                name.extend((libc::AF_INET6 as u16).to_ne_bytes());
                name.extend(v6.port().to_be_bytes());
                name.extend(v6.flowinfo().to_ne_bytes());
                name.extend(v6.ip().octets());
                name.extend(v6.scope_id().to_ne_bytes());
            }
        }
        name
    }

    #[test]
    fn names_parse_as_the_socket_addresses_they_hold() {
        for addr in ["127.0.0.1:40000", "[::1]:5353", "[fe80::1%2]:1"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let name = name_of(addr);
            assert_eq!(name.len(), if addr.is_ipv4() { 16 } else { NAME_LEN });
            assert_eq!(socket_addr(&name), Some(addr));
            assert_eq!(socket_addr(&name[..name.len() - 9]), None, "short");
        }
        let mut unix = name_of("127.0.0.1:1".parse().unwrap());
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        assert_eq!(socket_addr(&unix), None);
    }

    /// A buffer as a multishot receive leaves it: header, address field, datagram.
    fn multishot_buffer(source: SocketAddr, payload: &[u8], real_len: u32, flags: i32) -> Vec<u8> {
        let name = name_of(source);
        let mut bytes = Vec::new();
        for field in [name.len() as u32, 0, real_len, flags as u32] {
            bytes.extend(field.to_ne_bytes());
        }
        bytes.extend(&name);
        bytes.resize(PAYLOAD_OFFSET, 0);
        bytes.extend(payload);
        bytes
    }

    #[test]
    fn a_multishot_buffer_holds_the_datagram_where_the_echo_is_sent_from() {
        let messages = Messages::new(1);
        let source: SocketAddr = "[::1]:40000".parse().unwrap();
        let bytes = multishot_buffer(source, b"hello", 5, 0);
        assert_eq!(
            parse_multishot(&bytes, &messages.template),
            Some(Datagram {
                source,
                len: 5,
                truncated: false,
                name_len: NAME_LEN as u32
            })
        );
        let empty = multishot_buffer("127.0.0.1:9".parse().unwrap(), b"", 0, 0);
        let parsed = parse_multishot(&empty, &messages.template).unwrap();
        assert_eq!(
            (parsed.len, parsed.truncated, parsed.name_len),
            (0, false, 16)
        );
    }

    #[test]
    fn truncation_is_seen_by_its_flag_and_by_the_length() {
        let messages = Messages::new(1);
        let source: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let flagged = multishot_buffer(source, b"abc", 3, libc::MSG_TRUNC);
        assert!(
            parse_multishot(&flagged, &messages.template)
                .unwrap()
                .truncated
        );
        let longer = multishot_buffer(source, b"abc", 70_000, 0);
        assert!(
            parse_multishot(&longer, &messages.template)
                .unwrap()
                .truncated
        );
        assert_eq!(
            parse_multishot(&flagged[..PAYLOAD_OFFSET - 1], &messages.template),
            None,
            "shorter than its header"
        );
    }
}
