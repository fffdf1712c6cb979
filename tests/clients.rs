//! `multiecho client` (line client) and `multiecho client --split`, run as subprocesses with
//! piped stdin and stdout: exact output, echoes that arrive in small pieces, half-close,
//! servers that close early, refused connections, and the split client not waiting for
//! echoes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use common::{assert_same, ServerBuilder, BIN, PATIENCE};

/// The two clients, as the extra arguments that select them.
const CLIENTS: [(&str, &[&str]); 2] = [("line", &[]), ("split", &["--split"])];

fn spawn_client(addr: &str, extra: &[&str]) -> Child {
    Command::new(BIN)
        .arg("client")
        .args(extra)
        .arg(addr)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multiecho client")
}

/// Runs a client with `input` on stdin (then end of input) and returns its output; kills it
/// and fails if it takes longer than the test patience.
fn run_client(addr: &str, extra: &[&str], input: &[u8]) -> Output {
    let mut child = spawn_client(addr, extra);
    let stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = thread::spawn(move || {
        let mut stdin = stdin;
        // The client may exit early (that is what some tests check): ignore EPIPE.
        let _ = stdin.write_all(&input);
    });
    let output = wait_with_deadline(child);
    feeder.join().unwrap();
    output
}

/// Collects stdout and stderr while waiting for the child, killing it after the patience.
fn wait_with_deadline(mut child: Child) -> Output {
    let stdout = child.stdout.take().map(read_in_background);
    let stderr = child.stderr.take().map(read_in_background);
    let status = common::wait_or_kill(&mut child, "the client");
    Output {
        status,
        stdout: stdout.map(|s| s.join().unwrap()).unwrap_or_default(),
        stderr: stderr.map(|s| s.join().unwrap()).unwrap_or_default(),
    }
}

fn read_in_background(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn assert_clean_exit(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "{what}: exit {:?}, stderr: {}",
        output.status,
        stderr_of(output)
    );
}

/// A test server on a free loopback port: each connection is handled by `handler` on its
/// own thread. The listener thread lives as long as the test process.
fn test_server(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            stream.set_nodelay(true).unwrap();
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            let handler = Arc::clone(&handler);
            thread::spawn(move || handler(stream));
        }
    });
    addr
}

/// Echoes in pieces of 1 to 5 bytes with a pause between them, so the client's reads return
/// parts of a line.
fn dribbling_echo(mut stream: TcpStream) {
    let mut buf = [0u8; 256];
    let mut piece_len = 1;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for piece in buf[..n].chunks(piece_len) {
            if stream.write_all(piece).is_err() {
                return;
            }
            thread::sleep(Duration::from_micros(300));
        }
        piece_len = piece_len % 5 + 1;
    }
}

/// Echoes nothing until it has received three lines, then echoes as usual. Reports the
/// number of lines received so far each time it grows.
fn echo_after_three_lines(mut stream: TcpStream, lines_received: &mpsc::Sender<usize>) {
    let mut held = Vec::new();
    let mut buf = [0u8; 4096];
    let mut lines = 0;
    while lines < 3 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => held.extend_from_slice(&buf[..n]),
        }
        let now = held.iter().filter(|&&b| b == b'\n').count();
        if now > lines {
            lines = now;
            let _ = lines_received.send(lines);
        }
    }
    if stream.write_all(&held).is_err() {
        return;
    }
    plain_echo(stream);
}

fn plain_echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Echoes until the client half-closes, then says goodbye and closes.
fn echo_then_goodbye(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.write_all(b"bye\n");
}

/// Reads one line, echoes only its first half and closes (cleanly: nothing left unread).
fn echo_half_a_line_and_close(mut stream: TcpStream) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => break,
            Ok(_) => line.push(byte[0]),
        }
    }
    let _ = stream.write_all(&line[..line.len() / 2]);
}

/// Reads everything until the client half-closes, echoes only half of it and closes.
fn echo_half_of_everything(mut stream: TcpStream) {
    let mut all = Vec::new();
    if stream.read_to_end(&mut all).is_err() {
        return;
    }
    let _ = stream.write_all(&all[..all.len() / 2]);
}

/// Echoes one line and closes, without waiting for the client to half-close.
fn echo_one_line_and_close(mut stream: TcpStream) {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) | Err(_) => return,
            Ok(_) => line.push(byte[0]),
        }
    }
    let _ = stream.write_all(&line);
}

/// About 1 MiB of random bytes (newlines, NULs, invalid UTF-8 included), with a 200 KiB line
/// in the middle and a last line without a newline.
fn binary_input() -> Vec<u8> {
    let mut input = multiecho::payload::bytes(7, 512 * 1024);
    input.push(b'\n');
    input.extend(std::iter::repeat_n(b'x', 200 * 1024));
    input.push(b'\n');
    input.extend(multiecho::payload::bytes(8, 300 * 1024));
    if input.last() == Some(&b'\n') {
        input.push(b'!');
    }
    input
}

