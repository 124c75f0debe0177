//! Lines for stdout that behave in pipes: Rust ignores SIGPIPE, so `println!` panics once the
//! reader is gone (`clip-pgs train | head -3`). `outln!` drops the output instead, and the work
//! (training, the files it writes) carries on; the first write error ends output for the process.

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
            eprintln!("warning: stdout: {e}; no further output");
        }
    }
}

/// `println!` that ends quietly on a closed stdout (see the module comment).
#[macro_export]
macro_rules! outln {
    () => { $crate::output::write_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::output::write_line(format_args!($($arg)*)) };
}
