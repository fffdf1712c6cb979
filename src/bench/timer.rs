//! A one-shot timer with nanosecond resolution for the open loop's schedule.
//!
//! epoll's own timeout counts whole milliseconds (mio rounds up), so a request due in 300µs
//! would go out up to a millisecond late, and since open-loop latency runs from the
//! scheduled time that lateness would be reported as server latency. A timerfd registered
//! with the poll wakes the loop on time instead.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

/// A CLOCK_MONOTONIC timerfd, readable when it expires.
pub struct Timer {
    timer: TimerFd,
}

impl Timer {
    /// A disarmed timer registered with `registry` under `token`.
    pub fn new(registry: &Registry, token: Token) -> io::Result<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        registry.register(
            &mut SourceFd(&timer.as_fd().as_raw_fd()),
            token,
            Interest::READABLE,
        )?;
        Ok(Timer { timer })
    }

    /// Makes the timer expire once, `after` from now (at least 1ns: zero would disarm it).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(after)),
            TimerSetTimeFlags::empty(),
        )?;
        Ok(())
    }

    /// Consumes an expiry, so the next one is a new readiness edge.
    pub fn clear(&mut self) {
        let mut expirations = [0u8; 8];
        // Nothing to read (EAGAIN) just means it was already cleared.
        let _ = nix::unistd::read(self.timer.as_fd().as_raw_fd(), &mut expirations);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn wakes_the_poll_on_time() {
        let mut poll = mio::Poll::new().unwrap();
        let mut timer = Timer::new(poll.registry(), Token(7)).unwrap();
        let mut events = mio::Events::with_capacity(4);
        let started = Instant::now();
        timer.arm(Duration::from_micros(1500)).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        let took = started.elapsed();
        assert_eq!(events.iter().next().map(|e| e.token()), Some(Token(7)));
        assert!(took >= Duration::from_micros(1500), "{took:?}");
        timer.clear();
    }
}
