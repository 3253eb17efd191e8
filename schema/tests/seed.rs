//! The vendored schema is the seed, and parses to what the seed defines.

use flotilla_schema::parse::{self, Entity, TypeExpr};
use flotilla_schema::table::{self, StructKind, Ty};
use flotilla_schema::{SCHEMA_SHA256, SCHEMA_TEXT};

/// SHA-256 (FIPS 180-4), enough to check one file without a dependency.
fn sha256(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in msg.chunks(64) {
        let mut w = [0u32; 64];
        for (i, word) in chunk.chunks(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}

#[test]
fn sha256_is_right() {
    assert_eq!(sha256(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_eq!(sha256(&[b'a'; 1000]), "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3");
}

#[test]
fn vendored_schema_is_the_seed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let vendored = std::fs::read(dir.join("qapi-schema.json")).expect("schema/qapi-schema.json");
    assert_eq!(vendored, SCHEMA_TEXT.as_bytes());
    // The seed lies in shared/ beside the repository, when there is one.
    let seed = dir.join("../../shared/seed/qapi-schema.json");
    match std::fs::read(&seed) {
        Ok(seed) => assert!(seed == vendored, "schema/qapi-schema.json differs from ../shared/seed/qapi-schema.json"),
        Err(e) => eprintln!("{} not readable ({e}); checking the SHA-256 only", seed.display()),
    }
    assert_eq!(sha256(&vendored), SCHEMA_SHA256);
}

#[test]
fn seed_counts() {
    let schema = flotilla_schema::schema();
    assert_eq!(schema.commands().count(), 39);
    assert_eq!(schema.structs().count(), 26);
    assert_eq!(schema.enums().count(), 2);
    assert_eq!(schema.entities.len(), 67);

    assert_eq!(table::COMMANDS.len(), 39);
    assert_eq!(table::ENUMS.len(), 2);
    let count = |k| table::STRUCTS.iter().filter(|s| s.kind == k).count();
    assert_eq!(count(StructKind::Schema), 26);
    // VersionInfo.qemu, PciBridgeInfo.bus, PciDeviceInfo.class_info, PciDeviceInfo.id.
    assert_eq!(count(StructKind::Nested), 4);
    let with_data = schema.commands().filter(|c| c.data.is_some()).count();
    assert_eq!(count(StructKind::Arguments), with_data);
    assert_eq!(with_data, 16);
}

#[test]
fn table_follows_the_schema_in_order() {
    let schema = flotilla_schema::schema();
    let names: Vec<&str> = schema.commands().map(|c| c.name.as_str()).collect();
    let table: Vec<&str> = table::COMMANDS.iter().map(|c| c.name).collect();
    assert_eq!(names, table);
    assert_eq!(names[0], "query-name");
    assert_eq!(names[38], "expire_password");
    for c in schema.commands() {
        let info = table::command(&c.name).unwrap();
        assert_eq!(info.gen, c.gen, "{}", c.name);
        assert_eq!(info.returns.is_some(), c.returns.is_some(), "{}", c.name);
        let members = c.data.as_deref().unwrap_or_default();
        assert_eq!(info.members.len(), members.len());
        for (m, t) in members.iter().zip(info.members) {
            assert_eq!(m.name, t.name);
            assert_eq!(m.optional, t.optional);
        }
    }
    let no_gen: Vec<&str> = table::COMMANDS.iter().filter(|c| !c.gen).map(|c| c.name).collect();
    assert_eq!(no_gen, ["qom-get", "qom-set"]);
}

#[test]
fn seed_constructs() {
    let schema = flotilla_schema::schema();
    // A nested anonymous struct.
    let version = schema.find_struct("VersionInfo").unwrap();
    let TypeExpr::Anonymous { members, .. } = &version.members[0].ty else {
        panic!("VersionInfo.qemu is an anonymous struct")
    };
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["major", "minor", "micro"]);
    // Optional members and lists.
    let vnc = schema.find_struct("VncInfo").unwrap();
    let clients = vnc.members.iter().find(|m| m.name == "clients").unwrap();
    assert!(clients.optional);
    assert!(matches!(&clients.ty, TypeExpr::List { element, .. }
        if matches!(&**element, TypeExpr::Named { name, .. } if name == "VncClientInfo")));
    // 'visitor' and 'gen': 'no'.
    let qom_get = schema.find_command("qom-get").unwrap();
    assert!(!qom_get.gen);
    assert!(matches!(&qom_get.returns, Some(TypeExpr::Named { name, .. }) if name == "visitor"));
    assert_eq!(table::command("qom-set").unwrap().members[2].ty, Ty::Builtin(parse::Builtin::Any));
    // 'number'.
    assert_eq!(table::command("migrate_set_downtime").unwrap().members[0].ty, Ty::Builtin(parse::Builtin::Number));
    // Positions and doc blocks.
    let Entity::Struct(first) = &schema.entities[0] else { panic!() };
    assert_eq!(first.name, "NameInfo");
    assert_eq!((first.pos.line, first.pos.col), (14, 11));
    assert!(first.doc.as_deref().unwrap().starts_with("@NameInfo:\n\nGuest name information."));
    let run_state = schema.find_enum("RunState").unwrap();
    assert_eq!(run_state.values.len(), 13);
    assert_eq!(run_state.values[2].0, "internal-error");
}
