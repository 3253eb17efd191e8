//! `balloond`: the virtio-balloon vhost-user backend program.
//!
//! ```text
//! balloond --config-json '<vm_config::BalloondConfig>' --dbus-address ADDR --instance NAME [--ready-fd FD]
//! balloond --socket-path PATH --mem-bytes N [--dbus-address ADDR --instance NAME]
//! balloond --fd N --mem-bytes N          # N: an inherited, listening unix socket
//! balloond --print-capabilities          # {"type": "balloon"}
//! ```
//! `--stats-interval-ms MS` (default 1000, 0 = never): how often the guest's stats buffer is
//! returned to ask for fresh numbers. With `--ready-fd` it writes `ready\n` there and closes it
//! once the socket listens and, with D-Bus, the bus name is owned. Every connection gets a new
//! daemon on the same listener, so a frontend that reconnects is served again. SIGTERM, SIGINT
//! and SIGHUP end it with status 0: the balloon keeps no state that needs saving (the guest's
//! pages are already back with the host). The program conventions, the serve loop and the exit
//! are the backend kit's; this file holds the balloon's options and what a connection starts.

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use balloond::backend::{BalloonBackend, StatsPoller};
use balloond::dbus::DbusServer;
use balloond::device::Device;
use vhost_backend_kit::cli::{self, Opt, Program, SocketSpec, UsageError};
use vhost_backend_kit::daemon_start::BusThreadError;
use vhost_backend_kit::serve::{self, BoxError, Servers};
use vhost_backend_kit::signals::ExitSignals;
use vm_config::BalloondConfig;

const USAGE: &str = "usage: balloond --config-json JSON --dbus-address ADDR --instance NAME [--ready-fd FD]\n       \
balloond (--socket-path PATH | --fd N) --mem-bytes N [--dbus-address ADDR --instance NAME] [--ready-fd FD]\n       \
balloond --print-capabilities\n       \
options: --stats-interval-ms MS (default 1000, 0: never ask for fresh stats)";

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("--config-json: {0}")]
    Config(#[source] vm_config::ConfigError),
    #[error(transparent)]
    Listen(#[from] cli::ListenError),
    #[error("starting the device: {0}")]
    Device(#[source] std::io::Error),
    #[error("restoring the balloon state: {0}")]
    State(#[from] balloond::persist::PersistError),
    #[error(transparent)]
    Dbus(#[from] BusThreadError),
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
}

impl From<UsageError> for MainError {
    fn from(e: UsageError) -> MainError {
        MainError::Usage(e.0)
    }
}

/// The balloon on its socket: a [`BalloonBackend`] per connection, and while one is connected
/// the poller that asks the guest for fresh stats.
struct BalloonDevice {
    device: Arc<Device>,
    stats_interval: Option<Duration>,
}

impl serve::Device for BalloonDevice {
    type Backend = BalloonBackend;
    type Session = Option<StatsPoller>;

    fn label(&self) -> &str {
        "balloon"
    }

    fn backend(&self) -> Result<BalloonBackend, BoxError> {
        Ok(BalloonBackend::new(self.device.clone())?)
    }

    fn connected(&self, backend: &BalloonBackend) -> Result<Option<StatsPoller>, BoxError> {
        Ok(self.stats_interval.map(|i| backend.spawn_stats_poller(i)).transpose()?)
    }

    fn disconnected(&self, _backend: &BalloonBackend) {
        self.device.set_backend(None);
        tracing::info!(totals = ?self.device.counters.values(), "balloon totals so far");
    }
}

fn run(_exit: ExitSignals) -> Result<Infallible, MainError> {
    let (mut mem_bytes, mut stats_interval) = (None, Some(Duration::from_secs(1)));
    let common = cli::parse(std::env::args().skip(1), |opt: &mut Opt| {
        match opt.name() {
            "--mem-bytes" => mem_bytes = Some(opt.number::<u64>()?),
            "--stats-interval-ms" => {
                let ms: u64 = opt.number()?;
                stats_interval = (ms > 0).then(|| Duration::from_millis(ms));
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    let mut socket = common.socket.clone();
    let mut state_file = None;
    if let Some(json) = &common.config_json {
        let c = BalloondConfig::from_json(json).map_err(MainError::Config)?;
        state_file = c.state_file.clone();
        if socket.is_some() || mem_bytes.is_some() {
            return Err(MainError::Usage("--config-json already names the socket and the memory size".into()));
        }
        tracing::info!(id = %c.id, "balloon device");
        socket = Some(SocketSpec::Path(c.socket));
        mem_bytes = Some(c.mem_bytes);
    }
    let mem_bytes = mem_bytes.ok_or_else(|| MainError::Usage("no --mem-bytes (or --config-json) given".into()))?;
    if mem_bytes == 0 {
        return Err(MainError::Usage("--mem-bytes must be above 0".into()));
    }
    let socket =
        socket.ok_or_else(|| MainError::Usage("give one of --socket-path (or --config-json) and --fd".into()))?;
    let listener = socket.listen()?;
    let device = Device::new(mem_bytes).map_err(MainError::Device)?;
    if let Some(path) = state_file {
        device.restore(path)?;
    }
    let _bus = match &common.bus {
        Some(bus) => Some(DbusServer::start(device.clone(), &bus.address, &bus.instance)?),
        None => None,
    };
    let mut servers = Servers::new();
    servers.spawn(Arc::new(BalloonDevice { device, stats_interval }), listener)?;
    common.report_ready();
    tracing::info!(mem_bytes, "serving");
    Err(servers.wait().into())
}

// vhost-user.json has no balloon type (no other vhost-user balloon exists); "balloon" is what
// one would be called. No options to list.
const PROGRAM: Program = Program { name: "balloond", log_var: "BALLOOND_LOG", device_type: "balloon", features: &[] };

fn main() -> ExitCode {
    cli::run(&PROGRAM, run)
}
