//! Builds the freestanding test guest (`guest/`) with the system's gcc and ld into OUT_DIR and
//! exports its path as `FLOTILLA_GUEST_ELF` (see `src/guest.rs`). Nothing is downloaded.
//!
//! `FLOTILLA_GUEST_CC` / `FLOTILLA_GUEST_LD` override the tools (default `gcc` / `ld`), e.g. for
//! an `x86_64-linux-gnu-` cross toolchain on a non-x86 host.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-omit-frame-pointer",
    "-fcf-protection=none",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    // The image is linked and identity-mapped at 1 MiB: the small code model fits.
    "-mcmodel=small",
    "-O2",
    "-g",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    // Firmware structures live at small fixed addresses (e.g. the EBDA pointer at 0x40e).
    "--param=min-pagesize=0",
];

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src = manifest.join("guest");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("guest");
    println!("cargo:rerun-if-changed=guest");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLOTILLA_GUEST_CC");
    println!("cargo:rerun-if-env-changed=FLOTILLA_GUEST_LD");
    let cc = env::var("FLOTILLA_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let ld = env::var("FLOTILLA_GUEST_LD").unwrap_or_else(|_| "ld".into());

    check_tool(&cc, "-dumpmachine", |machine| {
        if !machine.starts_with("x86_64") {
            fail(&format!(
                "`{cc}` targets `{}`, the test guest needs an x86_64 compiler: set FLOTILLA_GUEST_CC \
                 (and FLOTILLA_GUEST_LD) to an x86_64-linux-gnu toolchain",
                machine.trim()
            ));
        }
    });
    check_tool(&ld, "--version", |_| ());

    fs::create_dir_all(&out).unwrap_or_else(|e| fail(&format!("creating {}: {e}", out.display())));
    let mut sources: Vec<PathBuf> = fs::read_dir(&src)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", src.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(OsStr::to_str), Some("c") | Some("S")))
        .collect();
    sources.sort();
    if sources.is_empty() {
        fail(&format!("no guest sources in {}", src.display()));
    }

    let mut objects = Vec::new();
    for source in &sources {
        let name = source
            .file_name()
            .and_then(OsStr::to_str)
            .expect("utf-8 source name");
        let object = out.join(format!("{name}.o"));
        let mut cmd = Command::new(&cc);
        cmd.args(CFLAGS)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(source)
            .arg("-o")
            .arg(&object);
        run(&mut cmd, &format!("compiling {name}"));
        objects.push(object);
    }

    let elf = out.join("flotilla-guest.elf");
    let mut cmd = Command::new(&ld);
    cmd.args([
        "-nostdlib",
        "-static",
        "--no-dynamic-linker",
        "-z",
        "max-page-size=0x1000",
        "--build-id=none",
    ])
    .arg("-T")
    .arg(src.join("linker.ld"))
    .arg("-Map")
    .arg(out.join("flotilla-guest.map"))
    .arg("-o")
    .arg(&elf)
    .args(&objects);
    run(&mut cmd, "linking flotilla-guest.elf");

    let image = fs::read(&elf).unwrap_or_else(|e| fail(&format!("reading {}: {e}", elf.display())));
    if image.len() < 64 || &image[..4] != b"\x7fELF" || image[4] != 2 || image[18] != 62 {
        fail(&format!("{} is not an ELF64 x86-64 image", elf.display()));
    }
    println!("cargo:rustc-env=FLOTILLA_GUEST_ELF={}", elf.display());
}

fn fail(msg: &str) -> ! {
    panic!("flotilla-tests: building the test guest (tests/guest/): {msg}");
}

fn check_tool(tool: &str, arg: &str, check: impl FnOnce(&str)) {
    match Command::new(tool).arg(arg).output() {
        Ok(o) if o.status.success() => check(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => fail(&format!("`{tool} {arg}` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Err(e) => fail(&format!(
            "cannot run `{tool}` ({e}); the test guest is built from source with the system's gcc and \
             binutils (Debian: `apt-get install gcc binutils`)"
        )),
    }
}

fn run(cmd: &mut Command, what: &str) {
    let output: Output = cmd
        .output()
        .unwrap_or_else(|e| fail(&format!("{what}: cannot run {:?}: {e}", cmd.get_program())));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        fail(&format!("{what} failed ({}):\n{stderr}", output.status));
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=guest: {line}");
    }
}
