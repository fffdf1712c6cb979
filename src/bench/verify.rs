//! What the load generator sends and how it checks what comes back.
//!
//! Message `seq` on connection `conn` is `size` bytes: a 16-byte header (the connection id
//! and the sequence number, little-endian u64s) followed by pseudo-random fill. The fill is
//! a window into a pool of seeded pseudo-random bytes (from [`crate::payload::Rng`], made
//! once per run), starting at an offset hashed from the connection and the sequence number
//! and wrapping around the pool's end. So every message is unique (its header) and its fill
//! differs from its neighbours', yet any byte range of any message can be produced with a
//! copy and checked with a comparison against the pool: neither side keeps a copy of what
//! was sent, nothing is generated per message, and the echo may come back cut into any
//! pieces. Messages shorter than 16 bytes are a prefix of the header.

use std::sync::Arc;

use crate::payload::Rng;

/// Bytes of header at the start of every message.
pub const HEADER_LEN: usize = 16;

/// Size of the pool of fill bytes (a power of two, so wrapping is a mask). Small enough to
/// stay in the L2 cache next to the kernel's socket buffers: with a 1 MiB pool, reading each
/// message's fill missed the cache and the copy alone took ~3% of the generator's CPU. The
/// 64Ki starting offsets still give neighbouring messages different fill.
const POOL_LEN: usize = 64 * 1024;

/// The content of every message of one run.
#[derive(Clone, Debug)]
pub struct Messages {
    pool: Arc<[u8]>,
    seed: u64,
    size: usize,
}

impl Messages {
    /// Messages of `size` bytes (at least 1) whose fill depends on `seed`.
    pub fn new(seed: u64, size: usize) -> Self {
        assert!(size > 0, "messages are at least one byte");
        let mut pool = vec![0u8; POOL_LEN];
        Rng::new(seed).fill(&mut pool);
        Messages {
            pool: pool.into(),
            seed,
            size,
        }
    }

    /// The size of every message.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Writes bytes `from..from + out.len()` of message `seq` of connection `conn` to `out`.
    pub fn write_range(&self, conn: u64, seq: u64, from: usize, out: &mut [u8]) {
        debug_assert!(from + out.len() <= self.size);
        let mut done = 0;
        if from < HEADER_LEN {
            let header = header(conn, seq);
            done = (HEADER_LEN - from).min(out.len());
            out[..done].copy_from_slice(&header[from..from + done]);
        }
        let mut at = self.pool_position(conn, seq, from + done);
        while done < out.len() {
            let n = (POOL_LEN - at).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.pool[at..at + n]);
            done += n;
            at = 0;
        }
    }

    /// Compares `got` with bytes `from..` of message `seq` of connection `conn`. Returns the
    /// index in `got` of the first wrong byte and the byte that was expected there.
    pub fn check(&self, conn: u64, seq: u64, from: usize, got: &[u8]) -> Option<(usize, u8)> {
        let mut done = 0;
        if from < HEADER_LEN {
            let header = header(conn, seq);
            done = (HEADER_LEN - from).min(got.len());
            let want = &header[from..from + done];
            if let Some(i) = first_difference(&got[..done], want) {
                return Some((i, want[i]));
            }
        }
        let mut at = self.pool_position(conn, seq, from + done);
        while done < got.len() {
            let n = (POOL_LEN - at).min(got.len() - done);
            let want = &self.pool[at..at + n];
            if let Some(i) = first_difference(&got[done..done + n], want) {
                return Some((done + i, want[i]));
            }
            done += n;
            at = 0;
        }
        None
    }

    /// Where in the pool byte `offset` (at least [`HEADER_LEN`]) of a message comes from.
    fn pool_position(&self, conn: u64, seq: u64, offset: usize) -> usize {
        let start = Rng::new(self.seed ^ conn.rotate_left(40) ^ seq.wrapping_mul(GOLDEN)).next_u64()
            as usize;
        start.wrapping_add(offset.saturating_sub(HEADER_LEN)) & (POOL_LEN - 1)
    }
}

