//! Starting the way services start: listening sockets passed by a service manager (the
//! `sd_listen_fds` protocol: `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`), and telling whoever
//! started the server that it is ready: `--ready-fd N` (one line per listener, then the
//! descriptor is closed) and `sd_notify` (`READY=1` once listening, `STOPPING=1` when shutdown
//! starts, when `NOTIFY_SOCKET` is set).
//!
//! The `sd-notify` crate reads the `LISTEN_*` variables (and marks the descriptors
//! close-on-exec); this module checks each descriptor is a listening IP stream socket (served
//! as TCP, its name (`proxy`, `tls`, `tls+proxy`, or any other for plain TCP) mapping to a
//! [`ListenerKind`]) or a bound UDP socket (systemd's
//! `ListenDatagram=`, served as `udp://`). Notifications go through std's `UnixDatagram`,
//! connected once at start, because `STOPPING=1` is sent from the SIGINT/SIGTERM handler, where
//! the crate's `notify` (which allocates and connects on every call) cannot run.

use std::fs::File;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use socket2::{Domain, Protocol, SockRef, Type};

use crate::listen::ListenerKind;
use crate::Error;

/// The sockets a service manager passed, in `LISTEN_FDS` order within each kind.
#[derive(Debug, Default)]
pub struct Passed {
    /// Listening TCP sockets, with the kind their name selects.
    pub stream: Vec<(TcpListener, ListenerKind)>,
    /// Bound UDP sockets, served as `udp://` listeners.
    pub datagram: Vec<UdpSocket>,
}

/// One passed socket, checked.
enum Adopted {
    Stream(TcpListener, ListenerKind),
    Datagram(UdpSocket),
}

/// The sockets a service manager passed to this process; `None` when none were passed to
/// *this* process (a `LISTEN_PID` naming another one is ignored, with a warning), so the caller
/// binds `--listen` instead.
pub fn passed_listeners() -> crate::Result<Option<Passed>> {
    let Some(pid) = std::env::var_os("LISTEN_PID") else {
        return Ok(None);
    };
    let ours = std::process::id();
    if pid.to_str().and_then(|p| p.trim().parse::<u32>().ok()) != Some(ours) {
        tracing::warn!(
            "ignoring LISTEN_FDS: LISTEN_PID={} is not this process ({ours}); using --listen",
            pid.to_string_lossy()
        );
        return Ok(None);
    }
    let fds = sd_notify::listen_fds_with_names(true)
        .map_err(|e| Error::io("cannot take the sockets passed in LISTEN_FDS", e))?;
    let mut passed = Passed::default();
    for (fd, name) in fds {
        match adopt(fd, &name)? {
            Adopted::Stream(listener, kind) => passed.stream.push((listener, kind)),
            Adopted::Datagram(socket) => passed.datagram.push(socket),
        }
    }
    Ok((!passed.stream.is_empty() || !passed.datagram.is_empty()).then_some(passed))
}

