//! The epoll model's zero-copy bulk path (`serve --splice auto`): a plain TCP connection that
//! moves bulk data is echoed with splice(2), socket to a pipe and from the pipe back to the
//! same socket, so its bytes never cross into user space (HAProxy's `option splice-auto`).
//!
//! Each worker has a [`PipePool`] of at most [`POOL_PIPES`] pipes (or `MULTIECHO_SPLICE_PIPES`),
//! opened when first needed and resized to [`PIPE_SIZE`] (kept at the kernel's size if that
//! fails). A connection borrows a pipe for one splice in and gives it back as soon as its
//! splice out has emptied it, so an idle connection holds none; one whose client does not
//! take the echo keeps its pipe, with the bytes in it, until it can send them or closes. A pipe
//! goes back to the pool only empty: [`PipePool::give_back`] closes a pipe that still holds
//! bytes (they belong to the connection that spliced them, and another connection must never
//! send them: haproxy#1510, #2505 and #2749). With every pipe lent out, connections stay on the
//! read/write copy path.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// Pipes per worker, at most.
pub const POOL_PIPES: usize = 64;
/// Overrides [`POOL_PIPES`] (0 to 4096), for tests that need the pool to run dry.
pub const PIPES_ENV: &str = "MULTIECHO_SPLICE_PIPES";
/// The size each pipe is asked to take (F_SETPIPE_SZ).
pub const PIPE_SIZE: usize = 256 * 1024;
/// A splice in that moved less than this is small: the client sends small messages.
pub const SMALL_SPLICE: usize = 16 * 1024;
/// After this many small splices in a row a connection goes back to read/write.
pub const SMALL_SPLICES_TO_LEAVE: u8 = 4;
/// How long a worker waits before it tries to open a pipe again after failing to.
const OPEN_RETRY: Duration = Duration::from_secs(1);

/// A non-blocking pipe and how much it can hold.
#[derive(Debug)]
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    /// A non-blocking, close-on-exec pipe resized to `size` bytes if the kernel allows it.
    fn open(size: usize) -> io::Result<Pipe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let wanted = i32::try_from(size).unwrap_or(i32::MAX);
        let capacity = match fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(wanted)) {
            Ok(capacity) => capacity,
            Err(e) => {
                // Over /proc/sys/fs/pipe-max-size or the user's pipe pages: the default size
                // works too, with more splices per megabyte.
                tracing::debug!("cannot resize a splice pipe to {size} bytes: {e}");
                fcntl(write.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)?
            }
        };
        Ok(Pipe {
            read,
            write,
            capacity: usize::try_from(capacity).unwrap_or(0).max(1),
        })
    }
}

/// A pipe lent to one connection, and the bytes it holds for that connection's socket.
#[derive(Debug)]
pub struct HeldPipe {
    pipe: Pipe,
    queued: usize,
}

impl HeldPipe {
    /// Echo waiting in the pipe for the socket to take it.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Moves what `socket` has received, as much as the pipe has room for, into the pipe.
    /// `Ok(0)` is the end of the stream (the pipe is never full when this is called).
    pub fn fill(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let room = self.pipe.capacity - self.queued;
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let moved = splice(socket, None, self.pipe.write.as_fd(), None, room, flags)?;
        self.queued += moved;
        Ok(moved)
    }

    /// Moves the pipe's bytes to `socket` until the pipe is empty or the socket is full;
    /// returns how many the socket took.
    pub fn drain(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let mut sent = 0;
        while self.queued > 0 {
            match splice(
                self.pipe.read.as_fd(),
                None,
                socket,
                None,
                self.queued,
                flags,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.queued -= n;
                    sent += n;
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sent)
    }
}

/// A worker's pipes: the free ones, and how many are open (free or lent).
#[derive(Debug)]
pub struct PipePool {
    free: Vec<Pipe>,
    open: usize,
    max: usize,
    /// Opening a pipe failed: no new one until then.
    retry_at: Option<Instant>,
}

impl PipePool {
    /// A pool of at most `max` pipes (none opened yet); `max` 0 never splices.
    pub fn new(max: usize) -> PipePool {
        PipePool {
            free: Vec::new(),
            open: 0,
            max,
            retry_at: None,
        }
    }

    /// The pool size for `--splice` `mode`: [`PIPES_ENV`] or [`POOL_PIPES`], or 0 when off.
    pub fn size_for(mode: crate::server::SpliceMode) -> crate::Result<usize> {
        if mode == crate::server::SpliceMode::Off {
            return Ok(0);
        }
        let text = match std::env::var_os(PIPES_ENV) {
            None => return Ok(POOL_PIPES),
            Some(text) => text.to_string_lossy().into_owned(),
        };
        match text.trim().parse::<usize>() {
            Ok(pipes) if pipes <= 4096 => Ok(pipes),
            _ => Err(crate::Error::io(
                format!("invalid {PIPES_ENV}={text}"),
                io::Error::other("expected a number of pipes from 0 to 4096"),
            )),
        }
    }

