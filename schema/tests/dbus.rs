//! The D-Bus descriptions: routing, method names, signatures, introspection XML.

use flotilla_schema::check::QmpError;
use flotilla_schema::dbus::{self, GATEWAY_COMMANDS, INTERFACES, QOM_COMMANDS};
use flotilla_schema::parse::Builtin;
use flotilla_schema::table::{self, Ty};

#[test]
fn every_command_has_one_home() {
    for c in table::COMMANDS {
        let owners: Vec<&str> = dbus::owners(c.name).map(|i| i.daemon).collect();
        if QOM_COMMANDS.contains(&c.name) {
            assert_eq!(owners.len(), INTERFACES.len(), "{}", c.name);
        } else if GATEWAY_COMMANDS.contains(&c.name) {
            assert!(owners.is_empty(), "{} is the gateway's", c.name);
        } else {
            assert_eq!(owners.len(), 1, "{}: {owners:?}", c.name);
        }
    }
    for i in INTERFACES {
        for c in i.commands {
            assert!(table::command(c).is_some(), "{} lists unknown {c}", i.name);
        }
    }
    assert_eq!(dbus::owners("balloon").next().unwrap().name, "org.flotilla.Balloon1");
    assert_eq!(dbus::owners("set_link").next().unwrap().daemon, "netd");
    assert_eq!(dbus::interface("vmm-core").unwrap().name, "org.flotilla.VmmCore1");
}

fn is_dbus_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[test]
fn names_are_valid_dbus_names() {
    for i in INTERFACES {
        assert!(i.name.split('.').all(is_dbus_name), "{}", i.name);
        for m in dbus::methods(i) {
            assert!(is_dbus_name(m.name), "{}", m.name);
            for a in &m.in_args {
                assert!(is_dbus_name(&a.name), "{}", a.name);
            }
        }
    }
}

fn method(command: &str) -> dbus::Method {
    dbus::method(table::command(command).unwrap())
}

#[test]
fn methods_have_typed_arguments() {
    let m = method("memsave");
    assert_eq!(m.name, "Memsave");
    assert_eq!(m.in_signature(), "xxsax");
    let names: Vec<&str> = m.in_args.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["val", "size", "filename", "cpu_index"]);
    assert_eq!(m.in_args[3].qapi_name, "cpu-index");
    assert!(m.in_args[3].optional);
    assert_eq!(m.out_signature(), "");

    let m = method("query-status");
    assert_eq!((m.name, m.in_signature().as_str(), m.out_signature()), ("QueryStatus", "", "s"));
    assert_eq!(m.out.unwrap().json_type.as_deref(), Some("StatusInfo"));

    let m = method("query-chardev");
    assert_eq!(m.out.unwrap().json_type.as_deref(), Some("[ChardevInfo]"));
    assert_eq!(method("set_link").in_signature(), "sb");
    assert_eq!(method("migrate_set_downtime").in_signature(), "d");
    assert_eq!(method("blockdev-snapshot-sync").in_signature(), "ssas");
    assert_eq!(method("inject-nmi").name, "InjectNmi");
    assert_eq!(method("system_reset").name, "SystemReset");

    let m = method("human-monitor-command");
    assert_eq!((m.in_signature().as_str(), m.out_signature()), ("sax", "s"));
    assert_eq!(m.out.unwrap().json_type, None);

    let m = method("qom-set");
    assert_eq!(m.in_signature(), "sss");
    assert_eq!(m.in_args[2].json_type.as_deref(), Some("visitor"));
    let m = method("qom-get");
    assert_eq!(m.out.unwrap().json_type.as_deref(), Some("visitor"));

    // Every argument of the seed is a real D-Bus type; only `visitor` travels as JSON.
    for c in table::COMMANDS {
        for a in dbus::method(c).in_args {
            assert!(a.json_type.is_none() || a.json_type.as_deref() == Some("visitor"), "{}", c.name);
        }
    }
}

#[test]
fn signature_mapping() {
    let sig = |ty: Ty| dbus::signature(&ty);
    let b = |b| sig(Ty::Builtin(b));
    assert_eq!(b(Builtin::Str), ("s".into(), false));
    assert_eq!(b(Builtin::Int), ("x".into(), false));
    assert_eq!(b(Builtin::Int8), ("n".into(), false));
    assert_eq!(b(Builtin::Int32), ("i".into(), false));
    assert_eq!(b(Builtin::Uint8), ("y".into(), false));
    assert_eq!(b(Builtin::Uint16), ("q".into(), false));
    assert_eq!(b(Builtin::Uint32), ("u".into(), false));
    assert_eq!(b(Builtin::Uint64), ("t".into(), false));
    assert_eq!(b(Builtin::Number), ("d".into(), false));
    assert_eq!(b(Builtin::Bool), ("b".into(), false));
    assert_eq!(b(Builtin::Any), ("s".into(), true));
    assert_eq!(sig(Ty::Enum("RunState")), ("s".into(), false));
    assert_eq!(sig(Ty::Struct("BlockStats")), ("s".into(), true));
    assert_eq!(sig(Ty::List(&Ty::Builtin(Builtin::Int))), ("ax".into(), false));
    assert_eq!(sig(Ty::List(&Ty::Enum("RunState"))), ("as".into(), false));
    assert_eq!(sig(Ty::List(&Ty::Struct("PciInfo"))), ("s".into(), true));
}