#[test]
fn line_client_prints_exactly_the_echo() {
    let server = ServerBuilder::new("thread").start();
    let output = run_client(&server.addr.to_string(), &[], b"hi\n");
    assert_clean_exit(&output, "printf 'hi\\n' | multiecho client");
    assert_eq!(output.stdout, b"hi\n");
}

#[test]
fn both_clients_echo_a_binary_mebibyte_exactly() {
    let server = ServerBuilder::new("thread").start();
    let input = binary_input();
    for (name, extra) in CLIENTS {
        let output = run_client(&server.addr.to_string(), extra, &input);
        assert_clean_exit(&output, name);
        assert_same(&output.stdout, &input, &format!("{name} client output"));
    }
}

#[test]
fn both_clients_reassemble_echoes_that_arrive_in_pieces() {
    let addr = test_server(dribbling_echo).to_string();
    let mut input = Vec::new();
    for i in 0..40 {
        input.extend(format!("line {i}: {}\n", "abcdefgh".repeat(i % 7)).as_bytes());
    }
    input.extend(b"last line without a newline");
    for (name, extra) in CLIENTS {
        let output = run_client(&addr, extra, &input);
        assert_clean_exit(&output, name);
        assert_same(&output.stdout, &input, &format!("{name} client output"));
    }
}

#[test]
fn both_clients_half_close_and_print_what_follows() {
    let addr = test_server(echo_then_goodbye).to_string();
    for (name, extra) in CLIENTS {
        let output = run_client(&addr, extra, b"one\ntwo\n");
        assert_clean_exit(&output, name);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "one\ntwo\nbye\n",
            "{name} client"
        );
    }
}

#[test]
fn both_clients_report_a_refused_connection_in_one_line() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    for (name, extra) in CLIENTS {
        let output = run_client(&addr, extra, b"hi\n");
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{name} client succeeded");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(&addr), "{name}: {stderr}");
        assert!(stderr.contains("cannot connect"), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(output.stdout.is_empty(), "{name} printed to stdout");
    }
}

/// `client HOST PORT`, as nc takes it, gets one line pointing at `HOST:PORT`, for both clients.
#[test]
fn both_clients_point_nc_style_host_port_at_host_colon_port() {
    for (name, extra) in CLIENTS {
        let output = Command::new(BIN)
            .arg("client")
            .args(extra)
            .args(["127.0.0.1", "4000"])
            .stdin(Stdio::null())
            .output()
            .expect("run multiecho client");
        let stderr = stderr_of(&output);
        assert!(!output.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains("`multiecho client 127.0.0.1:4000`"),
            "{name}: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(output.stdout.is_empty(), "{name}");
    }
}

#[test]
fn line_client_reports_an_echo_cut_short() {
    let addr = test_server(echo_half_a_line_and_close).to_string();
    let output = run_client(&addr, &[], b"0123456789\nnever sent\n");
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "succeeded; stderr: {stderr}");
    assert_eq!(output.stdout, b"01234", "prints what did come back");
    assert!(stderr.contains("6 of the 11 bytes"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

#[test]
fn split_client_reports_an_echo_cut_short() {
    let addr = test_server(echo_half_of_everything).to_string();
    let output = run_client(&addr, &["--split"], b"0123456789\nabcdefgh\n");
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "succeeded; stderr: {stderr}");
    assert_eq!(output.stdout, b"0123456789");
    assert!(stderr.contains("10 of the 20 bytes"), "{stderr}");
}

/// The server closes right after echoing the one line it got, and the input ends just after
/// (stdin is closed once the echo is printed): the input did end, everything came back, so
/// the split client must not report that the server closed "before the input ended".
#[test]
fn split_client_accepts_a_server_closing_as_the_input_ends() {
    let addr = test_server(echo_one_line_and_close).to_string();
    let mut child = spawn_client(&addr, &["--split"]);
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    let mut echo = [0u8; 6];
    stdout.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello\n");
    drop(stdin);
    let output = wait_with_deadline(child);
    assert_clean_exit(&output, "split client");
}

/// The server closes after one line while the terminal's input goes on (nothing ends it):
/// the split client says so, in one line, and exits non-zero without waiting for more input.
#[test]
fn split_client_reports_a_server_closing_before_the_input_ends() {
    let addr = test_server(echo_one_line_and_close);
    let output = run_client_at_terminal(addr, &["--split"], b"hello\n");
    let stderr = stderr_of(&output);
    assert!(!output.status.success(), "succeeded; stderr: {stderr}");
    assert_eq!(output.stdout, b"hello\n");
    assert!(
        stderr.contains("closed the connection before the input ended"),
        "{stderr}"
    );
}

#[test]
fn split_client_treats_q_as_data_when_stdin_is_not_a_terminal() {
    let server = ServerBuilder::new("thread").start();
    let input = b"q\nQ\nstill here\n";
    let output = run_client(&server.addr.to_string(), &["--split"], input);
    assert_clean_exit(&output, "split client");
    assert_eq!(output.stdout, input);
}

/// The server answers only once three lines are in. The test types each line only after the
/// server has received the previous one, and keeps stdin open: the split client gets through
/// because it sends without waiting for echoes. (The line client would send the first line
/// and wait for its echo forever.)
#[test]
fn split_client_sends_without_waiting_for_the_echo() {
    let (tx, lines_received) = mpsc::channel();
    let addr = test_server(move |stream| echo_after_three_lines(stream, &tx)).to_string();
    let mut child = spawn_client(&addr, &["--split"]);
    let mut stdin: ChildStdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();

    for (count, line) in [(1, "one\n"), (2, "two\n"), (3, "three\n")] {
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.flush().unwrap();
        if lines_received.recv_timeout(PATIENCE) != Ok(count) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not receive line {count}: the split client waited");
        }
    }

    let want = b"one\ntwo\nthree\n";
    let (tx, rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut stdout = stdout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        while seen.len() < want.len() {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        let _ = tx.send(seen);
        stdout
    });
    let Ok(seen) = rx.recv_timeout(PATIENCE) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no echo printed while stdin was open");
    };
    assert_eq!(seen, want, "echo while stdin is still open");

    // Now end the input: the client half-closes, the server closes, the client exits 0.
    stdin.write_all(b"four\n").unwrap();
    drop(stdin);
    let mut stdout = reader.join().unwrap();
    let mut rest = Vec::new();
    stdout.read_to_end(&mut rest).unwrap();
    let output = wait_with_deadline(child);
    assert_clean_exit(&output, "split client");
    assert_eq!(rest, b"four\n");
}

