//! The server's TLS, set up once at start: the certificate chain and key (`--tls-cert`,
//! `--tls-key`, PEM) or a self-signed certificate made for this run, client verification for
//! mutual TLS (`--tls-client-ca`), the rustls `ServerConfig` every connection shares, the
//! handshake timeout, and the cap on handshakes in progress ([`HandshakeCap`]).
//!
//! Every problem with the files is found here, before the server listens, and becomes one
//! line naming the file and what is wrong with it (missing, unreadable, not PEM, no
//! certificate or key in it, a key that does not belong to the certificate); an expired
//! certificate, or one not valid yet, is served with a warning (a lab may want exactly that).
//!
//! Without `--tls-cert`, rcgen makes an ECDSA P-256 certificate for `localhost`, 127.0.0.1,
//! ::1 and the listen addresses (and the host name, for a wildcard listener) at start, and the
//! log shows its SHA-256 fingerprint, as ncat does for its temporary key, so a client can pin
//! it (`openssl s_client` prints the same fingerprint).

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::server::conn::shared_mem::SharedMutex;
use crate::wake::{poll_readable, Wake};

/// The default `--tls-handshake-timeout`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The default `--tls-max-handshakes`: far more handshakes than the cores can compute at
/// once (an ECDSA P-256 handshake costs well under a millisecond of CPU), so the cap only
/// bites on a flood or on clients that stall mid-handshake.
pub const DEFAULT_MAX_HANDSHAKES: usize = 256;

/// What the command line says about TLS (`serve`'s TLS flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsOptions {
    /// The certificate chain (PEM, leaf first); `None`: a self-signed one.
    pub cert: Option<PathBuf>,
    /// The private key of the leaf (PEM: PKCS#8, RSA or SEC1).
    pub key: Option<PathBuf>,
    /// Require client certificates issued by these CAs (PEM).
    pub client_ca: Option<PathBuf>,
    /// A connection that has not finished its handshake this long after admission is closed.
    pub handshake_timeout: Duration,
    /// At most this many handshakes in progress at once, across the server's processes.
    pub max_handshakes: usize,
}

impl Default for TlsOptions {
    fn default() -> Self {
        TlsOptions {
            cert: None,
            key: None,
            client_ca: None,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
        }
    }
}

/// The server's TLS: shared by every connection, every worker and (set up before any fork)
/// every process.
pub struct TlsServer {
    config: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    handshakes: Arc<HandshakeCap>,
    fingerprint: String,
    client_auth: bool,
}

