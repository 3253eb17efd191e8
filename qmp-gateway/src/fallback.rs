//! Answers for commands whose daemon is not part of this VM: what QEMU answers when the VM has
//! no such device (no disks, no NIC, no display, no balloon).
//!
//! Classes are the seed's (QEMU 1.1: "If no balloon device is present, DeviceNotActive",
//! "If @device is not a valid block device, DeviceNotFound", "If VNC is not enabled,
//! SetPasswdFailed", "If Spice is not enabled, DeviceNotFound"); texts are QEMU 7.2's where
//! the transcripts or its sources have them.

use flotilla_schema::check::QmpError;
use serde_json::{json, Map, Value};

use crate::qerror;

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> &'a str {
    args.get(name).and_then(Value::as_str).unwrap_or_default()
}

/// `Some(answer)` for a command that has one without its daemon; `None` for a command that
/// simply does not exist in such a VM.
pub fn without_daemon(command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
    let no_block_device =
        |device: &str| Err(qerror::device_not_found(device, format!("Cannot find device='{device}' nor node-name=''")));
    let spice_off = || Err(qerror::device_not_found("spice", "SPICE is not in use"));
    Some(match command {
        // blockd
        "query-block" | "query-blockstats" => Ok(json!([])),
        "block_resize" | "blockdev-snapshot-sync" => no_block_device(str_arg(args, "device")),
        // 7.2 has no block_passwd; 1.1's text for an unknown device.
        "block_passwd" => {
            let device = str_arg(args, "device");
            Err(qerror::device_not_found(device, format!("Device '{device}' not found")))
        }
        // netd
        "set_link" => {
            let name = str_arg(args, "name");
            Err(qerror::device_not_found(name, format!("Device '{name}' not found")))
        }
        // displayd
        "query-mice" => Ok(json!([])),
        "query-vnc" | "query-spice" => Ok(json!({"enabled": false})),
        "set_password" => match str_arg(args, "protocol") {
            "vnc" => Err(qerror::set_passwd_failed("Could not set password")),
            "spice" => spice_off(),
            other => Err(qerror::invalid_parameter_value("protocol", other)),
        },
        "expire_password" => match str_arg(args, "protocol") {
            "vnc" => Err(qerror::set_passwd_failed("Could not set password expire time")),
            "spice" => spice_off(),
            other => Err(qerror::invalid_parameter_value("protocol", other)),
        },
        // balloond
        "balloon" | "query-balloon" => {
            Err(qerror::device_not_active("balloon", "No balloon device has been activated"))
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_schema::dbus::{self, INTERFACES};

    fn answer(cmd: &str, args: Value) -> Option<Result<Value, QmpError>> {
        without_daemon(cmd, args.as_object().unwrap())
    }

    fn err(cmd: &str, args: Value) -> (String, String) {
        let e = answer(cmd, args).unwrap().unwrap_err();
        (e.class, e.desc)
    }

    #[test]
    fn as_qemu_without_the_device() {
        // shared/qemu-7.2-qmp/errors/query-balloon-no-device.txt, balloon-no-device.txt
        let no_balloon = ("DeviceNotActive".to_string(), "No balloon device has been activated".to_string());
        assert_eq!(err("query-balloon", json!({})), no_balloon);
        assert_eq!(err("balloon", json!({"value": 1})), no_balloon);
        // errors/query-vnc-disabled.txt
        assert_eq!(answer("query-vnc", json!({})).unwrap().unwrap(), json!({"enabled": false}));
        assert_eq!(answer("query-spice", json!({})).unwrap().unwrap(), json!({"enabled": false}));
        assert_eq!(answer("query-block", json!({})).unwrap().unwrap(), json!([]));
        assert_eq!(answer("query-mice", json!({})).unwrap().unwrap(), json!([]));
        // errors/block_resize-no-disk.txt (class per the seed)
        assert_eq!(
            err("block_resize", json!({"device": "drive0", "size": 1})),
            ("DeviceNotFound".into(), "Cannot find device='drive0' nor node-name=''".into())
        );
        // errors/set_link-unknown-device.txt
        assert_eq!(
            err("set_link", json!({"name": "nosuch", "up": true})),
            ("DeviceNotFound".into(), "Device 'nosuch' not found".into())
        );
        // errors/set_password-vnc-disabled.txt, set_password-bad-protocol.txt
        assert_eq!(
            err("set_password", json!({"protocol": "vnc", "password": "x"})),
            ("SetPasswdFailed".into(), "Could not set password".into())
        );
        assert_eq!(
            err("set_password", json!({"protocol": "rdp", "password": "x"})),
            ("InvalidParameter".into(), "Parameter 'protocol' does not accept value 'rdp'".into())
        );
        assert_eq!(err("expire_password", json!({"protocol": "spice", "time": "now"})).0, "DeviceNotFound");
    }

    #[test]
    fn every_optional_daemon_command_has_an_answer() {
        // vmm-core is in every VM; the QOM commands are routed by path instead.
        for iface in INTERFACES.iter().filter(|i| i.daemon != "vmm-core") {
            for c in iface.commands.iter().filter(|c| !dbus::QOM_COMMANDS.contains(c)) {
                let args = json!({"device": "d", "name": "n", "protocol": "vnc", "value": 1});
                assert!(answer(c, args).is_some(), "{c} of {} has no answer without its daemon", iface.daemon);
            }
        }
        assert!(answer("query-status", json!({})).is_none());
    }
}