/// Takes passed descriptor `fd`, checked to be a listening TCP socket or a bound UDP socket;
/// for TCP, `name` (systemd's `FileDescriptorName=`) selects its kind: `proxy` is tcp+proxy,
/// anything else (systemd's default is the socket unit's name) plain TCP.
fn adopt(fd: RawFd, name: &str) -> crate::Result<Adopted> {
    let what = format!("LISTEN_FDS descriptor {fd} (name '{name}')");
    let stat = nix::sys::stat::fstat(fd)
        .map_err(|e| Error::io(format!("cannot inspect {what}"), e.into()))?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(Error::Unsupported(format!("{what} is not a socket")));
    }
    // SAFETY: the service manager passed this descriptor to this process for it to own; it is
    // open (fstat succeeded), and sd-notify unset LISTEN_FDS, so nothing else takes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let socket = SockRef::from(&owned);
    let inspect = |e| Error::io(format!("cannot inspect {what}"), e);
    let socket_type = socket.r#type().map_err(inspect)?;
    let domain = socket.domain().map_err(inspect)?;
    let ip = domain == Domain::IPV4 || domain == Domain::IPV6;
    if socket_type == Type::DGRAM {
        if !ip || socket.protocol().map_err(inspect)? != Some(Protocol::UDP) {
            return Err(Error::Unsupported(format!(
                "{what} is a datagram socket but not UDP (multiecho serves UDP over IPv4 and IPv6)"
            )));
        }
        if matches!(name, "proxy" | "tls" | "tls+proxy") {
            return Err(Error::Unsupported(format!(
                "{what} is a UDP socket: the name '{name}' is for TCP sockets (a datagram \
                 socket is served as udp://, without PROXY headers or TLS)"
            )));
        }
        // The UDP loops expect blocking sockets, as `udp::bind` makes them. The receive buffer
        // is the service manager's (ReceiveBuffer=).
        socket.set_nonblocking(false).map_err(inspect)?;
        return Ok(Adopted::Datagram(UdpSocket::from(owned)));
    }
    if socket_type != Type::STREAM || !ip {
        return Err(Error::Unsupported(format!(
            "{what} is neither a TCP nor a UDP socket (multiecho serves TCP and UDP over IPv4 and IPv6)"
        )));
    }
    if !socket.is_listener().map_err(inspect)? {
        return Err(Error::Unsupported(format!(
            "{what} is a connection, not a listening socket: for Accept=yes sockets run \
             `multiecho serve --inetd`"
        )));
    }
    let kind = match name {
        "proxy" => ListenerKind::TcpProxy,
        "tls" => ListenerKind::Tls,
        "tls+proxy" => ListenerKind::TlsProxy,
        _ => ListenerKind::Tcp,
    };
    // The models expect blocking listeners and switch them themselves if they want.
    socket.set_nonblocking(false).map_err(inspect)?;
    Ok(Adopted::Stream(TcpListener::from(owned), kind))
}

/// Who to tell that the server is ready: the `--ready-fd` descriptor and the service manager's
/// `NOTIFY_SOCKET`, either or both or neither.
#[derive(Debug, Default)]
pub struct Readiness {
    ready_fd: Option<File>,
    notify: Option<UnixDatagram>,
}

impl Readiness {
    /// Takes descriptor `ready_fd` (checked to be open) and connects to `NOTIFY_SOCKET` if set.
    /// Call early, before anything else opens descriptors.
    pub fn new(ready_fd: Option<RawFd>) -> crate::Result<Self> {
        let ready_fd = ready_fd.map(take_ready_fd).transpose()?;
        let notify =
            match std::env::var_os("NOTIFY_SOCKET") {
                Some(path) => Some(connect_notify_socket(&path).map_err(|e| {
                    Error::io(format!("cannot connect to NOTIFY_SOCKET={path:?}"), e)
                })?),
                None => None,
            };
        Ok(Readiness { ready_fd, notify })
    }

