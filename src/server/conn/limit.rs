//! The global connection limit (`--max-conns`), one type for every model.
//!
//! A model takes a [`Permit`] *before* it accepts: while none is left it does not accept, so
//! clients beyond the limit wait in the listen backlog (connected, not reset). Dropping a permit
//! frees the slot; when that makes room in a full server, [`Limit::room_fd`] becomes readable so
//! a waiting acceptor (poll, epoll, tokio's `AsyncFd`, io_uring) can take the next client.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::wake::Wake;

/// At most `max` connections at once, shared by a process's workers.
#[derive(Debug)]
pub struct Limit {
    max: usize,
    live: AtomicUsize,
    room: Wake,
}

impl Limit {
    /// A limit of `max` (at least one).
    pub fn new(max: usize) -> io::Result<Arc<Self>> {
        Ok(Arc::new(Limit {
            max: max.max(1),
            live: AtomicUsize::new(0),
            room: Wake::new()?,
        }))
    }

    /// Takes a slot, if one is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut live = self.live.load(Ordering::Relaxed);
        loop {
            if live >= self.max {
                return None;
            }
            match self.live.compare_exchange_weak(
                live,
                live + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Permit(Arc::clone(self))),
                Err(now) => live = now,
            }
        }
    }

    /// Whether a slot is free now.
    pub fn has_room(&self) -> bool {
        self.live() < self.max
    }

    /// Slots taken.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Readable after a full server freed a slot; [`Limit::clear_room_signal`] before
    /// re-checking [`Limit::has_room`].
    pub fn room_fd(&self) -> BorrowedFd<'_> {
        self.room.as_fd()
    }

    /// Consumes the room signal.
    pub fn clear_room_signal(&self) {
        self.room.drain();
    }
}

/// One slot of a [`Limit`], freed on drop.
#[derive(Debug)]
pub struct Permit(Arc<Limit>);

impl Permit {
    /// Frees the slot; returns whether the server was full until now (so the caller, if it
    /// accepts, can take the next waiting client at once).
    pub fn release(self) -> bool {
        let limit = Arc::clone(&self.0);
        drop(self);
        limit.live() + 1 == limit.max
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) >= self.0.max {
            // Only a full server has waiters; a wake-up per close would cost a system call.
            self.0.room.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wake::poll_readable;
    use std::time::Duration;

    #[test]
    fn counts_slots_and_signals_room() {
        let limit = Limit::new(2).unwrap();
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none(), "the limit holds");
        assert!(!limit.has_room());
        let ready = poll_readable(&[limit.room_fd()], Some(Duration::ZERO)).unwrap();
        assert!(!ready[0]);
        drop(a);
        assert!(limit.has_room());
        let ready = poll_readable(&[limit.room_fd()], Some(Duration::ZERO)).unwrap();
        assert!(ready[0], "freeing a slot of a full server wakes acceptors");
        limit.clear_room_signal();
        let c = limit.try_acquire().unwrap();
        assert!(
            c.release(),
            "releasing at the limit says the server was full"
        );
    }
}
