//! Lines for stdout and stderr that behave in pipes: Rust ignores SIGPIPE, so `println!` panics
//! once the reader is gone (`clip-pgs train | head -3`). `outln!` drops the output instead, and
//! the work (training, the files it writes) carries on; the first write error ends output for the
//! process. `errln!` does the same for stderr, which `2>&1 | head` closes too.

use std::fmt;
use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes one line to stdout unless stdout has failed before.
pub fn write_line(args: fmt::Arguments) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        CLOSED.store(true, Ordering::Relaxed);
        // A closed pipe is the reader's choice; anything else (a full disk) is worth a word.
        if e.kind() != ErrorKind::BrokenPipe {
            write_err_line(format_args!("warning: stdout: {e}; no further output"));
        }
    }
}

/// Writes one line to stderr; an error is dropped (there is nowhere left to report it).
pub fn write_err_line(args: fmt::Arguments) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// `println!` that ends quietly on a closed stdout (see the module comment).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::write_line(format_args!($($arg)*)) };
}

/// `eprintln!` that never panics on a closed stderr.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => { $crate::output::write_err_line(format_args!($($arg)*)) };
}