impl fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsServer")
            .field("fingerprint", &self.fingerprint)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("handshakes", &self.handshakes)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl TlsServer {
    /// Loads (or makes) the certificate and builds the configuration. `hosts` are the listen
    /// addresses, named in a self-signed certificate. Logs the certificate's fingerprint.
    pub fn new(options: &TlsOptions, hosts: &[IpAddr]) -> crate::Result<TlsServer> {
        let fail = |message: String| crate::Error::Tls(message);
        let (chain, key, origin) = match (&options.cert, &options.key) {
            (Some(cert), Some(key)) => {
                let chain = load_certificates(cert, "--tls-cert").map_err(fail)?;
                let key = load_key(key).map_err(fail)?;
                (
                    chain,
                    key,
                    Origin::Files(cert.clone(), options.key.clone().unwrap()),
                )
            }
            (None, None) => {
                let (chain, key, names) = self_signed(hosts).map_err(fail)?;
                (chain, key, Origin::SelfSigned(names))
            }
            (Some(_), None) => {
                return Err(fail(
                    "--tls-cert needs --tls-key (the certificate's private key)".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(fail(
                    "--tls-key needs --tls-cert (the certificate it belongs to)".into(),
                ))
            }
        };
        let fingerprint = super::sha256_fingerprint(chain[0].as_ref());
        if let Origin::Files(cert, _) = &origin {
            warn_if_out_of_date(cert, &chain[0]);
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| fail(format!("cannot set up TLS: {e}")))?;
        let builder = match &options.client_ca {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for ca in load_certificates(path, "--tls-client-ca").map_err(fail)? {
                    roots.add(ca).map_err(|e| {
                        fail(format!(
                            "cannot use {} as a client CA (--tls-client-ca): {e}",
                            path.display()
                        ))
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| {
                    fail(format!(
                        "cannot verify client certificates with {}: {e}",
                        path.display()
                    ))
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| match &origin {
                Origin::Files(cert, key) => fail(format!(
                    "cannot serve the certificate {} with the key {}: {}",
                    cert.display(),
                    key.display(),
                    describe_key_error(&e)
                )),
                Origin::SelfSigned(_) => {
                    fail(format!("cannot use the self-signed certificate: {e}"))
                }
            })?;
        match &origin {
            Origin::Files(cert, _) => tracing::info!(
                certificate = %cert.display(),
                sha256 = %fingerprint,
                "serving TLS"
            ),
            Origin::SelfSigned(names) => tracing::info!(
                sha256 = %fingerprint,
                "no --tls-cert: serving a temporary self-signed certificate for {}",
                names.join(", ")
            ),
        }
        let handshakes = HandshakeCap::new(options.max_handshakes)
            .map_err(|e| crate::Error::io("cannot set up the handshake cap", e))?;
        Ok(TlsServer {
            config: Arc::new(config),
            handshake_timeout: options.handshake_timeout,
            handshakes: Arc::new(handshakes),
            fingerprint,
            client_auth: options.client_ca.is_some(),
        })
    }

    /// The rustls configuration every connection is made from.
    pub fn config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }

    /// A new server-side rustls connection.
    pub fn connection(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(Arc::clone(&self.config))
    }

    /// How long a connection may take, from admission (after its PROXY header, if any) to the
    /// end of its handshake, waiting for a handshake slot included.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// The cap on handshakes in progress: take a permit before starting one.
    pub fn handshakes(&self) -> &Arc<HandshakeCap> {
        &self.handshakes
    }

    /// The SHA-256 fingerprint of the certificate served (colon-separated hex, as OpenSSL's).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Whether clients must present a certificate (`--tls-client-ca`).
    pub fn requires_client_certificate(&self) -> bool {
        self.client_auth
    }
}

/// Where the certificate came from, for messages.
enum Origin {
    Files(PathBuf, PathBuf),
    SelfSigned(Vec<String>),
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// Every certificate in a PEM file, in order (a chain: leaf first).
fn load_certificates(path: &Path, flag: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(path, &format!("the certificate file ({flag})"))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot parse {} ({flag}): {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "no certificate in {} ({flag}): expected PEM \"BEGIN CERTIFICATE\" blocks",
            path.display()
        ));
    }
    Ok(certificates)
}

/// The first private key in a PEM file: PKCS#8, RSA (PKCS#1) or SEC1 (EC).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file(path, "the key file (--tls-key)")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            let encrypted = String::from_utf8_lossy(&pem).contains("ENCRYPTED PRIVATE KEY");
            format!(
                "no private key in {} (--tls-key): expected a PEM PKCS#8, RSA or EC private key{}",
                path.display(),
                if encrypted {
                    "; it is encrypted: decrypt it first (openssl pkey -in KEY -out PLAIN)"
                } else {
                    ""
                }
            )
        }
        e => format!("cannot parse {} (--tls-key): {e}", path.display()),
    })
}

fn describe_key_error(error: &rustls::Error) -> String {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the key does not belong to the certificate".into()
        }
        other => other.to_string(),
    }
}

/// A certificate for `localhost`, the loopback addresses, the listen addresses and, for a
/// wildcard listener, this machine's host name; and the names it carries.
#[allow(clippy::type_complexity)]
fn self_signed(
    hosts: &[IpAddr],
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        Vec<String>,
    ),
    String,
> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for host in hosts {
        let name = if host.is_unspecified() {
            match std::fs::read_to_string("/proc/sys/kernel/hostname") {
                // Only a name a certificate can carry (letters, digits, '-', '.').
                Ok(name)
                    if name
                        .trim()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.') =>
                {
                    name.trim().to_string()
                }
                _ => continue,
            }
        } else {
            host.to_string()
        };
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    let mut params = rcgen::CertificateParams::new(names.clone())
        .map_err(|e| format!("cannot make a self-signed certificate for {names:?}: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "multiecho self-signed");
    let key = rcgen::KeyPair::generate()
        .map_err(|e| format!("cannot make a key for the self-signed certificate: {e}"))?;
    let certificate = params
        .self_signed(&key)
        .map_err(|e| format!("cannot make a self-signed certificate: {e}"))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok((vec![certificate.der().clone()], key, names))
}

/// Warns when the leaf certificate has expired or is not valid yet: served anyway (a lab may
/// want exactly that), but most clients will refuse it.
fn warn_if_out_of_date(path: &Path, leaf: &CertificateDer<'_>) {
    let Some(validity) = super::validity::of(leaf.as_ref()) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    if now > validity.not_after {
        tracing::warn!(
            "the TLS certificate {} expired on {}: clients that check dates will refuse it",
            path.display(),
            super::validity::date(validity.not_after)
        );
    } else if now < validity.not_before {
        tracing::warn!(
            "the TLS certificate {} is not valid before {}: clients that check dates will refuse it",
            path.display(),
            super::validity::date(validity.not_before)
        );
    }
}

/// How long a waiter sleeps at most before looking at the cap again, in case a wake-up went to
/// another waiter that then found no room (wake-ups are a hint, the count is the truth).
const CAP_RECHECK: Duration = Duration::from_millis(50);

/// The largest `--tls-max-handshakes`: the size of the cap's table of holders.
pub const MAX_HANDSHAKES_LIMIT: usize = 4096;

/// How often a full cap looks for permits held by processes that died (a fork model's child
/// killed mid-handshake never gives its permit back): at most this often, as each look is a
/// system call per holder.
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

/// Who holds the cap's permits: a slot per permit with the holding process's id (0: free).
/// Threads of one process share an id; a process that died frees all of its slots at once.
#[derive(Clone, Copy)]
struct Holders {
    in_progress: u64,
    /// When the cap last looked for dead holders, in ms since the cap was made, plus one.
    reclaimed_at: u64,
    pids: [u32; MAX_HANDSHAKES_LIMIT],
}

// SAFETY: integers only: all-zero bytes are a valid `Holders` (no permit held) with no pointer.
unsafe impl crate::server::conn::shared_mem::Zeroable for Holders {}

/// A cap on TLS handshakes in progress, shared by the server's threads and (mapped before any
/// fork) processes: a model takes a [`HandshakePermit`] before it starts a handshake and drops
/// it when the handshake ends, so a flood of handshakes (or of clients that stall in one)
/// cannot take every core from established connections. Beyond the cap, new connections wait
/// (their handshake timeout running) for a permit. Each permit records its process, so that a
/// full cap takes back the permits of processes that died holding them.
pub struct HandshakeCap {
    max: usize,
    holders: SharedMutex<Holders>,
    /// Readable after a permit of a full cap was given back.
    room: Wake,
    epoch: Instant,
}

impl fmt::Debug for HandshakeCap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandshakeCap")
            .field("max", &self.max)
            .field("in_progress", &self.in_progress())
            .finish()
    }
}

impl HandshakeCap {
    /// A cap of `max` handshakes at once (at least one, at most [`MAX_HANDSHAKES_LIMIT`]).
    pub fn new(max: usize) -> io::Result<HandshakeCap> {
        Ok(HandshakeCap {
            max: max.clamp(1, MAX_HANDSHAKES_LIMIT),
            holders: SharedMutex::new_zeroed()?,
            room: Wake::new()?,
            epoch: Instant::now(),
        })
    }

    /// The cap.
    pub fn max(&self) -> u64 {
        self.max as u64
    }

    /// Handshakes in progress now.
    pub fn in_progress(&self) -> u64 {
        self.holders.lock().in_progress
    }

    /// A permit, if the cap has room.
    pub fn try_acquire(self: &Arc<Self>) -> Option<HandshakePermit> {
        let mut holders = self.holders.lock();
        if holders.in_progress >= self.max as u64 && !self.reclaim_dead(&mut holders) {
            return None;
        }
        let slot = holders.pids[..self.max].iter().position(|&pid| pid == 0)?;
        holders.pids[slot] = std::process::id();
        holders.in_progress += 1;
        Some(HandshakePermit {
            cap: Arc::clone(self),
            slot,
        })
    }

    /// Frees the slots of holders that no longer exist, at most every [`RECLAIM_EVERY`];
    /// returns whether any was freed.
    fn reclaim_dead(&self, holders: &mut Holders) -> bool {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let every = RECLAIM_EVERY.as_millis() as u64;
        if holders.reclaimed_at != 0 && now < holders.reclaimed_at.saturating_add(every) {
            return false;
        }
        holders.reclaimed_at = now;
        let me = std::process::id();
        let mut freed = 0;
        for pid in holders.pids[..self.max].iter_mut() {
            if *pid != 0 && *pid != me && !process_exists(*pid) {
                *pid = 0;
                freed += 1;
            }
        }
        holders.in_progress = holders.in_progress.saturating_sub(freed);
        if freed > 0 {
            tracing::warn!(
                freed,
                "took back TLS handshake permits held by processes that died mid-handshake"
            );
        }
        freed > 0
    }

    /// A permit, waiting for one until `deadline` (blocking models); `None` at the deadline.
    pub fn acquire_until(self: &Arc<Self>, deadline: Instant) -> Option<HandshakePermit> {
        loop {
            if let Some(permit) = self.try_acquire() {
                return Some(permit);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            if poll_readable(&[self.room.as_fd()], Some(left.min(CAP_RECHECK)))
                .is_ok_and(|ready| ready[0])
            {
                self.room.drain();
            }
        }
    }

    /// Readable after a full cap got a permit back: an event loop waiting for room watches it
    /// (and calls [`HandshakeCap::clear_room_signal`] before trying again; a waiter should
    /// also retry every few tens of milliseconds, as another waiter may have taken the room).
    pub fn room_fd(&self) -> BorrowedFd<'_> {
        self.room.as_fd()
    }

