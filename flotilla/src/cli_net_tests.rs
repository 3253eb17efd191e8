// Unit tests of -netdev, -net and -device virtio-net-pci, included into cli.rs's tests module
// (they use its `run`, `err` and `devs`).

fn nics(args: &[&str]) -> Vec<crate::net_opts::NicSpec> {
    devs(args).nics
}

#[test]
fn netdev_tap_with_a_virtio_net_pci() {
    use crate::net_opts::NetdevKind;
    let d = devs(&[
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:aa:bb:cc,addr=5",
    ]);
    assert_eq!(
        d.net.netdevs[0].kind,
        NetdevKind::Tap { ifname: Some("tap0".into()), fd: None, queues: 1, vnet_hdr: None }
    );
    let x = &d.devices[0];
    assert_eq!((x.model, x.kind, x.id.as_str(), x.pci_slot), ("virtio-net-pci", VirtioKind::Net, "nic0", Some(5)));
    assert_eq!(x.backend, Backend::Netd("nic0".into()));
    assert_eq!((x.num_queues, x.queue_size, x.msix_vectors), (3, 256, None), "rx, tx and the control queue");
    let n = &d.nics[0];
    assert_eq!(
        (n.name.as_str(), n.netdev.as_str(), n.mac, n.queue_pairs),
        ("nic0", "n0", [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc], 1)
    );
    assert!(d.has_netd());
    // A -device may come before its -netdev; script= empty means none too; vnet_hdr and fd.
    let d = devs(&["-device", "virtio-net-pci,netdev=n0", "-netdev", "tap,id=n0,ifname=t1,script=,vnet_hdr=off"]);
    assert_eq!(
        d.net.netdevs[0].kind,
        NetdevKind::Tap { ifname: Some("t1".into()), fd: None, queues: 1, vnet_hdr: Some(false) }
    );
    let d = devs(&["-netdev", "tap,id=n0,fd=7", "-device", "virtio-net-pci,netdev=n0"]);
    assert_eq!(d.net.netdevs[0].kind, NetdevKind::Tap { ifname: None, fd: Some(7), queues: 1, vnet_hdr: None });
}

#[test]
fn default_macs_and_names_follow_qemu() {
    let n = nics(&[
        "-netdev",
        "user,id=a",
        "-netdev",
        "user,id=b",
        "-netdev",
        "user,id=c",
        "-device",
        "virtio-net-pci,netdev=a",
        "-device",
        "virtio-net-pci,netdev=b,mac=52:54:00:12:34:57",
        "-device",
        "virtio-net-pci,netdev=c,id=third",
    ]);
    let macs: Vec<String> = n.iter().map(|x| crate::net_opts::format_mac(&x.mac)).collect();
    // The first free one of 52:54:00:12:34:56 + N, skipping a MAC given explicitly.
    assert_eq!(macs, ["52:54:00:12:34:56", "52:54:00:12:34:57", "52:54:00:12:34:58"]);
    let names: Vec<&str> = n.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["virtio-net-pci.0", "virtio-net-pci.1", "third"]);
    // '-' separators and upper case are QEMU's too.
    assert_eq!(
        nics(&["-netdev", "user,id=a", "-device", "virtio-net-pci,netdev=a,mac=52-54-00-AB-CD-EF"])[0].mac,
        [0x52, 0x54, 0, 0xab, 0xcd, 0xef]
    );
}

#[test]
fn multiqueue_and_vectors() {
    let d = devs(&[
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no,queues=4",
        "-device",
        "virtio-net-pci,netdev=n0,mq=on,vectors=10",
    ]);
    assert_eq!((d.devices[0].num_queues, d.devices[0].msix_vectors), (9, Some(10)), "4 pairs + control queue");
    assert_eq!(d.nics[0].queue_pairs, 4);
    // Without mq=on the guest gets one pair (and the launcher says so).
    let d = devs(&["-netdev", "tap,id=n0,ifname=tap0,queues=4", "-device", "virtio-net-pci,netdev=n0"]);
    assert_eq!((d.devices[0].num_queues, d.nics[0].queue_pairs), (3, 1));
    let notes = d.net.resolve_notes(&d.nics);
    assert!(notes[0].contains("netdev 'n0' has 4 queues; without mq=on the guest uses one"), "{notes:?}");
    assert_eq!(
        err(&["-netdev", "user,id=u", "-device", "virtio-net-pci,netdev=u,vectors=1"]),
        "-device virtio-net-pci,netdev=u,vectors=1: vectors=1 is not supported by flotilla: its virtio-pci functions have no INTx, so a driver needs at least 2 MSI-X vectors"
    );
    assert_eq!(
        err(&["-netdev", "tap,id=n,ifname=t,queues=0"]),
        "-netdev tap,id=n,ifname=t,queues=0: queues=0: a netdev needs at least one queue"
    );
    assert_eq!(
        err(&["-netdev", "tap,id=n,ifname=t,queues=32"]),
        "-netdev tap,id=n,ifname=t,queues=32: queues=32 is more than flotilla supports (31)"
    );
}

