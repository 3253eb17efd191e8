//! Unit tests over virtio-queue mock chains (filled in below).
