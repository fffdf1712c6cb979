//! What the load generator sends and how it checks what comes back.
//!
//! Message `seq` on connection `conn` is `size` bytes: a 16-byte header (the connection id
//! and the sequence number, little-endian u64s) followed by pseudo-random fill seeded from
//! the run seed, the connection and the sequence number. Any byte range of any message can
//! be regenerated on its own (the fill is SplitMix64, whose n-th output depends only on the
//! seed and n), so neither side keeps a copy of what was sent: the sender generates straight
//! into its write buffer, and the checker regenerates the expected bytes into a reusable
//! buffer and compares them with what arrived, however the echo was cut into pieces.
//! Messages shorter than 16 bytes are a prefix of the header.

use crate::payload::Rng;

/// Bytes of header at the start of every message.
pub const HEADER_LEN: usize = 16;

/// SplitMix64's increment: `Rng::new(seed + w * GAMMA)` yields the w-th output of
/// `Rng::new(seed)` first, which lets a range start in the middle of a message.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The content of every message of one run.
#[derive(Clone, Copy, Debug)]
pub struct Messages {
    seed: u64,
    size: usize,
}

impl Messages {
    /// Messages of `size` bytes (at least 1) whose fill depends on `seed`.
    pub fn new(seed: u64, size: usize) -> Self {
        assert!(size > 0, "messages are at least one byte");
        Messages { seed, size }
    }

    /// The size of every message.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Writes bytes `from..from + out.len()` of message `seq` of connection `conn` to `out`.
    pub fn write_range(&self, conn: u64, seq: u64, from: usize, out: &mut [u8]) {
        debug_assert!(from + out.len() <= self.size);
        let mut written = 0;
        if from < HEADER_LEN {
            let mut header = [0u8; HEADER_LEN];
            header[..8].copy_from_slice(&conn.to_le_bytes());
            header[8..].copy_from_slice(&seq.to_le_bytes());
            let n = (HEADER_LEN - from).min(out.len());
            out[..n].copy_from_slice(&header[from..from + n]);
            written = n;
        }
        if written == out.len() {
            return;
        }
        let fill_offset = from + written - HEADER_LEN;
        let word = (fill_offset / 8) as u64;
        let mut rng = Rng::new(
            self.fill_seed(conn, seq)
                .wrapping_add(word.wrapping_mul(GAMMA)),
        );
        let skip = fill_offset % 8;
        if skip != 0 {
            let bytes = rng.next_u64().to_le_bytes();
            let n = (8 - skip).min(out.len() - written);
            out[written..written + n].copy_from_slice(&bytes[skip..skip + n]);
            written += n;
        }
        rng.fill(&mut out[written..]);
    }

    /// Compares `got` with bytes `from..` of message `seq` of connection `conn`, using
    /// `scratch` (at least `got.len()` long) for the expected bytes. Returns the index in
    /// `got` of the first wrong byte and the byte that was expected there.
    pub fn check(
        &self,
        conn: u64,
        seq: u64,
        from: usize,
        got: &[u8],
        scratch: &mut [u8],
    ) -> Option<(usize, u8)> {
        let expected = &mut scratch[..got.len()];
        self.write_range(conn, seq, from, expected);
        if got == expected {
            return None;
        }
        let at = got.iter().zip(expected.iter()).position(|(a, b)| a != b)?;
        Some((at, expected[at]))
    }

    /// The seed of one message's fill: a hash of the run seed, the connection and `seq`.
    fn fill_seed(&self, conn: u64, seq: u64) -> u64 {
        Rng::new(self.seed ^ conn.rotate_left(40) ^ seq.wrapping_mul(GAMMA)).next_u64()
    }
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
    fn gamma_matches_the_generator() {
        let mut sequential = vec![0u8; 80];
        Rng::new(99).fill(&mut sequential);
        let mut jumped = [0u8; 8];
        Rng::new(99u64.wrapping_add(3u64.wrapping_mul(GAMMA))).fill(&mut jumped);
        assert_eq!(&sequential[24..32], &jumped);
    }

    #[test]
    fn header_names_connection_and_sequence() {
        let messages = Messages::new(1, 64);
        let msg = whole(&messages, 7, 9);
        assert_eq!(u64::from_le_bytes(msg[..8].try_into().unwrap()), 7);
        assert_eq!(u64::from_le_bytes(msg[8..16].try_into().unwrap()), 9);
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
        let mut scratch = vec![0; 300];
        assert_eq!(messages.check(4, 2, 0, &msg, &mut scratch), None);
        assert_eq!(
            messages.check(4, 2, 100, &msg[100..250], &mut scratch),
            None
        );
        let want = msg[123];
        msg[123] ^= 0x10;
        assert_eq!(
            messages.check(4, 2, 100, &msg[100..250], &mut scratch),
            Some((23, want))
        );
        assert!(messages
            .check(4, 3, 0, &whole(&messages, 4, 2), &mut scratch)
            .is_some());
    }
}