#[test]
fn vhost_on_is_taken_as_a_hint_with_a_warning() {
    let d = devs(&["-netdev", "tap,id=n0,ifname=tap0,vhost=on", "-device", "virtio-net-pci,netdev=n0"]);
    assert_eq!(
        d.net.resolve_notes(&d.nics),
        ["warning: -netdev tap,vhost=on: flotilla serves the NIC's queues in netd (vhost-user); the kernel's vhost-net is not used"]
    );
    let d = devs(&["-netdev", "tap,id=n0,ifname=tap0,vhost=off", "-device", "virtio-net-pci,netdev=n0"]);
    assert!(d.net.resolve_notes(&d.nics).is_empty());
    assert_eq!(
        err(&["-netdev", "tap,id=n0,ifname=t,vhostfd=5"]),
        "-netdev tap,id=n0,ifname=t,vhostfd=5: vhostfd= is not supported by flotilla: netd serves the queues, not the kernel's vhost-net"
    );
}

#[test]
fn netdev_tap_errors() {
    assert_eq!(
        err(&["-netdev", "tap,id=n0,ifname=tap0,script=/etc/qemu-ifup"]),
        "-netdev tap,id=n0,ifname=tap0,script=/etc/qemu-ifup: script=/etc/qemu-ifup: flotilla runs no network scripts\nset up the tap beforehand and pass script=no"
    );
    assert_eq!(
        err(&["-netdev", "tap,id=n0,downscript=/x"]),
        "-netdev tap,id=n0,downscript=/x: downscript=/x: flotilla runs no network scripts\nset up the tap beforehand and pass downscript=no"
    );
    assert_eq!(
        err(&["-netdev", "tap,id=n0,fd=3,ifname=t"]),
        "-netdev tap,id=n0,fd=3,ifname=t: ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are invalid with fd="
    );
    assert_eq!(err(&["-netdev", "tap,id=n0,fd=x"]), "-netdev tap,id=n0,fd=x: Invalid file descriptor number 'x'");
    assert_eq!(err(&["-netdev", "tap,id=n0,bogus=1"]), "-netdev tap,id=n0,bogus=1: Invalid parameter 'bogus'");
    assert!(err(&["-netdev", "tap,id=n0,helper=/usr/lib/qemu/qemu-bridge-helper"])
        .contains("tap option 'helper' is not supported by flotilla"));
    assert_eq!(err(&["-netdev", "tap,ifname=t"]), "-netdev tap,ifname=t: Parameter 'id' is missing");
    assert_eq!(
        err(&["-netdev", "tap,id=1n"]),
        "-netdev tap,id=1n: Parameter 'id' expects an identifier\nIdentifiers consist of letters, digits, '-', '.', '_', starting with a letter."
    );
    assert_eq!(
        err(&["-netdev", "user,id=n", "-netdev", "tap,id=n,ifname=t"]),
        "-netdev tap,id=n,ifname=t: Duplicate ID 'n' for netdev"
    );
    assert_eq!(err(&["-netdev", "foo,id=n"]), "-netdev foo,id=n: Parameter 'type' does not accept value 'foo'");
    assert!(err(&["-netdev", "bridge,id=n,br=br0"])
        .starts_with("-netdev bridge,id=n,br=br0: network backend 'bridge' is not supported by flotilla"));
    assert_eq!(err(&["-netdev"]), "-netdev: requires an argument");
}