    /// Makes SIGINT and SIGTERM send `STOPPING=1` to the service manager (if there is one),
    /// from this process only (not from forked children, which inherit the handler).
    pub fn notify_stopping_on_signals(&self) -> io::Result<()> {
        let Some(socket) = &self.notify else {
            return Ok(());
        };
        // The handler needs the socket for the rest of the process's life.
        let fd = OwnedFd::from(socket.try_clone()?);
        let fd: &'static OwnedFd = Box::leak(Box::new(fd));
        let main_pid = std::process::id() as libc::pid_t;
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // SAFETY: the action calls only getpid(2) and send(2), both async-signal-safe, on a
            // descriptor that is never closed; it allocates nothing.
            unsafe {
                signal_hook::low_level::register(signal, move || {
                    if libc::getpid() == main_pid {
                        let message = b"STOPPING=1\n";
                        libc::send(
                            fd.as_raw_fd(),
                            message.as_ptr().cast(),
                            message.len(),
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        );
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Every listener accepts now: writes one `KIND ADDR` line per listener to the ready
    /// descriptor, then `metrics ADDR` for the `--metrics` endpoint if there is one, closes it,
    /// and sends `READY=1`. A reader that went away is only a warning: the server serves anyway.
    pub fn announce(
        &mut self,
        listeners: &[(ListenerKind, SocketAddr)],
        metrics: Option<SocketAddr>,
    ) {
        if let Some(mut file) = self.ready_fd.take() {
            let mut lines: String = listeners
                .iter()
                .map(|(kind, addr)| format!("{kind} {addr}\n"))
                .collect();
            if let Some(addr) = metrics {
                lines.push_str(&format!("{METRICS_KIND} {addr}\n"));
            }
            if let Err(e) = file.write_all(lines.as_bytes()) {
                tracing::warn!("cannot write to --ready-fd: {e}");
            }
        }
        if let Some(socket) = &self.notify {
            if let Err(e) = socket.send(b"READY=1\n") {
                tracing::warn!("cannot notify the service manager (READY=1): {e}");
            }
        }
    }
}

/// `--ready-fd N`: the descriptor, which must be open; it is closed on exec from now on.
fn take_ready_fd(fd: RawFd) -> crate::Result<File> {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(|e| {
        Error::io(
            format!("--ready-fd {fd}: descriptor {fd} is not open"),
            e.into(),
        )
    })?;
    // SAFETY: the descriptor is open (fcntl succeeded) and was handed to this process for it to
    // own by the flag; nothing else in the process refers to it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A datagram socket connected to `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket.
fn connect_notify_socket(path: &std::ffi::OsStr) -> io::Result<UnixDatagram> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            socket.connect_addr(&std::os::unix::net::SocketAddr::from_abstract_name(name)?)?
        }
        None => socket.connect(path)?,
    }
    Ok(socket)
}

/// The parent's side of `--ready-fd` for a `multiecho serve` child: a pipe whose write end
/// becomes [`ReadyPipe::CHILD_FD`] in the child. Both ends are close-on-exec here, so no other
/// child inherits them.
#[derive(Debug)]
pub struct ReadyPipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl ReadyPipe {
    /// The descriptor number the write end gets in the child (`--ready-fd 3`).
    pub const CHILD_FD: RawFd = 3;

    /// A new pipe.
    pub fn new() -> io::Result<ReadyPipe> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(ReadyPipe { read, write })
    }

    /// Adds `--ready-fd 3` to `command` (after the `serve` arguments) and makes its child get
    /// the write end as descriptor 3.
    pub fn pass_to(&self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        let write = self.write.as_raw_fd();
        command.args(["--ready-fd", &Self::CHILD_FD.to_string()]);
        // SAFETY: the hook runs in the forked child before exec and calls only dup2 and fcntl,
        // which are async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(move || {
                // dup2 onto another number clears close-on-exec; onto itself it does not.
                let rc = if write == Self::CHILD_FD {
                    libc::fcntl(write, libc::F_SETFD, 0)
                } else {
                    libc::dup2(write, Self::CHILD_FD)
                };
                if rc < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Closes this process's write end (call after spawning, so the child's exit ends the pipe)
    /// and returns the read end.
    pub fn into_reader(self) -> File {
        drop(self.write);
        File::from(self.read)
    }
}

/// The word that starts the `--ready-fd` line of the metrics endpoint (HTTP, not an echo
/// listener).
pub const METRICS_KIND: &str = "metrics";

/// Parses the `KIND ADDR` lines a server wrote to its `--ready-fd`: its echo listeners (the
/// `metrics` line, if any, is not one of them).
pub fn parse_ready_lines(text: &str) -> Result<Vec<(ListenerKind, SocketAddr)>, String> {
    text.lines()
        .filter(|line| line.split(' ').next() != Some(METRICS_KIND))
        .map(|line| {
            let spec = line
                .split_once(' ')
                .map(|(kind, addr)| format!("{kind}://{addr}"))
                .ok_or_else(|| format!("bad --ready-fd line {line:?}"))?;
            let spec = crate::listen::parse(&spec)?;
            Ok((spec.kind, spec.addr))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_parse_back() {
        // The metrics endpoint's line is not an echo listener.
        let lines = "tcp 127.0.0.1:4000\ntcp+proxy [::1]:4001\nmetrics 127.0.0.1:9100\n";
        assert_eq!(
            parse_ready_lines(lines).unwrap(),
            vec![
                (ListenerKind::Tcp, "127.0.0.1:4000".parse().unwrap()),
                (ListenerKind::TcpProxy, "[::1]:4001".parse().unwrap()),
            ]
        );
        assert!(parse_ready_lines("listening on 127.0.0.1:4000").is_err());
        assert!(parse_ready_lines("tcp").is_err());
    }
}
