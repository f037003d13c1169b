//! Throwaway `redis-server` and `nats-server` processes, one per test.
//!
//! Each server gets a free loopback port and a temporary directory, is waited
//! for until it answers, and is killed when dropped — no shared fixed ports,
//! no pre-started services assumed (as redis-rs's own test suite does).
//!
//! ```no_run
//! let redis = nebulex_testkit::RedisServer::start()?;
//! assert_eq!(redis.command(&[b"PING"])?, "+PONG");
//! println!("{}", redis.url()); // redis://127.0.0.1:PORT/
//! # Ok::<(), std::io::Error>(())
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer after it is spawned.
const STARTUP: Duration = Duration::from_secs(10);

/// Finds a server binary on `PATH` or in the usual Debian places.
fn find_binary(name: &str) -> io::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("`{name}` not found: install it (Debian: apt-get install -y {name}) or run scripts/test"),
            )
        })
}

/// Whether the server binary is installed.
pub fn available(name: &str) -> bool {
    find_binary(name).is_ok()
}

/// A port no one listens on right now (the OS picks it).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()?.port())
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A process killed (and reaped) on drop.
struct Process {
    child: Option<Child>,
}

impl Process {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process, with `kill`.
    fn signal(&self, signal: &str) -> io::Result<()> {
        let child = self.child.as_ref().ok_or_else(|| io::Error::other("the process is not running"))?;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(child.id().to_string()).status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("kill -{signal} failed: {status}")))
        }
    }

    fn exited(&mut self) -> bool {
        self.child.as_mut().is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `ready` succeeds, the process dies, or the startup time passes.
fn wait_until(process: &mut Process, what: &str, mut ready: impl FnMut() -> bool) -> io::Result<()> {
    let deadline = Instant::now() + STARTUP;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        if process.exited() {
            return Err(io::Error::other(format!("{what} exited during startup")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("{what} did not answer within {STARTUP:?}")))
}

type Spawn<'a> = &'a dyn Fn(u16, &tempfile::TempDir) -> io::Result<Process>;

/// Spawns a server on a free port, trying a few ports: another process may
/// take one between our probe and the server's bind.
fn start_on_free_port(spawn: Spawn<'_>, what: &str) -> io::Result<(u16, tempfile::TempDir, Process)> {
    let dir = tempfile::tempdir()?;
    let mut last = None;
    for _ in 0..5 {
        let port = free_port()?;
        match spawn(port, &dir) {
            Ok(process) => return Ok((port, dir, process)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other(format!("{what} did not start"))))
}

/// Kills `process` and spawns the server again on the same port, retrying
/// while the old one releases it.
fn respawn(process: &mut Process, port: u16, dir: &tempfile::TempDir, spawn: Spawn<'_>) -> io::Result<()> {
    process.kill();
    let deadline = Instant::now() + STARTUP;
    loop {
        match spawn(port, dir) {
            Ok(new) => {
                *process = new;
                return Ok(());
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A throwaway `redis-server`.
pub struct RedisServer {
    port: u16,
    /// The TLS port, when started with [`RedisServer::start_tls`].
    tls_port: Option<u16>,
    dir: tempfile::TempDir,
    process: Process,
}

impl RedisServer {
    /// Starts one on a free loopback port and waits until it answers `PING`.
    pub fn start() -> io::Result<Self> {
        let (port, dir, process) = start_on_free_port(&|port, dir| Self::spawn(port, None, dir), "redis-server")?;
        Ok(RedisServer { port, tls_port: None, dir, process })
    }

    /// Starts one that also serves TLS on a second free port, with a
    /// self-signed certificate for `127.0.0.1` made by `openssl` in its
    /// temporary directory; [`RedisServer::tls_url`] reaches it.
    pub fn start_tls() -> io::Result<Self> {
        // A fresh TLS port on each try, as for the plain one.
        let tls_port = std::cell::Cell::new(0);
        let (port, dir, process) = start_on_free_port(
            &|port, dir| {
                self_signed_certificate(dir)?;
                tls_port.set(free_port()?);
                Self::spawn(port, Some(tls_port.get()), dir)
            },
            "redis-server (TLS)",
        )?;
        Ok(RedisServer { port, tls_port: Some(tls_port.get()), dir, process })
    }

    fn spawn(port: u16, tls_port: Option<u16>, dir: &tempfile::TempDir) -> io::Result<Process> {
        let mut command = Command::new(find_binary("redis-server")?);
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path());
        if let Some(tls_port) = tls_port {
            command.args(["--tls-port", &tls_port.to_string(), "--tls-auth-clients", "no"]);
            command.arg("--tls-cert-file").arg(dir.path().join(CERT_FILE));
            command.arg("--tls-key-file").arg(dir.path().join(KEY_FILE));
            command.arg("--tls-ca-cert-file").arg(dir.path().join(CERT_FILE));
        }
        let child = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let mut process = Process { child: Some(child) };
        wait_until(&mut process, "redis-server", || {
            resp(port, &[b"PING"]).is_ok_and(|r| r == "+PONG")
                && tls_port.is_none_or(|tls| TcpStream::connect_timeout(&addr(tls), Duration::from_secs(1)).is_ok())
        })?;
        Ok(process)
    }

    /// The server's URL: `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's TLS URL, `rediss://127.0.0.1:PORT/#insecure` (the
    /// certificate is self-signed), when started with
    /// [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|port| format!("rediss://127.0.0.1:{port}/#insecure"))
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one command and returns the first line of the reply
    /// (`+OK`, `:3`, `-ERR …`).
    pub fn command(&self, args: &[&[u8]]) -> io::Result<String> {
        resp(self.port, args)
    }

    /// Kills every Pub/Sub connection (`CLIENT KILL TYPE pubsub`); returns how many.
    pub fn kill_pubsub_clients(&self) -> io::Result<u64> {
        let reply = self.command(&[b"CLIENT", b"KILL", b"TYPE", b"pubsub"])?;
        reply.trim_start_matches(':').parse().map_err(|_| io::Error::other(format!("unexpected reply {reply}")))
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Freezes the server (`SIGSTOP`): its connections stay open, and
    /// nothing is answered or delivered until [`thaw`](Self::thaw).
    pub fn freeze(&self) -> io::Result<()> {
        self.process.signal("STOP")
    }

    /// Lets a frozen server run again (`SIGCONT`).
    pub fn thaw(&self) -> io::Result<()> {
        self.process.signal("CONT")
    }

    /// Kills the server and starts a new one on the same port (its data is lost).
    pub fn restart(&mut self) -> io::Result<()> {
        let tls_port = self.tls_port;
        respawn(&mut self.process, self.port, &self.dir, &|port, dir| Self::spawn(port, tls_port, dir))
    }
}

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// Writes a self-signed certificate and its key for `127.0.0.1` into `dir`
/// (once), with the `openssl` command.
fn self_signed_certificate(dir: &tempfile::TempDir) -> io::Result<()> {
    if dir.path().join(CERT_FILE).is_file() {
        return Ok(());
    }
    let status = Command::new(find_binary("openssl")?)
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.path().join(KEY_FILE))
        .arg("-out")
        .arg(dir.path().join(CERT_FILE))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("openssl could not make a certificate ({status})")))
    }
}

/// One RESP command over a fresh connection; the reply's first line.
fn resp(port: u16, args: &[&[u8]]) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr(port), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    stream.write_all(&out)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// A throwaway `nats-server` (core NATS, no JetStream).
pub struct NatsServer {
    port: u16,
    dir: tempfile::TempDir,
    process: Process,
    /// The user and password it requires, if any.
    user: Option<(String, String)>,
}

impl NatsServer {
    /// Starts one on a free loopback port and waits until it greets.
    pub fn start() -> io::Result<Self> {
        let (port, dir, process) = start_on_free_port(&|port, dir| Self::spawn(port, None, dir), "nats-server")?;
        Ok(NatsServer { port, dir, process, user: None })
    }

    /// [`start`](Self::start), requiring clients to log in as `user` with
    /// `password`.
    pub fn start_with_user(user: &str, password: &str) -> io::Result<Self> {
        let login = Some((user.to_string(), password.to_string()));
        let (port, dir, process) =
            start_on_free_port(&|port, dir| Self::spawn(port, login.as_ref(), dir), "nats-server")?;
        Ok(NatsServer { port, dir, process, user: login })
    }

    fn spawn(port: u16, user: Option<&(String, String)>, dir: &tempfile::TempDir) -> io::Result<Process> {
        let mut command = Command::new(find_binary("nats-server")?);
        command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
        if let Some((user, password)) = user {
            command.args(["--user", user, "--pass", password]);
        }
        let child = command.current_dir(dir.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let mut process = Process { child: Some(child) };
        wait_until(&mut process, "nats-server", || greets(port))?;
        Ok(process)
    }

    /// Freezes the server (`SIGSTOP`): its connections stay open, and it
    /// answers nothing, as a hung server or a lost route.
    pub fn freeze(&self) -> io::Result<()> {
        self.process.signal("STOP")
    }

    /// Lets a frozen server run again (`SIGCONT`).
    pub fn thaw(&self) -> io::Result<()> {
        self.process.signal("CONT")
    }

    /// The server's URL: `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Publishes raw bytes on `subject` from a fresh connection.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr(self.port), Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut info = String::new();
        reader.read_line(&mut info)?;
        stream.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")?;
        stream.write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())?;
        stream.write_all(payload)?;
        stream.write_all(b"\r\nPING\r\n")?;
        let mut pong = String::new();
        reader.read_line(&mut pong)?;
        if pong.starts_with("PONG") {
            Ok(())
        } else {
            Err(io::Error::other(format!("unexpected reply {}", pong.trim_end())))
        }
    }

    /// Kills the server.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Kills the server and starts a new one on the same port.
    pub fn restart(&mut self) -> io::Result<()> {
        let user = self.user.clone();
        respawn(&mut self.process, self.port, &self.dir, &|port, dir| Self::spawn(port, user.as_ref(), dir))
    }
}

fn greets(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr(port), Duration::from_millis(200)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).is_ok() && &buf == b"INFO"
}