#[test]
fn netdev_user() {
    use crate::net_opts::NetdevKind;
    let d = devs(&[
        "-netdev",
        "user,id=u0,restrict=on,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53,net=10.0.3.0/24",
        "-device",
        "virtio-net-pci,netdev=u0",
    ]);
    assert_eq!(
        d.net.netdevs[0].kind,
        NetdevKind::User {
            restrict: true,
            hostfwd: vec!["tcp::2222-:22".into(), "udp:127.0.0.1:5353-10.0.2.15:53".into()],
            net: Some("10.0.3.0/24".into()),
            addrs: vec![],
        }
    );
    let d = devs(&[
        "-netdev",
        "user,id=u,host=10.0.2.9,dhcpstart=10.0.2.20,dns=10.0.2.53",
        "-device",
        "virtio-net-pci,netdev=u",
    ]);
    assert!(matches!(&d.net.netdevs[0].kind, NetdevKind::User { addrs, .. } if addrs.len() == 3));
    assert_eq!(
        err(&["-netdev", "user,id=u,dns=1.2.3.4"]).split(':').next(),
        Some("-netdev user,id=u,dns=1.2.3.4"),
        "a DNS address outside the network is refused"
    );
    assert_eq!(d.devices[0].backend, Backend::Netd("virtio-net-pci.0".into()));
    assert_eq!(
        err(&["-netdev", "user,id=u,hostfwd=tcp:2222:22"]),
        "-netdev user,id=u,hostfwd=tcp:2222:22: Invalid host forwarding rule 'tcp:2222:22' (No - separator)"
    );
    assert_eq!(
        err(&["-netdev", "user,id=u,hostfwd=sctp::1-:2"]),
        "-netdev user,id=u,hostfwd=sctp::1-:2: Invalid host forwarding rule 'sctp::1-:2' (Bad protocol name)"
    );
    assert_eq!(
        err(&["-netdev", "user,id=u,hostfwd=tcp::x-:22"]),
        "-netdev user,id=u,hostfwd=tcp::x-:22: Invalid host forwarding rule 'tcp::x-:22' (Bad host port)"
    );
    assert_eq!(
        err(&["-netdev", "user,id=u,restrict=maybe"]),
        "-netdev user,id=u,restrict=maybe: Parameter 'restrict' expects 'on' or 'off'"
    );
    assert!(err(&["-netdev", "user,id=u,smb=/srv"])
        .starts_with("-netdev user,id=u,smb=/srv: user option 'smb' is not supported by flotilla"));
    assert_eq!(
        err(&["-netdev", "user,id=u,net=10.0.2"]),
        "-netdev user,id=u,net=10.0.2: Parameter 'net' expects an IPv4 network ('10.0.2')"
    );
}

#[test]
fn netdev_vhost_user_is_an_external_backend() {
    let d = devs(&[
        "-chardev",
        "socket,id=c0,path=/run/netd.sock",
        "-netdev",
        "vhost-user,id=v0,chardev=c0,queues=2",
        "-device",
        "virtio-net-pci,netdev=v0,mq=on,id=vnic",
    ]);
    assert_eq!(d.devices[0].backend, Backend::External("/run/netd.sock".into()));
    assert_eq!(d.devices[0].num_queues, 5);
    assert!(!d.has_netd(), "no netd for an external backend");
    assert_eq!(
        err(&["-netdev", "vhost-user,id=v0,chardev=nope", "-device", "virtio-net-pci,netdev=v0"]),
        "-device virtio-net-pci,netdev=v0: chardev \"nope\" not found"
    );
    assert_eq!(err(&["-netdev", "vhost-user,id=v0"]), "-netdev vhost-user,id=v0: Parameter 'chardev' is missing");
    assert_eq!(
        err(&[
            "-chardev",
            "socket,id=c0,path=/x",
            "-device",
            "vhost-user-blk-pci,chardev=c0",
            "-netdev",
            "vhost-user,id=v0,chardev=c0",
            "-device",
            "virtio-net-pci,netdev=v0"
        ]),
        "-device virtio-net-pci,netdev=v0: Property 'vhost-user-net.chardev' can't take value 'c0', it's in use"
    );
}

