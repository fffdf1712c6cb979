//! The registered ring of provided buffers: `count` buffers of [`BUFFER_SIZE`] bytes (a UDP
//! ring's are larger: [`BufferPool::with_size`]) that the kernel picks from for buffer-select
//! receives, and that we hand back once their bytes are echoed (or copied out). One of the
//! files holding uring's `unsafe` (with `sqe.rs` and `udp/messages.rs`).

use std::alloc::{self, Layout};
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;
use io_uring::IoUring;

use super::{BUFFER_GROUP, BUFFER_SIZE};

/// Read access to the bytes of buffers the kernel has handed us, for the connection state
/// machine (tests implement it without a ring).
pub trait Buffers {
    /// The whole of buffer `bid`, which the caller holds (the kernel does not write it).
    fn bytes(&self, bid: u16) -> &[u8];
}

pub struct BufferPool {
    ring: NonNull<BufRingEntry>,
    ring_layout: Layout,
    memory: NonNull<u8>,
    memory_layout: Layout,
    count: u16,
    /// The length of each buffer.
    size: usize,
    tail: u16,
}

impl BufferPool {
    /// `count` buffers of [`BUFFER_SIZE`] bytes (the TCP rings').
    pub fn new(count: u16) -> io::Result<Self> {
        BufferPool::with_size(count, BUFFER_SIZE)
    }

    /// `count` buffers of `size` bytes each.
    pub fn with_size(count: u16, size: usize) -> io::Result<Self> {
        assert!(count.is_power_of_two() && size > 0 && u32::try_from(size).is_ok());
        let ring_layout = Layout::from_size_align(
            usize::from(count) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // Small alignment on purpose: a large zeroed allocation with it comes from calloc,
        // which maps fresh pages and does not write them, so buffers never used cost no
        // resident memory. (Over-aligned zeroed allocations are memset, touching them all.)
        let bytes = usize::from(count)
            .checked_mul(size)
            .ok_or(io::ErrorKind::OutOfMemory)?;
        let memory_layout = Layout::from_size_align(bytes, 16).map_err(io::Error::other)?;
        // SAFETY: both layouts have a non-zero size. A new buffer ring must be zeroed (its
        // tail starts at 0).
        let (ring, memory) = unsafe {
            (
                alloc::alloc_zeroed(ring_layout).cast::<BufRingEntry>(),
                alloc::alloc_zeroed(memory_layout),
            )
        };
        let (Some(ring), Some(memory)) = (NonNull::new(ring), NonNull::new(memory)) else {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        };
        Ok(BufferPool {
            ring,
            ring_layout,
            memory,
            memory_layout,
            count,
            size,
            tail: 0,
        })
    }

    /// How many buffers the pool has.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Registers the ring with `uring` as [`BUFFER_GROUP`] and provides every buffer.
    pub fn register(&mut self, uring: &IoUring) -> io::Result<()> {
        // SAFETY: the ring memory is page-aligned, `count` entries long, and lives until the
        // pool is dropped, which happens only after the io_uring is dropped (or after
        // `unregister`): the worker declares its ring before its pool, and `probe` drops
        // its ring first.
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                self.ring.as_ptr() as u64,
                self.count,
                BUFFER_GROUP,
                0,
            )?;
        }
        for bid in 0..self.count {
            self.give_back(bid);
        }
        Ok(())
    }

    /// Returns buffer `bid` to the kernel.
    pub fn give_back(&mut self, bid: u16) {
        assert!(bid < self.count, "buffer id out of range");
        let mask = self.count - 1;
        let addr = self.start(bid) as u64;
        // SAFETY: `tail & mask` < `count`, inside the ring allocation; the kernel only reads
        // entries between its head and the tail we publish below, and this one is not yet
        // published.
        unsafe {
            let entry = &mut *self.ring.as_ptr().add(usize::from(self.tail & mask));
            entry.set_addr(addr);
            entry.set_len(self.size as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lives in the first entry of the ring allocation, is 2-byte
        // aligned, and the kernel reads it concurrently, hence the atomic release store.
        unsafe {
            let tail = BufRingEntry::tail(self.ring.as_ptr()) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The address of byte `offset` of buffer `bid`, for a send of `len` bytes from it.
    pub fn send_ptr(&self, bid: u16, offset: u32, len: u32) -> *const u8 {
        assert!(
            bid < self.count && offset as usize + len as usize <= self.size,
            "send outside buffer {bid}"
        );
        // The bounds were checked above; wrapping_add needs no unsafe.
        self.start(bid).wrapping_add(offset as usize)
    }

    /// The address of byte `offset` of buffer `bid`, for a receive of up to `len` bytes into
    /// it that names its buffer itself (no buffer select): the caller holds the buffer, so
    /// the kernel picks it for nothing else meanwhile.
    pub fn recv_ptr(&self, bid: u16, offset: usize, len: usize) -> *mut u8 {
        assert!(
            bid < self.count && offset + len <= self.size,
            "receive outside buffer {bid}"
        );
        self.memory
            .as_ptr()
            .wrapping_add(usize::from(bid) * self.size + offset)
    }

    fn start(&self, bid: u16) -> *const u8 {
        self.memory
            .as_ptr()
            .wrapping_add(usize::from(bid) * self.size)
            .cast_const()
    }
}

impl Buffers for BufferPool {
    fn bytes(&self, bid: u16) -> &[u8] {
        assert!(bid < self.count, "buffer id out of range");
        // SAFETY: `bid < count`, so the slice lies inside the allocation, which lives as long
        // as `self`. The caller holds buffer `bid` (the kernel gave it to us and we have not
        // given it back), so the kernel does not write it while the slice lives.
        unsafe { std::slice::from_raw_parts(self.start(bid), self.size) }
    }
}

// SAFETY: the pool exclusively owns its two allocations (no aliasing handles exist), so
// moving it to the worker thread that uses it is sound.
unsafe impl Send for BufferPool {}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with these layouts; the kernel no longer uses them (see
        // `register`).
        unsafe {
            alloc::dealloc(self.ring.as_ptr().cast(), self.ring_layout);
            alloc::dealloc(self.memory.as_ptr(), self.memory_layout);
        }
    }
}
