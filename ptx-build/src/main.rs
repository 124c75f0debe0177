//! `cargo run -p ptx-build [-- --check]`: compiles the `kernels/` crate to PTX with rustc's own
//! `nvptx64-nvidia-cuda` target and writes `kernels/ptx/clip_pgs_kernels.ptx`.
//!
//! How: stable rustc with `RUSTC_BOOTSTRAP=1`, `-Zbuild-std=core` (needs the `rust-src`
//! component), crate type `staticlib`, the workspace's `ptx` profile (fat LTO, one codegen unit),
//! `-Cpanic=immediate-abort` (no panic machinery reaches the PTX), `--emit=asm` (the `.s` file is
//! the PTX of the whole module), `-Ctarget-cpu=sm_80`.
//!
//! `--check` leaves the committed file alone and fails when it differs from a fresh build.
//! When `ptxas` is found (env `PTXAS`, else `PATH`), every module is assembled for sm_80 and sm_90
//! and registers, shared memory and spills are printed per kernel; a ptxas error or any spill
//! fails the run.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const TARGET: &str = "nvptx64-nvidia-cuda";
const CPU: &str = "sm_80";
const ARCHS: [&str; 2] = ["sm_80", "sm_90"];
const MODULE: &str = "clip_pgs_kernels";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let check = match args.as_slice() {
        [] => false,
        [a] if a == "--check" => true,
        _ => {
            eprintln!("usage: cargo run -p ptx-build [-- --check]");
            return ExitCode::from(2);
        }
    };
    match run(check) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ptx-build: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(check: bool) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("ptx-build lives in the workspace").to_path_buf();
    require_rust_src()?;
    let fresh = compile(&root)?;
    let committed_path = root.join("kernels/ptx").join(format!("{MODULE}.ptx"));
    if check {
        let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
        if committed != fresh {
            return Err(format!(
                "{} is stale: it differs from what kernels/ compiles to. Run `cargo run -p ptx-build` and commit the result.",
                committed_path.display()
            ));
        }
        println!("{} is up to date", committed_path.display());
    } else {
        std::fs::create_dir_all(committed_path.parent().unwrap()).map_err(|e| e.to_string())?;
        std::fs::write(&committed_path, &fresh).map_err(|e| format!("writing {}: {e}", committed_path.display()))?;
        println!("wrote {} ({} lines)", committed_path.display(), fresh.lines().count());
    }
    match find_ptxas() {
        Some(ptxas) => assemble_all(&ptxas, &scratch_copy(&root, &fresh)?),
        None => {
            println!("ptxas not found (set PTXAS or put it on PATH): the PTX was not assembled");
            Ok(())
        }
    }
}

/// `-Zbuild-std` compiles `core` from source, which only the `rust-src` component provides.
fn require_rust_src() -> Result<(), String> {
    let out = Command::new(rustc()).args(["--print", "sysroot"]).output().map_err(|e| format!("running rustc: {e}"))?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if sysroot.join("lib/rustlib/src/rust/library/core/Cargo.toml").exists() {
        Ok(())
    } else {
        Err(format!(
            "the rust-src component is missing from {}; install it with `rustup component add rust-src`",
            sysroot.display()
        ))
    }
}

fn rustc() -> String {
    std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into())
}

/// Builds the kernel crate for nvptx and returns the PTX text.
fn compile(root: &Path) -> Result<String, String> {
    let target_dir = root.join("target/ptx");
    let deps = target_dir.join(TARGET).join("ptx/deps");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", format!("-Cpanic=immediate-abort -Zunstable-options -Ctarget-cpu={CPU}"))
        .env_remove("CARGO_TARGET_DIR")
        .args(["rustc", "-p", "clip-pgs-kernels", "--profile", "ptx", "--target", TARGET])
        .args(["-Zbuild-std=core", "--crate-type", "staticlib", "--target-dir"])
        .arg(&target_dir)
        .args(["--", "--emit=asm"])
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err("compiling kernels/ for nvptx64-nvidia-cuda failed (see the errors above)".into());
    }
    // The .s file name carries a hash of the build settings: the newest is this build's (cargo
    // leaves it in place when nothing changed).
    let s_file = std::fs::read_dir(&deps)
        .map_err(|e| format!("reading {}: {e}", deps.display()))?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(MODULE) && name.ends_with(".s")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .ok_or_else(|| format!("no {MODULE}-*.s in {}", deps.display()))?;
    std::fs::read_to_string(&s_file).map_err(|e| format!("reading {}: {e}", s_file.display()))
}

