//! `qmp-gateway`: see [`qmp_gateway::cli`] for the command line. Started by the `flotilla`
//! launcher, one per VM; exits 0 on SIGTERM/SIGINT/SIGHUP, 1 on a bad command line, a socket
//! it cannot bind, or a D-Bus it cannot reach or loses.

use std::process::ExitCode;

fn main() -> ExitCode {
    daemon_logging::init();
    let config = match qmp_gateway::cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(qmp_gateway::cli::CliError::Help) => {
            println!("{}", qmp_gateway::cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("qmp-gateway: {e}");
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("qmp-gateway: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(qmp_gateway::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("qmp-gateway: {e}");
            ExitCode::from(1)
        }
    }
}
