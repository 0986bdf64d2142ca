//! Named fault points for crash and I/O-error tests.
//!
//! The write and GC paths call [`point`] at each step whose interruption
//! matters (after a chunk's temp write, around its fsync and rename, before
//! the directory fsyncs, around the manifest's temp write, fsync and rename,
//! before each deletion of the chunk sweep). Normally a point does nothing:
//! it costs one relaxed atomic load. Tests switch points on with the
//! environment variable `CKPT_FAULT`, read once, the first time a point is
//! reached in the process:
//!
//! ```text
//! CKPT_FAULT = RULE[,RULE...]
//! RULE       = POINT[:N[:ACTION]]     the N-th time (default 1) POINT is reached, do ACTION
//!            | free_space=BYTES       pretend the store's file system has BYTES free
//! POINT      = a name of FAULT_POINTS, or * (any point; N counts them all)
//! ACTION     = kill (default: SIGKILL this process) | eio | enospc (the step fails with that errno)
//! ```
//!
//! and `CKPT_FAULT_LOG=FILE` appends the name of every point reached to FILE
//! (how a test enumerates the points a save passes). An unknown point or
//! action panics, so a mistyped test cannot pass by injecting nothing.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// Every fault point of the engine, in the order a save reaches them.
pub const FAULT_POINTS: &[&str] = &[
    // A chunk: written to tmp/, fsynced, renamed into objects/ab/.
    "chunk.tmp_written",
    "chunk.before_fsync",
    "chunk.after_fsync",
    "chunk.after_rename",
    // The objects/ab/ directories of a save (and objects/ itself).
    "objects.before_dir_fsync",
    "objects.after_dir_fsync",
    // The manifest: the commit point is its rename into versions/.
    "manifest.tmp_written",
    "manifest.after_fsync",
    "manifest.after_rename",
    "manifest.after_dir_fsync",
    // Other atomic files (pins, last-id, the store marker).
    "file.tmp_written",
    "file.after_fsync",
    "file.after_rename",
    // The chunk sweep of gc and retention.
    "gc.before_delete",
    "gc.before_dir_fsync",
];

const UNKNOWN: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static CONFIG: OnceLock<Config> = OnceLock::new();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Kill,
    Errno(i32),
}

#[derive(Debug)]
struct Rule {
    point: String,
    nth: u64,
    action: Action,
    seen: AtomicU64,
}

#[derive(Debug, Default)]
struct Config {
    rules: Vec<Rule>,
    free_space: Option<u64>,
    log: Option<Mutex<File>>,
}

impl Config {
    fn from_env() -> Config {
        let spec = std::env::var("CKPT_FAULT").unwrap_or_default();
        let mut config = parse(&spec).unwrap_or_else(|e| panic!("CKPT_FAULT={spec:?}: {e}"));
        if let Some(path) = std::env::var_os("CKPT_FAULT_LOG") {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("CKPT_FAULT_LOG={path:?}: {e}"));
            config.log = Some(Mutex::new(file));
        }
        config
    }

    fn enabled(&self) -> bool {
        !self.rules.is_empty() || self.free_space.is_some() || self.log.is_some()
    }
}

fn parse(spec: &str) -> Result<Config, String> {
    let mut config = Config::default();
    for rule in spec.split(',').map(str::trim).filter(|r| !r.is_empty()) {
        if let Some(bytes) = rule.strip_prefix("free_space=") {
            let n = bytes
                .parse()
                .map_err(|_| format!("free_space={bytes:?} is not a byte count"))?;
            config.free_space = Some(n);
            continue;
        }
        let mut parts = rule.split(':');
        let point = parts.next().unwrap_or_default();
        if point != "*" && !FAULT_POINTS.contains(&point) {
            return Err(format!(
                "unknown fault point {point:?} (known: {FAULT_POINTS:?})"
            ));
        }
        let nth = match parts.next() {
            None => 1,
            Some(n) => n
                .parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{rule:?}: N must be a positive integer"))?,
        };
        let action = match parts.next() {
            None | Some("kill") => Action::Kill,
            Some("eio") => Action::Errno(libc::EIO),
            Some("enospc") => Action::Errno(libc::ENOSPC),
            Some(other) => return Err(format!("{rule:?}: unknown action {other:?}")),
        };
        if parts.next().is_some() {
            return Err(format!("{rule:?}: too many fields"));
        }
        config.rules.push(Rule {
            point: point.to_string(),
            nth,
            action,
            seen: AtomicU64::new(0),
        });
    }
    Ok(config)
}

fn config() -> &'static Config {
    CONFIG.get_or_init(|| {
        let c = Config::from_env();
        STATE.store(if c.enabled() { ON } else { OFF }, Ordering::Relaxed);
        c
    })
}

/// A fault point. Returns the injected error, if a rule says so; kills the
/// process, if a rule says so; else does nothing (one relaxed load when no
/// rule is set).
#[inline(always)]
pub fn point(name: &'static str) -> io::Result<()> {
    if STATE.load(Ordering::Relaxed) == OFF {
        return Ok(());
    }
    reached(name)
}

#[cold]
#[inline(never)]
fn reached(name: &'static str) -> io::Result<()> {
    debug_assert!(FAULT_POINTS.contains(&name), "unlisted fault point {name}");
    let config = config();
    if let Some(log) = &config.log {
        let mut file = log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(file, "{name}");
    }
    for rule in &config.rules {
        if rule.point != name && rule.point != "*" {
            continue;
        }
        if rule.seen.fetch_add(1, Ordering::Relaxed) + 1 != rule.nth {
            continue;
        }
        match rule.action {
            Action::Kill => loop {
                // SAFETY: plain syscalls; SIGKILL cannot be caught, so this does not return.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            },
            // The raw errno survives, so callers map it like a real failure.
            Action::Errno(errno) => return Err(io::Error::from_raw_os_error(errno)),
        }
    }
    Ok(())
}

/// The free space a test pretends the store has (`free_space=BYTES`), if any.
pub fn free_space_override() -> Option<u64> {
    if STATE.load(Ordering::Relaxed) == OFF {
        return None;
    }
    config().free_space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_mistakes_are_refused() {
        let c = parse("chunk.after_fsync:3:eio, *:7, free_space=1024").unwrap();
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.rules[0].nth, 3);
        assert_eq!(c.rules[0].action, Action::Errno(libc::EIO));
        assert_eq!(c.rules[1].point, "*");
        assert_eq!(c.rules[1].action, Action::Kill);
        assert_eq!(c.free_space, Some(1024));
        assert!(!parse("").unwrap().enabled());
        for bad in [
            "chunk.nope",
            "chunk.after_fsync:0",
            "chunk.after_fsync:x",
            "chunk.after_fsync:1:boom",
            "chunk.after_fsync:1:kill:9",
            "free_space=lots",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn points_are_off_without_the_variable() {
        // The test process does not set CKPT_FAULT: every point passes.
        if std::env::var_os("CKPT_FAULT").is_none() && std::env::var_os("CKPT_FAULT_LOG").is_none()
        {
            for p in FAULT_POINTS {
                point(p).unwrap();
            }
            assert_eq!(STATE.load(Ordering::Relaxed), OFF);
            assert_eq!(free_space_override(), None);
        }
    }
}