/// `multiecho client ... | head -c 10`: a closed stdout is a normal end, not an error.
#[test]
fn both_clients_end_quietly_when_stdout_closes() {
    let server = ServerBuilder::new("thread").start();
    let input = binary_input();
    for (name, extra) in CLIENTS {
        let mut child = spawn_client(&server.addr.to_string(), extra);
        let mut stdin = child.stdin.take().unwrap();
        let input = input.clone();
        let feeder = thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 10];
        stdout.read_exact(&mut first).unwrap();
        drop(stdout);
        let output = wait_with_deadline(child);
        feeder.join().unwrap();
        assert_clean_exit(&output, name);
        assert!(output.stderr.is_empty(), "{name}: {}", stderr_of(&output));
    }
}

/// A new pseudo-terminal: the master (what a person types into, and sees the terminal's echo
/// of) and the slave (the client's stdin).
fn open_pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the integers passed; the name, termios
    // and window size pointers may be null (the kernel's default termios: canonical mode,
    // Ctrl-D as end of file).
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(master)),
            OwnedFd::from_raw_fd(slave),
        )
    }
}

/// Runs a client with a pseudo-terminal as stdin, "types" `typed` into it all at once, and
/// returns the client's output (killing it and failing if it does not exit in time).
fn run_client_at_terminal(addr: SocketAddr, extra: &[&str], typed: &[u8]) -> Output {
    let (mut master, slave) = open_pty();
    let child = Command::new(BIN)
        .arg("client")
        .args(extra)
        .arg(addr.to_string())
        .stdin(Stdio::from(slave))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn multiecho client");
    // The terminal echoes what is typed back to the master side; drain it so it never fills.
    let mut typed_echo = master.try_clone().unwrap();
    thread::spawn(move || {
        let mut sink = [0u8; 1024];
        while matches!(typed_echo.read(&mut sink), Ok(n) if n > 0) {}
    });
    master.write_all(typed).unwrap();
    let output = wait_with_deadline(child);
    drop(master);
    output
}

/// At a terminal, a line `q` ends the split client's input: it half-closes, prints the rest
/// of the echo and exits 0. The terminal is a pseudo-terminal made for the test.
#[test]
fn split_client_ends_on_q_at_a_terminal() {
    let server = ServerBuilder::new("thread").start();
    let output = run_client_at_terminal(server.addr, &["--split"], b"hello\nq\nnot sent\n");
    assert_clean_exit(&output, "split client at a terminal");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "hello\n");
}

/// Ctrl-D pressed once at the start of a line ends either client at a terminal, as the
/// prompt says. Nothing is typed after it, so a client that reads the terminal again after
/// end of input waits until the deadline and fails the test.
#[test]
fn both_clients_end_on_one_ctrl_d_at_a_terminal() {
    let server = ServerBuilder::new("thread").start();
    for (name, extra) in CLIENTS {
        let output = run_client_at_terminal(server.addr, extra, b"hello\nworld\n\x04");
        assert_clean_exit(&output, name);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "hello\nworld\n",
            "{name}"
        );
        assert!(
            output.stderr.ends_with(b"to finish\n"),
            "{name}: {}",
            stderr_of(&output)
        );
    }
}

/// Ctrl-D pressed once after a partial line sends that partial line and ends either client
/// (the terminal hands the partial line over without a newline; `cat` would wait for a
/// second Ctrl-D).
#[test]
fn both_clients_end_on_one_ctrl_d_after_a_partial_line() {
    let server = ServerBuilder::new("thread").start();
    for (name, extra) in CLIENTS {
        let output = run_client_at_terminal(server.addr, extra, b"hello\npartial\x04");
        assert_clean_exit(&output, name);
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "hello\npartial",
            "{name}"
        );
    }
}