    /// Whether connections may switch to splicing at all.
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// An empty pipe to lend, or `None` if every pipe is lent (or none can be opened).
    pub fn take(&mut self, now: Instant) -> Option<HeldPipe> {
        let pipe = match self.free.pop() {
            Some(pipe) => pipe,
            None if self.open < self.max && self.retry_at.is_none_or(|at| now >= at) => {
                match Pipe::open(PIPE_SIZE) {
                    Ok(pipe) => {
                        self.open += 1;
                        self.retry_at = None;
                        tracing::debug!(
                            open = self.open,
                            capacity = pipe.capacity,
                            "splice pipe opened"
                        );
                        pipe
                    }
                    Err(e) => {
                        // Out of descriptors, most likely: read/write meanwhile.
                        tracing::debug!("cannot open a splice pipe: {e}");
                        self.retry_at = Some(now + OPEN_RETRY);
                        return None;
                    }
                }
            }
            None => return None,
        };
        Some(HeldPipe { pipe, queued: 0 })
    }

    /// Takes a lent pipe back: into the pool if it is empty, else closed (its bytes belong to
    /// the connection that gives it up, and no other connection may ever send them).
    pub fn give_back(&mut self, held: HeldPipe) {
        if held.queued == 0 && self.open <= self.max {
            self.free.push(held.pipe);
        } else {
            self.open -= 1;
            drop(held);
        }
    }

    /// Stops splicing in this worker for good (the kernel refuses splice on sockets): closes
    /// the free pipes; lent ones are closed as they come back.
    pub fn disable(&mut self, why: &io::Error) {
        if self.max > 0 {
            tracing::warn!("splice(2) does not work here ({why}); echoing with read/write");
        }
        self.open -= self.free.len();
        self.free.clear();
        self.max = 0;
    }

    /// Pipes open now, free or lent.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open
    }

    /// Pipes free to lend now, without opening any.
    #[cfg(test)]
    pub fn free(&self) -> usize {
        self.free.len()
    }
}

/// Whether a splice error means splice cannot work on this socket at all (not a connection
/// failure): the worker then echoes with read/write.
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EINVAL | Errno::ENOSYS | Errno::EPERM | Errno::EOPNOTSUPP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn the_pool_is_bounded_and_lends_each_pipe_once() {
        let now = Instant::now();
        let mut pool = PipePool::new(2);
        let a = pool.take(now).expect("a first pipe");
        let b = pool.take(now).expect("a second pipe");
        assert!(pool.take(now).is_none(), "at most two pipes");
        assert!(a.pipe.capacity >= 4096);
        pool.give_back(a);
        assert_eq!((pool.open(), pool.free()), (2, 1));
        assert!(pool.take(now).is_some());
        drop(b);
        assert!(PipePool::new(0).take(now).is_none());
        assert!(!PipePool::new(0).enabled());
    }

    #[test]
    fn a_pipe_with_bytes_in_it_is_closed_not_pooled() {
        let now = Instant::now();
        let (mut client, server) = pair();
        server.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(1);
        let mut held = pool.take(now).unwrap();
        client.write_all(b"leftover").unwrap();
        let mut moved = 0;
        while moved < 8 {
            match held.fill(server.as_fd()) {
                Ok(n) => moved += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("splice in: {e}"),
            }
        }
        assert_eq!(held.queued(), 8);
        pool.give_back(held);
        assert_eq!((pool.open(), pool.free()), (0, 0), "closed, not pooled");
        // The next connection gets a fresh, empty pipe.
        let fresh = pool.take(now).expect("a new pipe");
        assert_eq!(fresh.queued(), 0);
    }

    #[test]
    fn fill_and_drain_echo_through_the_pipe() {
        let now = Instant::now();
        let (mut client, server) = pair();
        server.set_nonblocking(true).unwrap();
        let mut pool = PipePool::new(1);
        let mut held = pool.take(now).unwrap();
        let data = crate::payload::bytes(3, 100_000);
        client.write_all(&data).unwrap();
        let mut echoed = vec![0u8; data.len()];
        let mut got = 0;
        while got < data.len() {
            match held.fill(server.as_fd()) {
                Ok(0) => panic!("unexpected end of stream"),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("splice in: {e}"),
            }
            // Drain while the client reads, so a full socket cannot stall the test.
            client.set_nonblocking(true).unwrap();
            loop {
                held.drain(server.as_fd()).unwrap();
                while let Ok(n) = client.read(&mut echoed[got..]) {
                    assert!(n > 0, "unexpected end of stream");
                    got += n;
                }
                if held.queued() == 0 {
                    break;
                }
            }
            client.set_nonblocking(false).unwrap();
        }
        assert!(echoed == data, "byte-exact through the pipe");
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let end = loop {
            match held.fill(server.as_fd()) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                other => break other.unwrap(),
            }
        };
        assert_eq!(end, 0, "end of stream");
        pool.give_back(held);
        assert_eq!(pool.free(), 1);
    }

    #[test]
    fn pool_size_follows_the_mode() {
        assert_eq!(
            PipePool::size_for(crate::server::SpliceMode::Off).unwrap(),
            0
        );
    }
}
