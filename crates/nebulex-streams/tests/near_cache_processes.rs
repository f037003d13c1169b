//! The README's two-process walk-through, as a user runs it: the
//! `near_cache` example started twice (`--node a`, `--node b`) against one
//! throwaway `redis-server`, driven through stdin. A write on one process
//! must remove the other's cached copy, which then reloads the new value.
//! Every wait has a deadline; output is read line by line as it comes.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nebulex_testkit::RedisServer;

/// The longest any single wait may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// The example's binary, built for this test's profile with the features of
/// the project's test command (`--workspace --all-features`: nearly free
/// when that command has built the examples already).
fn example_binary() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "--workspace", "--all-features", "--example", "near_cache", "--manifest-path"])
        .arg(&manifest);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build --example near_cache");
    assert!(status.success(), "cargo build --example near_cache failed");
    // target/PROFILE/deps/this-test -> target/PROFILE/examples/near_cache
    let this = std::env::current_exe().unwrap();
    let profile = this.parent().and_then(|deps| deps.parent()).expect("a target profile directory");
    profile.join("examples").join("near_cache")
}

/// One `near_cache --node NAME` process; killed when dropped.
struct Node {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: Receiver<String>,
    /// Every stdout line read so far, for failure messages.
    seen: Vec<String>,
}

impl Node {
    fn start(binary: &PathBuf, name: &'static str, redis_url: &str) -> Node {
        let mut child = Command::new(binary)
            .args(["--node", name])
            .env("NBX_REDIS_URL", redis_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the near_cache example");
        let stdin = child.stdin.take().unwrap();
        let (tx, stdout) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Node { name, child, stdin, stdout, seen: Vec::new() }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Reads lines until one satisfies `wanted`, skipping the others (the
    /// other node's events, printed as they come); panics at the deadline.
    fn expect(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("node {}: waited {PATIENCE:?} for {what}; its output: {:#?}", self.name, self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().ok();
                    panic!("node {}: exited ({status:?}) before {what}; its output: {:#?}", self.name, self.seen)
                }
            }
        }
    }

    /// Sends `command` and returns the next line that is not another node's
    /// event (the command's own answer).
    fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.expect(&format!("an answer to `{command}`"), |line| !line.starts_with("  ["))
    }

    fn quit(mut self) {
        self.send("quit");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "node {} exited with {status}; its output: {:#?}", self.name, self.seen);
                return;
            }
            assert!(Instant::now() < deadline, "node {} did not quit within {PATIENCE:?}", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_write_in_one_process_invalidates_the_copy_cached_in_another() {
    let redis = RedisServer::start().expect("start redis-server");
    let binary = example_binary();
    let mut a = Node::start(&binary, "a", &redis.url());
    let mut b = Node::start(&binary, "b", &redis.url());
    // "ready" comes once the node's stream is subscribed on Redis.
    a.expect("its ready line", |l| l.starts_with("node a ready"));
    b.expect("its ready line", |l| l.starts_with("node b ready"));

    assert_eq!(a.ask("get user:1"), "(not in the database)");
    assert_eq!(a.ask("set user:1 Alice"), "ok");
    assert_eq!(a.ask("get user:1"), "Alice (cached)");

    // (A read-through load on B would invalidate A's copy too: any insert
    // does. B only writes.)
    assert_eq!(b.ask("set user:1 Bob"), "ok");

    // A's invalidator reports the removal of its copy of Alice ...
    a.expect("the invalidation of its copy", |l| l == "  [invalidated: 1 local copy removed]");
    // ... after which A reads the new value from the database.
    assert_eq!(a.ask("get user:1"), "Bob (loaded from the database)");
    assert_eq!(a.ask("get user:1"), "Bob (cached)");

    a.quit();
    b.quit();
}