#[test]
fn virtio_net_pci_errors() {
    assert_eq!(
        err(&["-device", "virtio-net-pci"]),
        "-device virtio-net-pci: netdev property not set: a NIC without a host side is not supported by flotilla\nadd -netdev tap|user|vhost-user,id=ID and netdev=ID"
    );
    assert_eq!(
        err(&["-device", "virtio-net-pci,netdev=nope"]),
        "-device virtio-net-pci,netdev=nope: Property 'virtio-net-pci.netdev' can't find value 'nope'"
    );
    let u = ["-netdev", "user,id=u"];
    let with = |dev: &str| err(&[u[0], u[1], "-device", dev]);
    assert_eq!(
        with("virtio-net-pci,netdev=u,mac=52:54:00:12:34"),
        "-device virtio-net-pci,netdev=u,mac=52:54:00:12:34: Property 'virtio-net-pci.mac' doesn't take value '52:54:00:12:34'"
    );
    assert_eq!(
        with("virtio-net-pci,netdev=u,mac=zz:54:00:12:34:56"),
        "-device virtio-net-pci,netdev=u,mac=zz:54:00:12:34:56: Property 'virtio-net-pci.mac' doesn't take value 'zz:54:00:12:34:56'"
    );
    assert_eq!(
        with("virtio-net-pci,netdev=u,mac=01:00:5e:00:00:01"),
        "-device virtio-net-pci,netdev=u,mac=01:00:5e:00:00:01: NIC cannot have multicast MAC address (odd 1st byte)"
    );
    assert_eq!(
        with("virtio-net-pci,netdev=u,mq=maybe"),
        "-device virtio-net-pci,netdev=u,mq=maybe: Parameter 'mq' expects 'on' or 'off'"
    );
    assert_eq!(
        with("virtio-net-pci,netdev=u,bogus=1"),
        "-device virtio-net-pci,netdev=u,bogus=1: Property 'virtio-net-pci.bogus' not found"
    );
    assert_eq!(
        err(&[u[0], u[1], "-device", "virtio-net-pci,netdev=u", "-device", "virtio-net-pci,netdev=u,id=x"]),
        "-device virtio-net-pci,netdev=u,id=x: Property 'virtio-net-pci.netdev' can't take value 'u', it's in use"
    );
    // romfile= (no option ROM here) and bootindex are accepted.
    devs(&[u[0], u[1], "-device", "virtio-net-pci,netdev=u,romfile=,bootindex=1"]);
}

#[test]
fn qemu_1_1_net_options() {
    use crate::net_opts::NetdevKind;
    let d = devs(&["-net", "nic,model=virtio,macaddr=52:54:00:00:00:01", "-net", "user,restrict=on"]);
    assert_eq!(d.net.netdevs[0].id, "user.0", "QEMU's TYPE.N name");
    assert!(matches!(d.net.netdevs[0].kind, NetdevKind::User { restrict: true, .. }));
    let n = &d.nics[0];
    assert_eq!((n.name.as_str(), n.netdev.as_str(), n.mac), ("virtio-net-pci.0", "user.0", [0x52, 0x54, 0, 0, 0, 1]));
    assert_eq!(d.devices[0].backend, Backend::Netd("virtio-net-pci.0".into()));
    // vlans pair NICs with their host sides; name= names a client; addr= places the NIC.
    let d = devs(&[
        "-net",
        "nic,model=virtio,vlan=1,addr=6",
        "-net",
        "nic,model=virtio-net-pci,name=second",
        "-net",
        "tap,ifname=tap0,script=no,downscript=no,name=t0",
        "-net",
        "user,vlan=1",
    ]);
    let pairs: Vec<(&str, &str)> = d.nics.iter().map(|n| (n.name.as_str(), n.netdev.as_str())).collect();
    assert_eq!(pairs, [("virtio-net-pci.0", "user.0"), ("second", "t0")]);
    assert_eq!(d.devices[0].pci_slot, Some(6));
    assert_eq!(d.nics.iter().map(|n| n.mac[5]).collect::<Vec<_>>(), [0x56, 0x57], "52:54:00:12:34:56 + 1 per NIC");
    // -net none: no NIC (flotilla has no default NIC to remove).
    let d = devs(&["-net", "none"]);
    assert!(d.net.none && d.nics.is_empty() && d.devices.is_empty());

    let hint = "use -net nic,model=virtio";
    assert_eq!(
        err(&["-net", "nic", "-net", "user"]),
        format!("-net nic: NIC model 'e1000' (QEMU's default) is not supported by flotilla\n{hint}")
    );
    assert_eq!(
        err(&["-net", "nic,model=rtl8139"]),
        format!("-net nic,model=rtl8139: NIC model 'rtl8139' is not supported by flotilla\n{hint}")
    );
    assert_eq!(
        err(&["-net", "nic,model=virtio"]),
        "-net nic,model=virtio: vlan 0 has no host side for this NIC\nadd -net tap,vlan=0,... or -net user,vlan=0"
    );
    assert_eq!(
        err(&["-net", "nic,model=virtio", "-net", "user", "-net", "tap,ifname=t"]),
        "-net tap,ifname=t: flotilla connects one NIC to one host side: vlan 0 already has 'user.0'"
    );
    assert_eq!(
        err(&["-net", "nic,model=virtio,macaddr=52:54:00"]),
        "-net nic,model=virtio,macaddr=52:54:00: invalid syntax for ethernet address"
    );
    assert_eq!(
        err(&["-net", "nic,model=virtio,vlan=x"]),
        "-net nic,model=virtio,vlan=x: Parameter 'vlan' expects a number"
    );
    assert_eq!(
        err(&["-net", "vhost-user,chardev=c"]),
        "-net vhost-user,chardev=c: Parameter 'type' expects a net type ('vhost-user' is not)"
    );
    assert_eq!(err(&["-net"]), "-net: requires an argument");
}

