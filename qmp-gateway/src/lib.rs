//! Flotilla's QMP gateway: QEMU's monitor protocol on unix and TCP sockets, each command
//! checked against the schema and run by the VM's daemons over D-Bus, their signals sent as
//! QMP events.
//!
//! | module | job |
//! |---|---|
//! | [`cli`] | the command line and QEMU's `-qmp` socket specs |
//! | [`wire`] | bytes to JSON messages as QEMU's json-streamer/lexer/parser do, with limits |
//! | [`request`] | a message to a request: QEMU's envelope checks |
//! | [`reply`] | greeting, replies, errors and events as lines |
//! | [`qerror`] | every error the gateway answers itself (1.1 classes, 7.2 texts) |
//! | [`session`] | one client: negotiation, ordering of replies and events |
//! | [`listen`] | the listeners, stale sockets, `compat_monitorN` chardevs |
//! | [`bus`] | the D-Bus connection: calls, daemon tracking, introspection, events |
//! | [`dispatch`] | routing a command: the gateway's own, a daemon's, or QEMU's answer without it |
//! | [`fallback`] | QEMU's answers for a VM without a given daemon |
//! | [`hmp`] | `human-monitor-command`'s HMP subset |
//! | [`hmp_net`] | `info network`, from the NICs the launcher describes (`--nic`) |

pub mod bus;
pub mod cli;
pub mod dispatch;
pub mod fallback;
pub mod hmp;
pub mod hmp_devices;
pub mod hmp_net;
pub mod listen;
pub mod qerror;
pub mod reply;
pub mod request;
pub mod session;
pub mod wire;

use std::sync::Arc;

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    #[error(transparent)]
    Listen(#[from] listen::ListenError),
    #[error("cannot handle signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("lost the D-Bus connection")]
    BusLost,
}

/// Runs the gateway until SIGTERM/SIGINT/SIGHUP (`Ok`) or the bus goes away (`Err`). The
/// listeners' socket files are removed before this returns.
pub async fn run(config: cli::Config) -> Result<(), GatewayError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(GatewayError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(GatewayError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(GatewayError::Signals)?;

    let instance = flotilla_schema::dbus::bus_instance(&config.instance);
    let bus = bus::Bus::connect(&config.dbus_address, &instance, &config.daemons).await?;
    let mut listeners = Vec::new();
    let mut monitors = Vec::new();
    for (i, spec) in config.qmp.iter().enumerate() {
        let (l, m) = listen::bind(spec, format!("compat_monitor{i}")).await?;
        listeners.push((l, m.clone()));
        monitors.push(m);
    }
    let gateway =
        Arc::new(dispatch::Gateway::new(bus.clone(), monitors, config.call_timeout).with_nics(config.nics.clone()));
    let mut tasks = tokio::task::JoinSet::new();
    for (l, m) in listeners {
        tasks.spawn(listen::serve(l, m, gateway.clone(), session::SessionConfig::default()));
    }
    tracing::info!(instance = %instance, "serving QMP");
    let result = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        _ = hup.recv() => Ok(()),
        _ = bus.closed() => Err(GatewayError::BusLost),
    };
    // Dropping the accept loops drops the listeners, which removes their socket files.
    tasks.shutdown().await;
    result
}
