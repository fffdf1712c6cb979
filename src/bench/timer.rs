//! A one-shot timer with nanosecond resolution for the open loop's schedule.
//!
//! epoll's own timeout counts whole milliseconds (mio rounds up), so a request due in 300µs
//! would go out up to a millisecond late, and since open-loop latency runs from the
//! scheduled time that lateness would be reported as server latency. A timerfd registered
//! with the poll wakes the loop on time instead.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// A CLOCK_MONOTONIC timerfd, readable when it expires.
pub struct Timer {
    file: File,
}

impl Timer {
    /// A disarmed timer registered with `registry` under `token`.
    pub fn new(registry: &Registry, token: Token) -> io::Result<Self> {
        // SAFETY: timerfd_create takes no pointers; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(Timer {
            file: File::from(fd),
        })
    }

    /// Makes the timer expire once, `after` from now (at least 1ns: zero would disarm it).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `spec` is a valid itimerspec on the stack; the old value is not wanted
        // (null is allowed); the descriptor is a timerfd we own.
        let rc =
            unsafe { libc::timerfd_settime(self.file.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry, so the next one is a new readiness edge.
    pub fn clear(&mut self) {
        let mut expirations = [0u8; 8];
        // Nothing to read (EAGAIN) just means it was already cleared.
        let _ = self.file.read(&mut expirations);
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
