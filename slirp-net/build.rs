// Links the system libslirp (Debian: libslirp-dev, which ships libslirp.so). No pkg-config: Debian's
// slirp.pc requires glib-2.0.pc, which libslirp-dev does not pull in, so `pkg-config slirp` fails on
// a host that has everything needed to link.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=dylib=slirp");
}