    /// Consumes the room signal.
    pub fn clear_room_signal(&self) {
        self.room.drain();
    }

    fn release(&self, slot: usize) {
        let mut holders = self.holders.lock();
        // A slot taken back from a dead process is free already (and maybe someone else's).
        if holders.pids[slot] != std::process::id() {
            return;
        }
        let was_full = holders.in_progress >= self.max as u64;
        holders.pids[slot] = 0;
        holders.in_progress = holders.in_progress.saturating_sub(1);
        drop(holders);
        if was_full {
            self.room.wake();
        }
    }
}

/// Whether process `pid` exists (a zombie not yet reaped still does).
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// One handshake in progress under a [`HandshakeCap`]; given back on drop.
#[derive(Debug)]
pub struct HandshakePermit {
    cap: Arc<HandshakeCap>,
    slot: usize,
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.cap.release(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("multiecho-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn options(cert: &Path, key: &Path) -> TlsOptions {
        TlsOptions {
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            ..TlsOptions::default()
        }
    }

    fn error(options: &TlsOptions) -> String {
        let e = TlsServer::new(options, &[]).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn self_signed_names_the_hosts() {
        let host: IpAddr = "127.0.0.9".parse().unwrap();
        let (chain, _, names) = self_signed(&[host]).unwrap();
        assert_eq!(chain.len(), 1);
        assert_eq!(names, ["localhost", "127.0.0.1", "::1", "127.0.0.9"]);
        let tls = TlsServer::new(&TlsOptions::default(), &[host]).unwrap();
        assert_eq!(tls.fingerprint().len(), 95);
    }

    #[test]
    fn file_problems_are_one_clear_line() {
        let dir = temp_dir("files");
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let cert = write(&dir, "cert.pem", &made.cert.pem());
        let key = write(&dir, "key.pem", &made.signing_key.serialize_pem());
        let wrong_key = write(&dir, "other.pem", &other.serialize_pem());
        let garbage = write(&dir, "garbage.pem", "hello\n");
        let truncated = write(&dir, "truncated.pem", "-----BEGIN CERTIFICATE-----\nMIIB\n");
        assert!(TlsServer::new(&options(&cert, &key), &[]).is_ok());

        let missing = dir.join("missing.pem");
        let e = error(&options(&missing, &key));
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        let e = error(&options(&cert, &wrong_key));
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let e = error(&options(&garbage, &key));
        assert!(e.contains("no certificate in"), "{e}");
        let e = error(&options(&truncated, &key));
        assert!(
            e.contains("cannot parse") && e.contains("truncated.pem"),
            "{e}"
        );
        let e = error(&options(&cert, &garbage));
        assert!(e.contains("no private key in"), "{e}");
        let e = error(&TlsOptions {
            key: None,
            ..options(&cert, &key)
        });
        assert!(e.contains("--tls-cert needs --tls-key"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cap_counts_permits_and_signals_room() {
        let cap = Arc::new(HandshakeCap::new(2).unwrap());
        let a = cap.try_acquire().unwrap();
        let _b = cap.try_acquire().unwrap();
        assert!(cap.try_acquire().is_none());
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(cap.acquire_until(soon).is_none(), "full until the deadline");
        drop(a);
        assert!(poll_readable(&[cap.room_fd()], Some(Duration::ZERO)).unwrap()[0]);
        let c = cap.acquire_until(Instant::now() + Duration::from_secs(1));
        assert!(c.is_some());
        assert_eq!(cap.in_progress(), 2);
    }

    #[test]
    fn a_full_cap_takes_back_the_permits_of_dead_processes() {
        let cap = Arc::new(HandshakeCap::new(1).unwrap());
        // A process that died holding a permit (its drop never ran): its id stands in the
        // shared table as its permit left it.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        {
            let mut holders = cap.holders.lock();
            holders.pids[0] = dead;
            holders.in_progress = 1;
        }
        assert_eq!(cap.in_progress(), 1);
        let permit = cap
            .try_acquire()
            .expect("the dead holder's permit is taken back");
        assert_eq!(cap.in_progress(), 1);
        assert!(
            cap.try_acquire().is_none(),
            "a live holder keeps its permit"
        );
        drop(permit);
        assert_eq!(cap.in_progress(), 0);
    }
}
