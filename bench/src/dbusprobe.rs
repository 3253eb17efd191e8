//! Where the time of Flotilla's QMP path goes: the D-Bus part of it timed without the gateway.
//!
//! The bench joins the VM's private bus as one more client (the address and instance are read
//! from vmm-core's command line) and times sequential calls with zbus, as the gateway makes
//! them, each adding one piece to the previous one:
//!
//! | probe | path |
//! |---|---|
//! | `bus-GetId` | bench → dbus-daemon → bench (the bus answers itself) |
//! | `vmm-core-Ping` | bench → dbus-daemon → vmm-core's zbus (`org.freedesktop.DBus.Peer`) → dbus-daemon → bench |
//! | `vmm-core-QueryKvm` | the same to a generated `VmmCore1` handler that answers from constants |
//! | `vmm-core-QueryStatus` | what the gateway calls for `query-status`: the handler runs `Vm::status` through `spawn_blocking` |
//!
//! So `QueryStatus − QueryKvm` is the blocking-pool hand-off, `QueryKvm − Ping` the generated
//! glue, `Ping − GetId` the second bus hop plus vmm-core's dispatch, and QMP `query-status`
//! through the gateway minus `QueryStatus` is what the gateway and its socket add. The
//! [`Prober`] times blocks of calls on demand, so that `crate::qmprun` can interleave them with
//! QMP round trips through the gateway.

use std::time::{Duration, Instant};

use flotilla_schema::{dbus, table};
use zbus::Connection;

use crate::error::BenchError;
use crate::procfs;

/// How long connecting and each call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The VM's bus, from vmm-core's arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusTarget {
    pub address: String,
    pub instance: String,
}

/// `--dbus-address ADDR` and `--instance NAME` (or their `=` forms) from a daemon's argv.
pub fn parse_daemon_args(args: &[String]) -> Option<BusTarget> {
    let (mut address, mut instance) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        let slot = match flag {
            "--dbus-address" => &mut address,
            "--instance" => &mut instance,
            _ => continue,
        };
        *slot = inline.or_else(|| it.next().cloned());
    }
    Some(BusTarget { address: address?, instance: instance? })
}

/// The bus of the VM whose processes are `pids`: read from its vmm-core.
pub fn find_target(pids: &[i32]) -> Option<BusTarget> {
    pids.iter()
        .filter(|p| procfs::comm_and_ppid(**p).is_some_and(|(c, _)| c == "vmm-core"))
        .find_map(|p| parse_daemon_args(&procfs::cmdline(*p)?))
}

/// One kind of call.
#[derive(Debug, Clone)]
pub struct Probe {
    pub key: &'static str,
    pub what: &'static str,
    pub destination: String,
    pub path: String,
    pub interface: String,
    pub member: String,
}

fn vmm_core_method(target: &BusTarget, key: &'static str, what: &'static str, command: &str) -> Option<Probe> {
    let cmd = table::command(command)?;
    let iface = dbus::INTERFACES.iter().find(|i| i.commands.contains(&command))?;
    Some(Probe {
        key,
        what,
        destination: dbus::bus_name(&target.instance, iface.object_name()),
        path: dbus::object_path(iface.object_name()),
        interface: iface.name.to_string(),
        member: dbus::method(cmd).name.to_string(),
    })
}

/// The probes, in the order they are run (cheapest path first).
pub fn probes(target: &BusTarget) -> Vec<Probe> {
    let vmm_core = "VmmCore";
    let mut v = vec![
        Probe {
            key: "bus-GetId",
            what: "org.freedesktop.DBus.GetId: bench -> dbus-daemon -> bench, answered by the bus itself",
            destination: "org.freedesktop.DBus".into(),
            path: "/org/freedesktop/DBus".into(),
            interface: "org.freedesktop.DBus".into(),
            member: "GetId".into(),
        },
        Probe {
            key: "vmm-core-Ping",
            what: "org.freedesktop.DBus.Peer.Ping to vmm-core: both bus hops and vmm-core's zbus dispatch, no handler",
            destination: dbus::bus_name(&target.instance, vmm_core),
            path: dbus::object_path(vmm_core),
            interface: "org.freedesktop.DBus.Peer".into(),
            member: "Ping".into(),
        },
    ];
    v.extend(vmm_core_method(
        target,
        "vmm-core-QueryKvm",
        "org.flotilla.VmmCore1.QueryKvm: a generated handler answering from constants (no spawn_blocking), JSON out",
        "query-kvm",
    ));
    v.extend(vmm_core_method(
        target,
        "vmm-core-QueryStatus",
        "org.flotilla.VmmCore1.QueryStatus: what the gateway calls for query-status (spawn_blocking + Vm::status)",
        "query-status",
    ));
    v
}