/// The fresh PTX in a file of its own, for ptxas.
fn scratch_copy(root: &Path, fresh: &str) -> Result<PathBuf, String> {
    let path = root.join("target/ptx").join(format!("{MODULE}.ptx"));
    std::fs::write(&path, fresh).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PTXAS") {
        return Some(PathBuf::from(p));
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join("ptxas")).find(|p| p.is_file())
}

/// One kernel's resources as ptxas reports them.
#[derive(Default)]
struct KernelReport {
    name: String,
    arch: String,
    registers: u32,
    shared_bytes: u32,
    stack_bytes: u32,
    spill_bytes: u32,
}

fn assemble_all(ptxas: &Path, ptx: &Path) -> Result<(), String> {
    let mut reports = Vec::new();
    for arch in ARCHS {
        let out = Command::new(ptxas)
            .args(["-arch", arch, "-v", "-o", "/dev/null"])
            .arg(ptx)
            .output()
            .map_err(|e| format!("running {}: {e}", ptxas.display()))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            return Err(format!("ptxas -arch {arch} failed:\n{log}"));
        }
        reports.extend(parse_ptxas_log(&log, arch));
    }
    println!(
        "{:<28} {:<6} {:>5} {:>11} {:>11} {:>11}",
        "kernel", "arch", "regs", "smem bytes", "stack bytes", "spill bytes"
    );
    for r in &reports {
        println!(
            "{:<28} {:<6} {:>5} {:>11} {:>11} {:>11}",
            r.name, r.arch, r.registers, r.shared_bytes, r.stack_bytes, r.spill_bytes
        );
    }
    let spilled: Vec<String> =
        reports.iter().filter(|r| r.spill_bytes > 0).map(|r| format!("{} ({})", r.name, r.arch)).collect();
    if !spilled.is_empty() {
        return Err(format!("register spills in: {}", spilled.join(", ")));
    }
    println!("ptxas: {} kernels assembled for {} with 0 spill bytes", reports.len() / ARCHS.len(), ARCHS.join(" and "));
    Ok(())
}

/// Parses `ptxas -v` output: a "Compiling entry function 'NAME'" line opens a kernel, then
/// "N bytes stack frame, N bytes spill stores, N bytes spill loads" and
/// "Used N registers, ..., N bytes smem, ..." fill it in.
fn parse_ptxas_log(log: &str, arch: &str) -> Vec<KernelReport> {
    let number_before = |line: &str, unit: &str| -> u32 {
        line.split(',')
            .find_map(|part| part.trim().strip_suffix(unit).and_then(|n| n.trim().rsplit(' ').next()?.parse().ok()))
            .unwrap_or(0)
    };
    let mut reports: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            reports.push(KernelReport { name, arch: arch.into(), ..Default::default() });
        } else if let Some(r) = reports.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = number_before(line, "bytes stack frame");
                r.spill_bytes = number_before(line, "bytes spill stores") + number_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = line.split("Used ").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem");
            }
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_output() {
        let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'pgs_edge_map_f32' for 'sm_80'
ptxas info    : Function properties for pgs_edge_map_f32
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 47 registers, used 1 barriers, 128 bytes smem, 380 bytes cmem[0]
ptxas info    : Compiling entry function 'other' for 'sm_80'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 13 registers, used 0 barriers";
        let r = parse_ptxas_log(log, "sm_80");
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].name.as_str(), r[0].registers, r[0].shared_bytes), ("pgs_edge_map_f32", 47, 128));
        assert_eq!((r[0].stack_bytes, r[0].spill_bytes), (8, 16));
        assert_eq!((r[1].name.as_str(), r[1].registers, r[1].shared_bytes, r[1].spill_bytes), ("other", 13, 0, 0));
    }
}
