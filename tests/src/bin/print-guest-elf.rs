//! `print-guest-elf`: prints the path of the test guest ELF that this build of flotilla-tests
//! compiled (`tests/build.rs` puts it in OUT_DIR, whose name cargo chooses). `scripts/run-vm`
//! uses it to boot the test guest.

use std::process::ExitCode;

fn main() -> ExitCode {
    let elf = flotilla_tests::guest::guest_elf();
    if !elf.is_file() {
        eprintln!("print-guest-elf: {} is missing; rebuild flotilla-tests", elf.display());
        return ExitCode::from(1);
    }
    println!("{}", elf.display());
    ExitCode::SUCCESS
}