/// Spreads sequence numbers over the seed's bits before hashing.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn header(conn: u64, seq: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&conn.to_le_bytes());
    header[8..].copy_from_slice(&seq.to_le_bytes());
    header
}

/// The connection id and sequence number in a message header.
pub fn parse_header(header: &[u8]) -> Option<(u64, u64)> {
    let conn = u64::from_le_bytes(header.get(..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(header.get(8..HEADER_LEN)?.try_into().ok()?);
    Some((conn, seq))
}

/// The index of the first byte where `got` and `want` (equally long) differ.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    if got == want {
        return None;
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(messages: &Messages, conn: u64, seq: u64) -> Vec<u8> {
        let mut buf = vec![0; messages.size()];
        messages.write_range(conn, seq, 0, &mut buf);
        buf
    }

    #[test]
    fn header_names_connection_and_sequence() {
        let messages = Messages::new(1, 64);
        let msg = whole(&messages, 7, 9);
        assert_eq!(parse_header(&msg), Some((7, 9)));
        assert_eq!(parse_header(&msg[..15]), None);
    }

    #[test]
    fn any_range_matches_the_whole_message() {
        for size in [1, 5, 16, 17, 23, 24, 100, 1000] {
            let messages = Messages::new(42, size);
            let msg = whole(&messages, 3, 11);
            for from in 0..size {
                for len in [0, 1, 2, 7, 8, 9, 33, size] {
                    let len = len.min(size - from);
                    let mut part = vec![0; len];
                    messages.write_range(3, 11, from, &mut part);
                    assert_eq!(
                        part,
                        msg[from..from + len],
                        "size {size} from {from} len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn messages_differ_between_connections_and_sequence_numbers() {
        let messages = Messages::new(5, 256);
        let a = whole(&messages, 1, 1);
        assert_ne!(a[HEADER_LEN..], whole(&messages, 2, 1)[HEADER_LEN..]);
        assert_ne!(a[HEADER_LEN..], whole(&messages, 1, 2)[HEADER_LEN..]);
        assert_ne!(
            a[HEADER_LEN..],
            whole(&Messages::new(6, 256), 1, 1)[HEADER_LEN..]
        );
    }

    #[test]
    fn check_finds_the_first_wrong_byte() {
        let messages = Messages::new(8, 300);
        let mut msg = whole(&messages, 4, 2);
        assert_eq!(messages.check(4, 2, 0, &msg), None);
        assert_eq!(messages.check(4, 2, 100, &msg[100..250]), None);
        let want = msg[123];
        msg[123] ^= 0x10;
        assert_eq!(messages.check(4, 2, 100, &msg[100..250]), Some((23, want)));
        assert!(messages.check(4, 3, 0, &whole(&messages, 4, 2)).is_some());
        msg[123] ^= 0x10;
        // A wrong header byte: connection 4 is 04 00 00 ..., so byte 3 should be 0.
        msg[3] ^= 1;
        assert_eq!(messages.check(4, 2, 2, &msg[2..]), Some((1, 0)));
    }

    #[test]
    fn messages_longer_than_the_pool_wrap_around() {
        let size = POOL_LEN + 1000;
        let messages = Messages::new(3, size);
        let msg = whole(&messages, 1, 5);
        assert_eq!(messages.check(1, 5, 0, &msg), None);
        for from in [0, 15, 16, 17, POOL_LEN / 2, POOL_LEN - 3, size - 10] {
            let len = 4096.min(size - from);
            let mut part = vec![0; len];
            messages.write_range(1, 5, from, &mut part);
            assert_eq!(part, msg[from..from + len], "from {from}");
            assert_eq!(messages.check(1, 5, from, &part), None);
        }
        // The fill really is a wrapped window: byte 16 + POOL_LEN repeats byte 16.
        assert_eq!(msg[HEADER_LEN], msg[HEADER_LEN + POOL_LEN]);
        let mut bad = msg.clone();
        bad[size - 1] ^= 0xff;
        assert_eq!(
            messages.check(1, 5, 0, &bad),
            Some((size - 1, msg[size - 1]))
        );
    }
}