async fn call(conn: &Connection, p: &Probe) -> Result<zbus::Message, String> {
    let fut = conn.call_method(
        Some(p.destination.as_str()),
        p.path.as_str(),
        Some(p.interface.as_str()),
        p.member.as_str(),
        &(),
    );
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(e)) => Err(format!("{}.{} on {}: {e}", p.interface, p.member, p.destination)),
        Err(_) => Err(format!("{}.{} on {}: no reply within {CALL_TIMEOUT:?}", p.interface, p.member, p.destination)),
    }
}

/// Checks an answer: `QueryStatus` must carry a `StatusInfo` as JSON text.
fn check_answer(p: &Probe, reply: &zbus::Message) -> Result<(), String> {
    if p.member != "QueryStatus" {
        return Ok(());
    }
    let text: String = reply.body().deserialize().map_err(|e| format!("QueryStatus answered no string: {e}"))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("QueryStatus: not JSON ({e}): {text}"))?;
    if v["status"].is_string() {
        Ok(())
    } else {
        Err(format!("QueryStatus answered {text}"))
    }
}

/// A zbus connection to the VM's bus, on a runtime of its own that runs only while a block of
/// calls is timed (so the bench can alternate these blocks with blocking QMP round trips).
pub struct Prober {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    pub probes: Vec<Probe>,
}

fn probe_error(detail: String) -> BenchError {
    BenchError::Qmp { what: "timing D-Bus calls to vmm-core".into(), detail }
}

impl Prober {
    /// Connects to the bus and checks one answer of every probe.
    pub fn connect(target: &BusTarget) -> Result<Prober, BenchError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BenchError::Io { what: "starting a tokio runtime for the D-Bus probe".into(), source: e })?;
        let probes = probes(target);
        let conn = rt.block_on(async {
            let build = zbus::connection::Builder::address(target.address.as_str()).build();
            let conn = match tokio::time::timeout(CALL_TIMEOUT, build).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(probe_error(format!("connecting to {}: {e}", target.address))),
                Err(_) => return Err(probe_error(format!("connecting to {}: timed out", target.address))),
            };
            for p in &probes {
                let reply = call(&conn, p).await.map_err(probe_error)?;
                check_answer(p, &reply).map_err(probe_error)?;
            }
            Ok(conn)
        })?;
        Ok(Prober { rt, conn, probes })
    }

    /// `count` sequential calls of probe `idx`, each timed (ns); fails past `deadline`.
    pub fn time(&mut self, idx: usize, count: usize, deadline: Instant) -> Result<Vec<u64>, BenchError> {
        let (conn, p) = (&self.conn, &self.probes[idx]);
        self.rt.block_on(async {
            let mut out = Vec::with_capacity(count);
            for i in 0..count {
                let t0 = Instant::now();
                call(conn, p).await.map_err(probe_error)?;
                let t1 = Instant::now();
                out.push(t1.duration_since(t0).as_nanos() as u64);
                if t1 > deadline {
                    return Err(probe_error(format!("{}: deadline passed after {i} of {count} calls", p.key)));
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn bus_and_instance_from_vmm_cores_arguments() {
        let a = args(
            "/t/vmm-core --config-json {} --dbus-address unix:path=/run/flotilla/vm1-1/bus,guid=42 --instance vm1 \
             --ready-fd 4",
        );
        let t = parse_daemon_args(&a).unwrap();
        assert_eq!(t.address, "unix:path=/run/flotilla/vm1-1/bus,guid=42");
        assert_eq!(t.instance, "vm1");
        let t = parse_daemon_args(&args("x --instance=a-b --dbus-address=unix:path=/b")).unwrap();
        assert_eq!((t.address.as_str(), t.instance.as_str()), ("unix:path=/b", "a-b"));
        assert_eq!(parse_daemon_args(&args("x --instance vm1")), None);
        assert_eq!(parse_daemon_args(&args("x --dbus-address")), None);
    }

    #[test]
    fn probes_name_what_the_gateway_calls() {
        let t = BusTarget { address: "unix:path=/x".into(), instance: "my-vm".into() };
        let p = probes(&t);
        let keys: Vec<&str> = p.iter().map(|p| p.key).collect();
        assert_eq!(keys, ["bus-GetId", "vmm-core-Ping", "vmm-core-QueryKvm", "vmm-core-QueryStatus"]);
        let qs = &p[3];
        assert_eq!(qs.destination, "org.flotilla.my_vm.VmmCore");
        assert_eq!(qs.path, "/org/flotilla/VmmCore");
        assert_eq!(qs.interface, "org.flotilla.VmmCore1");
        assert_eq!(qs.member, "QueryStatus");
        assert_eq!(p[2].member, "QueryKvm");
        assert_eq!(p[1].destination, qs.destination);
    }
}
