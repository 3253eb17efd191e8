//! `flotilla`: the launcher. Takes qemu-system-x86_64's options, builds the machine description
//! and runs the VM's processes (a private dbus-daemon, blockd with `-drive`, balloond with a
//! balloon, `vmm-core --config-json '<json>'`, and with `-qmp` the `qmp-gateway`), supervising
//! them like a QEMU process: signals, exit status, -pidfile, -daemonize.
//!
//! Modules: `cli` (the option table) with `qemu_opts` (QemuOpts syntax) and `devices` (-drive,
//! -device, -chardev, -balloon); `drive_files` (host checks and format probing before start);
//! `device_plan` (sockets and the daemons' configs); `supervise` (start order, signals, teardown)
//! with `bus` (runtime dir, private bus), `device_daemons` (blockd, balloond) and `restart`
//! (start / ready / restart-with-backoff, shared by the gateway and the device daemons).

mod bus;
mod cli;
mod device_daemons;
mod device_plan;
mod devices;
mod drive_files;
mod net_opts;
mod qemu_opts;
mod restart;
mod supervise;
mod tap;
mod user_net;

use cli::Action;

fn main() {
    daemon_logging::init();

    let mut args = Vec::new();
    for (i, a) in std::env::args_os().skip(1).enumerate() {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(a) => {
                eprintln!("flotilla: {}: argument {} is not valid UTF-8", a.to_string_lossy(), i + 1);
                std::process::exit(1);
            }
        }
    }
    let opts = match cli::parse(&args) {
        Ok(Action::Run(o)) => o,
        Ok(Action::Help) => {
            print!("{}", cli::help_text());
            return;
        }
        Ok(Action::Version) => {
            print!("{}", cli::version_text());
            return;
        }
        Ok(Action::MachineHelp) => {
            print!("{}", cli::machine_help_text());
            return;
        }
        Ok(Action::AccelHelp) => {
            print!("{}", cli::accel_help_text());
            return;
        }
        Err(e) => {
            eprintln!("flotilla: {e}");
            std::process::exit(1);
        }
    };
    match supervise::launch(&opts) {
        Ok(outcome) => supervise::exit_like(outcome),
        Err(e) => {
            eprintln!("flotilla: {e}");
            std::process::exit(1);
        }
    }
}