#[test]
fn introspection_xml() {
    let vmm = dbus::interface("vmm-core").unwrap();
    let xml = dbus::introspection_xml(vmm);
    assert!(xml.starts_with("<!DOCTYPE node PUBLIC"));
    assert!(xml.contains("<interface name=\"org.flotilla.VmmCore1\">"));
    let memsave = "    <method name=\"Memsave\">\n\
                   \x20     <arg name=\"val\" type=\"x\" direction=\"in\"/>\n\
                   \x20     <arg name=\"size\" type=\"x\" direction=\"in\"/>\n\
                   \x20     <arg name=\"filename\" type=\"s\" direction=\"in\"/>\n\
                   \x20     <arg name=\"cpu_index\" type=\"ax\" direction=\"in\"/>\n\
                   \x20     <annotation name=\"org.flotilla.Qmp.Command\" value=\"memsave\"/>\n\
                   \x20   </method>\n";
    assert!(xml.contains(memsave), "{xml}");
    let status = "    <method name=\"QueryStatus\">\n\
                  \x20     <arg name=\"result\" type=\"s\" direction=\"out\">\n\
                  \x20       <annotation name=\"org.flotilla.Qmp.JsonType\" value=\"StatusInfo\"/>\n\
                  \x20     </arg>\n";
    assert!(xml.contains(status), "{xml}");
    assert_eq!(xml.matches("<method ").count(), vmm.commands.len());
    assert_eq!(xml.matches("<method ").count(), xml.matches("</method>").count());

    // Reading the XML back gives the methods, for comparing with what zbus introspects.
    for i in INTERFACES {
        let read = dbus::methods_in_xml(&dbus::introspection_xml(i), i.name);
        let expected: Vec<dbus::XmlMethod> = dbus::methods(i)
            .into_iter()
            .map(|m| {
                let mut args: Vec<(String, String, String)> =
                    m.in_args.iter().map(|a| (a.name.clone(), a.signature.clone(), "in".into())).collect();
                args.extend(m.out.iter().map(|a| (String::new(), a.signature.clone(), "out".into())));
                (m.name.to_string(), args)
            })
            .collect::<Vec<_>>();
        let mut expected = expected;
        expected.sort();
        assert_eq!(read, expected, "{}", i.name);
        assert!(dbus::methods_in_xml(&dbus::introspection_xml(i), "org.other").is_empty());
    }
}

#[test]
fn methods_in_xml_reads_zbus_style_output() {
    // zbus writes unnamed out-args and no DOCTYPE; several interfaces per node.
    let xml = r#"<node>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping">
    </method>
  </interface>
  <interface name="org.flotilla.Net1">
    <method name="SetLink">
      <arg name="name" type="s" direction="in"/>
      <arg name="up" type="b" direction="in"/>
    </method>
    <method name="QomGet">
      <arg name="path" type="s" direction="in"/>
      <arg name="property" type="s" direction="in"/>
      <arg type="s" direction="out"/>
    </method>
  </interface>
</node>"#;
    let read = dbus::methods_in_xml(xml, "org.flotilla.Net1");
    let ours = dbus::methods_in_xml(&dbus::introspection_xml(dbus::interface("netd").unwrap()), "org.flotilla.Net1");
    let pick = |v: &[dbus::XmlMethod], n: &str| v.iter().find(|m| m.0 == n).cloned().unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[0], pick(&ours, "QomGet"));
    assert_eq!(read[1], pick(&ours, "SetLink"));
}

#[test]
fn errors_travel_as_json() {
    let e = QmpError::new("DeviceNotFound", "Device 'nosuch' not found");
    let msg = dbus::error_message(&e);
    assert_eq!(msg, r#"{"class":"DeviceNotFound","desc":"Device 'nosuch' not found","data":{}}"#);
    assert_eq!(dbus::parse_error_message(dbus::ERROR_NAME, &msg), Some(e));
    assert_eq!(dbus::parse_error_message("org.freedesktop.DBus.Error.Failed", &msg), None);
}