#[test]
fn help_lists_the_network_options() {
    let h = help_text();
    for o in ["-netdev tap,id=ID,ifname=NAME,script=no", "-net nic,model=virtio", "virtio-net-pci,netdev=ID"] {
        assert!(h.contains(o), "help lacks {o}:\n{h}");
    }
}

#[test]
fn what_info_network_is_told() {
    use crate::net_opts::gateway_nic_args;
    let d = devs(&[
        "-netdev",
        "tap,id=n0,ifname=tap0,script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=n0,id=nic0",
        "-netdev",
        "user,id=u0,net=10.0.3.0/24,restrict=on",
        "-device",
        "virtio-net-pci,netdev=u0",
        "-net",
        "nic,model=virtio,vlan=2",
        "-net",
        "user,vlan=2",
    ]);
    let a = gateway_nic_args(&d.net, &d.nics, &[]);
    assert_eq!(a.len(), 6);
    assert!(a.iter().step_by(2).all(|x| x == "--nic"));
    let v: Vec<serde_json::Value> = a.iter().skip(1).step_by(2).map(|j| serde_json::from_str(j).unwrap()).collect();
    assert_eq!(
        v[0],
        serde_json::json!({"name": "nic0", "model": "virtio-net-pci", "macaddr": "52:54:00:12:34:56", "queues": 1,
            "hub": null, "peer": {"name": "n0", "type": "tap", "info": "ifname=tap0,script=no,downscript=no"}})
    );
    assert_eq!(v[1]["peer"]["info"], "net=10.0.3.0,restrict=on");
    assert_eq!((v[2]["name"].as_str(), v[2]["hub"].as_u64()), (Some("virtio-net-pci.1"), Some(2)));
    assert_eq!(
        v[2]["peer"],
        serde_json::json!({"name": "user.0", "type": "user", "info": "net=10.0.2.0,restrict=off"})
    );
    let d = devs(&[
        "-chardev",
        "socket,id=c0,path=/x",
        "-netdev",
        "vhost-user,id=v,chardev=c0",
        "-device",
        "virtio-net-pci,netdev=v",
    ]);
    let a = gateway_nic_args(&d.net, &d.nics, &[]);
    assert!(a[1].contains(r#""info":"vhost-user{q} to c0""#), "{}", a[1]);
}

#[test]
fn nics_and_other_devices_share_the_bus() {
    let d = devs(&[
        "-netdev",
        "user,id=u",
        "-device",
        "virtio-net-pci,netdev=u",
        "-device",
        "virtio-balloon-pci",
        "-drive",
        "file=/a,if=virtio",
    ]);
    let backends: Vec<Backend> = d.devices.iter().map(|x| x.backend.clone()).collect();
    assert_eq!(
        backends,
        [Backend::Netd("virtio-net-pci.0".into()), Backend::Balloon, Backend::Drive("virtio0".into())],
        "command-line order; a NIC is no balloon"
    );
    assert!(d.has_balloon() && d.has_netd() && d.has_drives());
    assert_eq!(
        err(&["-netdev", "user,id=u", "-device", "virtio-net-pci,netdev=u,addr=4", "-device", "virtio-balloon-pci,addr=4"]),
        "-device virtio-balloon-pci,addr=4: PCI: slot 4 function 0 not available for virtio-balloon-pci, in use by virtio-net-pci,id=(null)"
    );
}
